"""MONAI transform chains of the detection bundles: loading, resampling, box frames, patch sampling, augmentation.

Every chain works on dictionaries with the keys `image` (file path(s), then a channel-first MetaTensor),
`box` (world `cccwhd` mm in a datalist, voxel `xyzxyz` after `BoxesWorldToVoxeld`) and `label` (0-based).
The chains are built by functions so that all bundles share one definition and expose only the knobs a
user changes (spacing, intensity window, patch size, augmentation strength) as config keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.apps.detection.transforms.array import SpatialCropBox
from monai.apps.detection.transforms.dictionary import (
    ClipBoxToImaged,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    RandZoomBoxd,
)
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    Rotate,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    ScaleIntensityRanged,
    Lambdad,
    Spacing,
    SpatialCrop,
    SpatialPadd,
)
from monai.transforms.utils import correct_crop_centers
from monai.utils import fall_back_tuple

from meddet.data.boxes import IGNORE_LABEL, boxes_voxel_to_world, boxes_world_to_voxel, flip_lps_ras
from meddet.data.image_io import ImageFormatError
from meddet.data.score_filter import SelectDetectionsByScored

logger = logging.getLogger(__name__)

# Orientationd warns in MONAI 1.6 unless the axis labels are explicit (the default changes later).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


_OBLIQUE_WARNED: set = set()


def oblique_angle_deg(affine) -> float:
    """The largest angle (degrees) between a voxel axis of `affine` and the world axis nearest to it (0 for grids
    whose axes are flips and permutations of the world's)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(columns).max(axis=0) / np.linalg.norm(columns, axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def _warn_if_oblique(image) -> None:
    angle = oblique_angle_deg(image.affine)
    source = str(image.meta.get("filename_or_obj", "")) if hasattr(image, "meta") else ""
    if angle > 0.5 and source not in _OBLIQUE_WARNED:
        _OBLIQUE_WARNED.add(source)
        growth = math.cos(math.radians(angle)) + math.sin(math.radians(angle))
        logger.warning("image %s has an oblique grid (axes up to %.1f deg off the world axes): its world boxes are the "
                       "axis-aligned boxes around the rotated voxel boxes, up to %.0f %% larger per axis than the "
                       "voxel boxes", source or "(unnamed)", angle, 100 * (growth - 1))


class BoxesWorldToVoxeld(MapTransform):
    """World `cccwhd` boxes (mm) -> voxel `xyzxyz` boxes of `image_key`'s current grid (its MetaTensor affine).

    Run it after any resampling/reorientation of the image so boxes follow the grid the network sees.
    `affine_lps_to_ras=True` reads the boxes as LPS world coordinates (ITK/mhd/DICOM datasets such as
    LUNA16) while MONAI's image affines are RAS. `to_world=True` is the inverse (voxel -> world).
    """

    def __init__(self, box_keys: KeysCollection, image_key: str = "image", affine_lps_to_ras: bool = False,
                 to_world: bool = False, allow_missing_keys: bool = False):
        super().__init__(box_keys, allow_missing_keys)
        self.image_key = image_key
        self.affine_lps_to_ras = affine_lps_to_ras
        self.to_world = to_world

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        affine = d[self.image_key].affine
        _warn_if_oblique(d[self.image_key])
        for key in self.key_iterator(d):
            boxes = torch.as_tensor(d[key]).detach().cpu().double().reshape(-1, 6).numpy()
            if self.to_world:
                boxes = boxes_voxel_to_world(boxes, affine)
                boxes = flip_lps_ras(boxes) if self.affine_lps_to_ras else boxes
            else:
                boxes = flip_lps_ras(boxes) if self.affine_lps_to_ras else boxes
                boxes = boxes_world_to_voxel(boxes, affine)
            d[key] = torch.as_tensor(boxes, dtype=torch.float32)
        return d


class MergeIgnoreBoxesd(MapTransform):
    """Append a sample's ``ignore_box`` regions (world `cccwhd`) to its ``box`` with the label `IGNORE_LABEL`
    and drop the ``ignore_box`` entry, so that the box-aware transforms carry them along."""

    def __init__(self, box_key: str = "box", label_key: str = "label", ignore_key: str = "ignore_box"):
        super().__init__([box_key, label_key], allow_missing_keys=True)
        self.box_key, self.label_key, self.ignore_key = box_key, label_key, ignore_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ignore = d.pop(self.ignore_key, None)
        if ignore is None or len(ignore) == 0:
            return d
        ignore = np.asarray(ignore, dtype=np.float32).reshape(-1, 6)
        boxes = np.asarray(d.get(self.box_key, np.zeros((0, 6))), dtype=np.float32).reshape(-1, 6)
        labels = np.asarray(d.get(self.label_key, np.zeros(0)), dtype=np.int64).reshape(-1)
        d[self.box_key] = np.concatenate([boxes, ignore])
        d[self.label_key] = np.concatenate([labels, np.full(len(ignore), IGNORE_LABEL, dtype=np.int64)])
        return d


class RandCropTargetBoxByPosNegLabeld(RandCropBoxByPosNegLabeld):
    """MONAI's positive/negative box-aware crop with the same sampling distribution, drawn from the boxes alone.

    Positive patches hold a whole object (`whole_box=True`): the crop centre is uniform over the union of the
    objects' centre regions (MONAI's `generate_fg_center_boxes_np`); negative centres are uniform over the voxels
    outside that union; both are then moved into the image as MONAI does. MONAI rasterises every centre region
    into a whole-volume mask and lists its voxel indices for every patch, then deep-copies the whole sample per
    patch: 0.5 s per 128^3 patch of a 450x450x190 CT on one thread, 85 % of the patch's cost. Here a positive
    centre is drawn by rejection (a region chosen by its volume, a voxel in it, kept with probability one over
    the number of regions holding it: exactly uniform over the union), a negative one by drawing voxels until
    one lies outside every region; only the patch is copied. When the regions leave (almost) no voxel outside
    them, the negative draw lists the voxels outside them.

    Ignore regions (label `IGNORE_LABEL`) are cropped along with the objects but never chosen as a patch's
    object (a negative patch may hold one; the detectors take no loss there).
    """

    NEGATIVE_TRIES = 256

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        image_size = tuple(d[self.image_keys[0]].shape[1:])
        self.spatial_size = fall_back_tuple(self.spatial_size_, image_size)
        boxes = torch.as_tensor(np.asarray(d[self.box_keys])).reshape(-1, 2 * len(image_size))
        labels = torch.as_tensor(np.asarray(d[self.label_keys[0]])).reshape(-1)
        targets = boxes[labels != IGNORE_LABEL].numpy()
        regions = (self.generate_fg_center_boxes_np(targets, image_size) if len(targets)
                   else np.zeros((0, 2 * len(image_size)), dtype=int))
        self.centers = self._draw_centers(regions, image_size)
        results = []
        for center in self.centers:
            start = [max(int(c) - s // 2, 0) for c, s in zip(center, self.spatial_size)]
            slices = [slice(a, min(a + s, size)) for a, s, size in zip(start, self.spatial_size, image_size)]
            patch = dict(d)
            for key in self.image_keys:
                patch[key] = SpatialCrop(roi_slices=slices)(d[key]).clone()  # not a view into the cached volume
            patch[self.box_keys], cropped = SpatialCropBox(roi_slices=slices)(d[self.box_keys],
                                                                              [d[key] for key in self.label_keys])
            for key, value in zip(self.label_keys, cropped):
                patch[key] = value
            results.append(patch)
        return results

    def _draw_centers(self, regions: np.ndarray, image_size: Sequence[int]) -> tuple:
        """`num_samples` crop centres from the integer centre regions [N, 6] (`[start, stop)` per axis)."""
        dims = len(image_size)
        lo, hi = regions[:, :dims], regions[:, dims:]
        volumes = np.prod(hi - lo, axis=1).astype(np.float64)
        region_probabilities = volumes / volumes.sum()  # a region by its share of the voxels (empty: no regions)
        centers = []
        for _ in range(self.num_samples):
            # MONAI draws the coin even when one side is empty (no objects: always negative)
            positive = self.R.rand() < self.pos_ratio and len(regions) > 0
            if positive:
                center = self._positive_center(lo, hi, region_probabilities)
            else:
                center = self._negative_center(lo, hi, image_size)
            if center is None:  # no voxel lies outside the regions: MONAI then crops positive patches only
                center = self._positive_center(lo, hi, region_probabilities)
            centers.append(correct_crop_centers(center.tolist(), self.spatial_size, image_size, self.allow_smaller))
        return tuple(centers)

    def _positive_center(self, lo: np.ndarray, hi: np.ndarray, region_probabilities: np.ndarray) -> np.ndarray:
        while True:  # each draw is kept with probability >= 1 / number of regions
            region = self.R.choice(len(region_probabilities), p=region_probabilities)
            voxel = self.R.randint(lo[region], hi[region])
            holders = np.all((lo <= voxel) & (voxel < hi), axis=1).sum()
            if self.R.rand() < 1.0 / holders:
                return voxel

    def _negative_center(self, lo: np.ndarray, hi: np.ndarray, image_size: Sequence[int]) -> np.ndarray | None:
        for _ in range(self.NEGATIVE_TRIES):
            voxel = self.R.randint(0, image_size)
            if not np.all((lo <= voxel) & (voxel < hi), axis=1).any():
                return voxel
        # the regions cover most of the image: list the voxels outside them (small images only get here)
        outside = np.ones(tuple(image_size), dtype=bool)
        for start, stop in zip(lo, hi):
            outside[tuple(slice(a, b) for a, b in zip(start, stop))] = False
        indices = np.flatnonzero(outside)
        if len(indices) == 0:
            return None
        return np.array(np.unravel_index(indices[self.R.randint(len(indices))], tuple(image_size)))


class CheckedLoadImaged(LoadImaged):
    """MONAI's `LoadImaged` whose failures name the file: a volume that cannot be read when it is cached or loaded
    (cut short after the datalist check, damaged, removed) stops the run with its path, not with a bare
    "EOFError: Compressed file ended before the end-of-stream marker was reached"."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as error:  # any reader failure: add the path, keep the cause
            images = [data[key] for key in self.keys if key in data]
            raise ImageFormatError(f"cannot load image {images[0] if len(images) == 1 else images}: "
                                   f"{type(error).__name__}: {error}") from error


def _labels_as_long(keys: KeysCollection) -> EnsureTyped:
    return EnsureTyped(keys=keys, dtype=torch.long, track_meta=False)


def loading_transforms(
    spacing: Sequence[float],
    intensity_clip: Sequence[float],
    intensity_mean: float,
    intensity_std: float,
    affine_lps_to_ras: bool = False,
    with_boxes: bool = True,
    intensity_normalization: str = "ct",
) -> list:
    """Load, reorient to RAS, resample to `spacing`, normalise intensities, boxes to voxel.

    `intensity_normalization` "ct" (the detectors; nnDetection/nnU-Net's CT scheme): clip to the planned
    foreground percentiles, subtract the foreground mean, divide by its std; one linear map does all three.
    "zscore" (nnssl's pre-training default, any modality): subtract each image's own mean, divide by its std;
    the planned values are then unused.
    """
    if intensity_normalization not in ("ct", "zscore"):
        raise ValueError(f"intensity_normalization must be 'ct' or 'zscore', got {intensity_normalization!r}")
    low, high = float(intensity_clip[0]), float(intensity_clip[1])
    normalise = NormalizeIntensityd(keys="image") if intensity_normalization == "zscore" else ScaleIntensityRanged(
        keys="image",
        a_min=low,
        a_max=high,
        b_min=(low - intensity_mean) / intensity_std,
        b_max=(high - intensity_mean) / intensity_std,
        clip=True,
    )
    chain = [
        CheckedLoadImaged(keys="image", image_only=False, ensure_channel_first=False),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys="image", dtype=torch.float32),
        Orientationd(keys="image", axcodes="RAS", labels=RAS_LABELS),
        # Spacing through Lambdad rather than Spacingd: MONAI 1.6's Spacingd also updates every `image_*` entry
        # as a meta dict, which breaks on MONAI Label's string `image_path`
        Lambdad(keys="image", func=Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear",
                                           padding_mode="border")),
        normalise,
    ]
    if with_boxes:
        chain += _boxes_to_voxel(affine_lps_to_ras)
    return chain


def _boxes_to_voxel(affine_lps_to_ras: bool) -> list:
    return [
        BoxesWorldToVoxeld(box_keys="box", image_key="image", affine_lps_to_ras=affine_lps_to_ras),
        _labels_as_long("label"),
    ]


def training_transforms(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    intensity_clip: Sequence[float],
    intensity_mean: float,
    intensity_std: float,
    affine_lps_to_ras: bool = False,
    num_samples: int = 1,
    foreground_ratio: float = 0.5,
    augment: bool = True,
) -> Compose:
    """Loading + object-balanced patch sampling + nnDetection-like augmentation.

    Sampling: each drawn patch holds at least one whole object with probability `foreground_ratio`
    (the object sits at a random offset inside the patch, not centred); otherwise the patch centre is
    drawn from the rest of the volume. Volumes smaller than the patch are padded first.
    Augmentation (nnDetection's recipe in MONAI box-aware transforms): scaling 0.7-1.4 p0.2, in-plane
    rotation +-30 deg p0.2 (boxes re-derived from the rotated box masks), mirroring on all axes,
    Gaussian noise, Gaussian blur, brightness 0.75-1.25, contrast, gamma 0.7-1.5.
    """
    if not 0.0 <= foreground_ratio <= 1.0:
        raise ValueError(f"foreground_ratio must lie in [0, 1], got {foreground_ratio}")
    patch_size = tuple(int(p) for p in patch_size)
    # Padding updates the image affine, so boxes are converted to voxels after it.
    chain = loading_transforms(spacing, intensity_clip, intensity_mean, intensity_std, with_boxes=False)
    chain += [
        MergeIgnoreBoxesd(),
        SpatialPadd(keys="image", spatial_size=patch_size, mode="constant",
                    value=float((intensity_clip[0] - intensity_mean) / intensity_std)),
        *_boxes_to_voxel(affine_lps_to_ras),
        RandCropTargetBoxByPosNegLabeld(
            image_keys="image",
            box_keys="box",
            label_keys="label",
            spatial_size=patch_size,
            whole_box=True,
            num_samples=num_samples,
            pos=foreground_ratio,
            neg=1.0 - foreground_ratio,
        ),
    ]
    if augment:
        chain += _augmentation(patch_size)
    chain += [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="box", dtype=torch.float32, track_meta=False),
        _labels_as_long("label"),
        DeleteItemsd(keys=["image_meta_dict", "image_transforms", "diameter_mm"]),
    ]
    return Compose(chain)


class RandRotateBoxd(RandomizableTransform, MapTransform):
    """In-plane (x-y) rotation about the patch centre by an angle in [-max_angle, max_angle], with probability
    `prob`, of the image and its voxel `xyzxyz` boxes.

    Boxes are moved analytically as the ellipsoids inscribed in them (lesions are roughly ellipsoidal): the
    centre rotates with the image and the in-plane half-sizes become those of the rotated ellipse,
    sqrt((a cos t)^2 + (b sin t)^2) and sqrt((a sin t)^2 + (b cos t)^2). MONAI's recipe instead rasterises
    boxes to masks and back (BoxToMaskd/MaskToBoxd), which floors fractional corners and so shifts every
    resampled box by up to a voxel even when no rotation happens.
    """

    def __init__(self, image_key: str = "image", box_key: str = "box", prob: float = 0.2,
                 max_angle: float = math.pi / 6):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [image_key, box_key])
        self.image_key, self.box_key, self.max_angle = image_key, box_key, float(max_angle)
        self.angle = 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.angle = float(self.R.uniform(-self.max_angle, self.max_angle))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        image = d[self.image_key]
        # Rotate with angle (0, 0, t) maps an offset (dx, dy) from the centre to (c dx + s dy, -s dx + c dy)
        d[self.image_key] = Rotate(angle=(0.0, 0.0, self.angle), keep_size=True, mode="bilinear",
                                   padding_mode="border")(image)
        boxes = torch.as_tensor(d[self.box_key], dtype=torch.float32).clone().reshape(-1, 6)
        if len(boxes):
            cos, sin = math.cos(self.angle), math.sin(self.angle)
            centre = torch.tensor(image.shape[1:3], dtype=torch.float32) / 2  # box coordinates of the centre
            offset = (boxes[:, :2] + boxes[:, 3:5]) / 2 - centre
            half = (boxes[:, 3:5] - boxes[:, :2]) / 2
            new_offset = torch.stack([cos * offset[:, 0] + sin * offset[:, 1],
                                      -sin * offset[:, 0] + cos * offset[:, 1]], dim=1)
            new_half = torch.stack([torch.hypot(half[:, 0] * cos, half[:, 1] * sin),
                                    torch.hypot(half[:, 0] * sin, half[:, 1] * cos)], dim=1)
            boxes[:, :2] = centre + new_offset - new_half
            boxes[:, 3:5] = centre + new_offset + new_half
        d[self.box_key] = boxes
        return d


def _augmentation(patch_size: Sequence[int]) -> list:
    spatial = [
        RandZoomBoxd(
            image_keys="image", box_keys="box", box_ref_image_keys="image", prob=0.2,
            min_zoom=0.7, max_zoom=1.4, padding_mode="constant", keep_size=True,
        ),
        ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True),
        *[RandFlipBoxd(image_keys="image", box_keys="box", box_ref_image_keys="image", prob=0.5, spatial_axis=axis)
          for axis in range(3)],
        RandRotateBoxd(image_key="image", box_key="box", prob=0.2, max_angle=math.pi / 6),
        ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True),
    ]
    intensity = [
        RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
        RandScaleIntensityFixedMeand(keys="image", prob=0.15, factors=0.25),
        RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.7, 1.5), retain_stats=True),
    ]
    return spatial + intensity


def validation_transforms(
    spacing: Sequence[float],
    intensity_clip: Sequence[float],
    intensity_mean: float,
    intensity_std: float,
    affine_lps_to_ras: bool = False,
) -> Compose:
    """Whole volumes with ground truth in voxel boxes, for validation and evaluation."""
    chain = loading_transforms(spacing, intensity_clip, intensity_mean, intensity_std, affine_lps_to_ras)
    chain += [EnsureTyped(keys="box", dtype=torch.float32, track_meta=False)]
    return Compose(chain)


def inference_transforms(
    spacing: Sequence[float],
    intensity_clip: Sequence[float],
    intensity_mean: float,
    intensity_std: float,
    affine_lps_to_ras: bool = False,
) -> Compose:
    """Whole volumes; the image keeps its MetaTensor affine for `postprocessing`. Ground truth, when a datalist used
    for inference carries it, comes along as voxel boxes for the PNGs only: detection never reads it."""
    chain = loading_transforms(spacing, intensity_clip, intensity_mean, intensity_std, with_boxes=False)
    return Compose([
        *chain,
        BoxesWorldToVoxeld(box_keys="box", image_key="image", affine_lps_to_ras=affine_lps_to_ras,
                           allow_missing_keys=True),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False, allow_missing_keys=True),
        DeleteItemsd(keys=["ignore_box", "diameter_mm"]),
    ])


def postprocessing(affine_lps_to_ras: bool = False, score_thresh: float = 0.0, pred_box_key: str = "box") -> Compose:
    """Predicted voxel boxes of the preprocessed grid -> world `cccwhd` boxes in the datalist's frame, keeping
    the detections scoring at least `score_thresh` (0 keeps all; viewers that drop scores want a higher one)."""
    return Compose([
        BoxesWorldToVoxeld(box_keys=pred_box_key, image_key="image", affine_lps_to_ras=affine_lps_to_ras,
                           to_world=True),
        SelectDetectionsByScored(score_thresh=score_thresh, box_key=pred_box_key),
    ])
