"""Transform chains of the pre-training bundles: unlabeled volumes -> patches (MAE) or pairs of crops (SimCLR).

Loading, RAS reorientation, resampling and intensity normalisation are the detectors' own
(`meddet.data.transforms.loading_transforms`), so a pre-trained encoder sees its inputs on the grid and in the
intensity scale the fine-tuning bundles use when both are configured alike. Volumes smaller than the patch are
padded with the normalised minimum (0 after z-scoring ~ the image mean, the clip floor for "ct").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

from meddet.data.transforms import loading_transforms

__all__ = ["OverlappingCropPaird", "mae_transforms", "simclr_transforms"]


def _loading(patch_size, spacing, intensity_normalization, intensity_clip, intensity_mean, intensity_std) -> list:
    pad_value = 0.0 if intensity_normalization == "zscore" else (intensity_clip[0] - intensity_mean) / intensity_std
    return [
        *loading_transforms(spacing, intensity_clip, intensity_mean, intensity_std, with_boxes=False,
                            intensity_normalization=intensity_normalization),
        # labels of a detection datalist reused for pre-training are ignored
        DeleteItemsd(keys=["box", "label", "instance_mask"]),
        SpatialPadd(keys="image", spatial_size=[int(p) for p in patch_size], mode="constant", value=float(pad_value)),
    ]


def _finish() -> list:
    return [EnsureTyped(keys=["image", "image_pair"], dtype=torch.float32, track_meta=False, allow_missing_keys=True),
            DeleteItemsd(keys=["image_meta_dict", "image_transforms"])]


def mae_transforms(patch_size: Sequence[int], spacing: Sequence[float], intensity_normalization: str = "zscore",
                   intensity_clip: Sequence[float] = (-1000.0, 1000.0), intensity_mean: float = 0.0,
                   intensity_std: float = 1.0, train: bool = True, spatial_augmentation: bool = True) -> Compose:
    """One `patch_size` patch per volume: for training a random crop, then (`spatial_augmentation`, nnssl's MAE
    recipe) rotation of up to +-30 deg about every axis with probability 0.2 and scaling 0.7-1.4 with probability
    0.2, filling with 0 as nnssl does, and mirroring on every axis; the centre crop for validation (so the
    validation loss compares like with like)."""
    patch_size = [int(p) for p in patch_size]
    chain = _loading(patch_size, spacing, intensity_normalization, intensity_clip, intensity_mean, intensity_std)
    if train:
        chain.append(RandSpatialCropd(keys="image", roi_size=patch_size, random_size=False))
        if spatial_augmentation:
            angle = np.pi / 6
            chain += [RandRotated(keys="image", range_x=angle, range_y=angle, range_z=angle, prob=0.2,
                                  mode="bilinear", padding_mode="zeros", keep_size=True),
                      RandZoomd(keys="image", prob=0.2, min_zoom=0.7, max_zoom=1.4, mode="trilinear",
                                padding_mode="constant", keep_size=True)]
        chain += [RandFlipd(keys="image", prob=0.5, spatial_axis=axis) for axis in range(3)]
    else:
        chain += [CenterSpatialCropd(keys="image", roi_size=patch_size)]
    return Compose(chain + _finish())


class OverlappingCropPaird(RandomizableTransform, MapTransform):
    """Two `crop_size` crops of `key`'s patch whose overlap is at least `min_overlap` of a crop's volume:
    the first anywhere in the patch, the second offset from it by a random shift drawn (by rejection) among the
    shifts that keep the overlap and stay inside the patch. Writes `key` (first crop) and `pair_key` (second).

    `deterministic=True` (validation) takes the centre crop and a shift of (1 - min_overlap^(1/3)) of the crop
    along every axis, i.e. exactly the minimum overlap.
    """

    def __init__(self, crop_size: Sequence[int], min_overlap: float = 0.5, key: str = "image",
                 pair_key: str = "image_pair", deterministic: bool = False, max_tries: int = 100):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, [key])
        if not 0.0 < min_overlap <= 1.0:
            raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap}")
        self.crop_size = np.asarray([int(c) for c in crop_size])
        self.min_overlap, self.key, self.pair_key = float(min_overlap), key, pair_key
        self.deterministic, self.max_tries = deterministic, int(max_tries)

    def origins(self, patch_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        room = np.asarray(patch_shape) - self.crop_size
        if np.any(room < 0):
            raise ValueError(f"OverlappingCropPaird: patch {tuple(patch_shape)} is smaller than the crop "
                             f"{tuple(self.crop_size)}")
        if self.deterministic:
            first = room // 2
            shift = np.floor(self.crop_size * (1 - self.min_overlap ** (1 / 3))).astype(int)
            return first, np.minimum(first + shift, room)
        first = np.array([self.R.randint(0, r + 1) for r in room])
        for _ in range(self.max_tries):
            second = np.array([self.R.randint(0, r + 1) for r in room])
            overlap = np.prod(np.clip(self.crop_size - np.abs(second - first), 0, None) / self.crop_size)
            if overlap >= self.min_overlap:
                return first, second
        return first, first.copy()  # the same crop, differently augmented: still a valid positive pair

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.key]
        first, second = self.origins(image.shape[1:])
        crops = [image[(slice(None), *[slice(o, o + c) for o, c in zip(origin, self.crop_size)])]
                 for origin in (first, second)]
        d[self.key], d[self.pair_key] = crops[0], crops[1]
        return d


def _view_augmentation(key: str) -> list:
    """Independent random augmentation of one view (each view gets its own random draws)."""
    return [
        *[RandFlipd(keys=key, prob=0.5, spatial_axis=axis) for axis in range(3)],
        RandScaleIntensityd(keys=key, prob=0.8, factors=0.25),
        RandShiftIntensityd(keys=key, prob=0.8, offsets=0.25),
        RandAdjustContrastd(keys=key, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        RandGaussianNoised(keys=key, prob=0.3, mean=0.0, std=0.1),
        RandGaussianSmoothd(keys=key, prob=0.3, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
    ]


def simclr_transforms(patch_size: Sequence[int], crop_size: Sequence[int], spacing: Sequence[float],
                      intensity_normalization: str = "zscore", intensity_clip: Sequence[float] = (-1000.0, 1000.0),
                      intensity_mean: float = 0.0, intensity_std: float = 1.0, min_overlap: float = 0.5,
                      train: bool = True) -> Compose:
    """A `patch_size` patch per volume (random for training, centred for validation), two overlapping
    `crop_size` crops of it (`image`, `image_pair`), each augmented on its own for training (mirroring,
    brightness, shift, contrast, noise, blur)."""
    patch_size = [int(p) for p in patch_size]
    chain = _loading(patch_size, spacing, intensity_normalization, intensity_clip, intensity_mean, intensity_std)
    chain.append(RandSpatialCropd(keys="image", roi_size=patch_size, random_size=False) if train
                 else CenterSpatialCropd(keys="image", roi_size=patch_size))
    chain.append(OverlappingCropPaird(crop_size, min_overlap, deterministic=not train))
    if train:
        chain += _view_augmentation("image") + _view_augmentation("image_pair")
    return Compose(chain + _finish())
