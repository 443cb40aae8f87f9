"""Whole-volume detection by sliding window, mirror test-time augmentation and weighted box clustering.

Steps for each image (channel-first `[C, X, Y, Z]`, boxes `xyzxyz` in voxels):

1. choose the tile: the window size, except along an axis where the volume is shorter than the window and
   `size_divisible` is set: there the tile is the volume's length rounded up to a multiple of it (a fully
   convolutional network accepts any such size, and the padding it saves was compute spent on no image);
   pad the volume at its far end up to the tile where it is smaller, and place tiles as MONAI's sliding
   window does (step ``int(tile * (1 - overlap))``, the last tile aligned to the volume end);
2. run the predictor on every tile and every mirror combination over `mirror_axes` (identity included,
   so 3 axes give 8 passes), `sw_batch_size` patches at a time;
3. flip boxes back (``x' = W - x`` for both corners over a size-W axis, min and max swapped), clip them to
   the tile, give each a weight from where its centre lies in the tile, shift them by the tile origin
   and clip them to the volume;
4. merge everything with weighted box clustering; the number of predictions expected for an object is
   the number of mirror passes times the mean number of tiles covering its box (nnDetection's overlap
   map); keep the `detections_per_image` best.

Tile-border weight (nnDetection's normal form): per axis ``exp(-d^2 / (2 sigma^2))`` with ``d`` the
distance of the box centre from the tile centre and ``sigma = border_sigma_scale * tile / 2``, averaged
over the axes; at the tile border (``d = tile / 2``) with the default scale 0.8 that is
``exp(-1 / 1.28) = 0.46``. A network sees an object cut by a tile border only partly, so another tile
that sees it whole should dominate the merge. Where the tile border is the volume border no other tile
can do better, so the distance towards it counts as zero there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices

from meddet.inference.wbc import weighted_box_clustering

__all__ = ["SlidingWindowBoxInferer", "tile_origins", "box_tile_weights"]


def _scan_interval(roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    return tuple(max(1, int(r * (1.0 - overlap))) for r in roi_size)


def tile_origins(image_size: Sequence[int], roi_size: Sequence[int], overlap: float = 0.5) -> list[tuple[int, ...]]:
    """Start indices of the tiles covering a volume, in MONAI's sliding-window order.

    Tiles have size `roi_size` and step ``int(roi * (1 - overlap))`` (at least 1); the last tile of each
    axis ends at the volume end. Along an axis where the volume is smaller than the window there is one
    tile at 0 (the volume is padded at its end to the window size).
    """
    if len(image_size) != len(roi_size):
        raise ValueError(f"tile_origins: image size {tuple(image_size)} and roi size {tuple(roi_size)} "
                         "differ in length")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_origins: overlap must be in [0, 1), got {overlap}")
    if any(int(r) < 1 for r in roi_size) or any(int(s) < 1 for s in image_size):
        raise ValueError(f"tile_origins: sizes must be positive, got image {tuple(image_size)}, roi {tuple(roi_size)}")
    padded = tuple(max(int(s), int(r)) for s, r in zip(image_size, roi_size))
    ranges = dense_patch_slices(padded, tuple(int(r) for r in roi_size), _scan_interval(roi_size, overlap),
                                return_slice=False)
    return [tuple(int(start) for start, _ in tile) for tile in ranges]


def box_tile_weights(
    boxes: torch.Tensor,
    tile_size: Sequence[int],
    origin: Sequence[int],
    image_size: Sequence[int],
    sigma_scale: float | None = 0.8,
) -> torch.Tensor:
    """Weight per box [N] from where its centre lies in its tile (see the module docstring).

    `boxes` [N, 2D] are in tile coordinates; `origin` is the tile's start in the volume of `image_size`.
    `sigma_scale` None gives weight 1 everywhere.
    """
    n, dims = boxes.shape[0], boxes.shape[1] // 2
    if sigma_scale is None or n == 0:
        return torch.ones(n, dtype=torch.float32, device=boxes.device)
    tile = torch.as_tensor(tile_size, dtype=torch.float32, device=boxes.device)
    offset = (boxes[:, :dims] + boxes[:, dims:]).float() / 2 - tile / 2
    touches_start = torch.as_tensor([o <= 0 for o in origin], device=boxes.device)
    touches_end = torch.as_tensor([o + t >= s for o, t, s in zip(origin, tile_size, image_size)], device=boxes.device)
    offset = torch.where((offset < 0) & touches_start, torch.zeros_like(offset), offset)
    offset = torch.where((offset > 0) & touches_end, torch.zeros_like(offset), offset)
    sigma = sigma_scale * tile / 2
    return torch.exp(-(offset**2) / (2 * sigma**2)).mean(dim=1)


def _tile_coverage(image_size: Sequence[int], roi_size: Sequence[int],
                   origins: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Per axis, how many distinct tile positions cover each voxel; the tiles form a grid, so the number of
    tiles covering voxel (i, j, k) is the product of the three per-axis counts."""
    coverage = []
    for axis, (size, roi) in enumerate(zip(image_size, roi_size)):
        count = torch.zeros(size, dtype=torch.float64)
        for start in sorted({o[axis] for o in origins}):
            count[start:min(start + roi, size)] += 1
        coverage.append(count)
    return coverage


def _mean_coverage(boxes: torch.Tensor, coverage: list[torch.Tensor]) -> torch.Tensor:
    """Mean number of tiles covering each box [N] (voxels floor(min)..ceil(max), at least one)."""
    mean = torch.ones(boxes.shape[0], dtype=torch.float64)
    dims = len(coverage)
    for axis, count in enumerate(coverage):
        prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(count, 0)])
        lo = boxes[:, axis].floor().long().clamp(0, len(count) - 1)
        hi = torch.maximum(boxes[:, axis + dims].ceil().long().clamp(1, len(count)), lo + 1)
        mean *= (prefix[hi] - prefix[lo]) / (hi - lo)
    return mean.float()


class SlidingWindowBoxInferer:
    """Detect objects in whole volumes with a patch-wise predictor (see the module docstring for the steps).

    Args:
        roi_size: tile size (the predictor's training patch size), e.g. (128, 128, 128).
        overlap: fraction of a tile shared with its neighbour along each axis, in [0, 1).
        sw_batch_size: patches per predictor call.
        mirror_axes: spatial axes (0, 1, 2 of [X, Y, Z]) for mirror test-time augmentation; every
            combination of flips is run, so k axes cost 2**k passes.
        wbc_iou_thresh: IoU above which predictions join one cluster (nnDetection: 0.1).
        score_thresh: merged detections scoring below this are dropped.
        detections_per_image: how many merged detections to keep per image (highest scores).
        border_sigma_scale: width of the tile-border weighting in half-tiles (nnDetection: 0.8);
            None weights every box 1.
        pad_value: value used to pad volumes smaller than the tile.
        device: where patches are sent for the predictor; None keeps each image's device.
        size_divisible: None: every tile has size `roi_size`. An int or one int per axis (a fully
            convolutional predictor's total stride): along an axis where the volume is shorter than
            `roi_size`, the tile shrinks to the volume's length rounded up to a multiple of it (at least two
            multiples, never more than `roi_size`). A 96-slice volume under a 128-voxel window runs the network on
            96/128 of the padded pass's voxels.

    Call: ``inferer(images, predictor) -> list of {"box" [M, 6] float, "label" [M] long,
    "label_scores" [M] float}`` on the CPU, boxes `xyzxyz` in voxels of each full volume.
    `images` is a Tensor [B, C, X, Y, Z] or a list of [C, X, Y, Z] tensors of any sizes; `predictor`
    maps a batch Tensor [b, C, *roi_size] to a list of b detection dicts in patch voxel coordinates.

    Example::

        inferer = SlidingWindowBoxInferer(roi_size=(96, 96, 64), overlap=0.5, mirror_axes=(0, 1, 2))
        detections = inferer(image[None], lambda patches: detector(patches))
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        mirror_axes: Sequence[int] = (),
        wbc_iou_thresh: float = 0.1,
        score_thresh: float = 0.0,
        detections_per_image: int = 100,
        border_sigma_scale: float | None = 0.8,
        pad_value: float = 0.0,
        device: str | torch.device | None = None,
        size_divisible: int | Sequence[int] | None = None,
    ):
        self.roi_size = tuple(int(r) for r in roi_size)
        if any(r < 1 for r in self.roi_size):
            raise ValueError(f"SlidingWindowBoxInferer: roi_size must be positive, got {tuple(roi_size)}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"SlidingWindowBoxInferer: overlap must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"SlidingWindowBoxInferer: sw_batch_size must be >= 1, got {sw_batch_size}")
        dims = len(self.roi_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        if any(a < 0 or a >= dims for a in self.mirror_axes) or len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError(f"SlidingWindowBoxInferer: mirror_axes must be distinct spatial axes in 0..{dims - 1}, "
                             f"got {tuple(mirror_axes)}")
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.wbc_iou_thresh = float(wbc_iou_thresh)
        self.score_thresh = float(score_thresh)
        self.detections_per_image = int(detections_per_image)
        self.border_sigma_scale = border_sigma_scale
        self.pad_value = float(pad_value)
        self.device = device
        if size_divisible is None:
            self.size_divisible = None
        else:
            divisors = (size_divisible,) * dims if isinstance(size_divisible, int) else tuple(size_divisible)
            if len(divisors) != dims or any(int(d) < 1 for d in divisors):
                raise ValueError(f"SlidingWindowBoxInferer: size_divisible must be a positive int or {dims} positive "
                                 f"ints, got {size_divisible!r}")
            self.size_divisible = tuple(int(d) for d in divisors)

    def tile_size(self, image_size: Sequence[int]) -> tuple[int, ...]:
        """The tile used on a volume of `image_size` (see `size_divisible`)."""
        if self.size_divisible is None:
            return self.roi_size
        # at least two strides deep, so the deepest map of a stride-d network keeps more than one voxel
        return tuple(r if s >= r else min(r, max(-(-int(s) // d) * d, 2 * d))
                     for s, r, d in zip(image_size, self.roi_size, self.size_divisible))

    def mirror_combinations(self) -> list[tuple[int, ...]]:
        """Every subset of `mirror_axes` (the empty one is the plain pass)."""
        return [c for k in range(len(self.mirror_axes) + 1) for c in itertools.combinations(self.mirror_axes, k)]

    @torch.no_grad()
    def __call__(self, images, predictor: Callable[[torch.Tensor], list]) -> list[dict[str, torch.Tensor]]:
        if isinstance(images, torch.Tensor):
            if images.ndim != len(self.roi_size) + 2:
                raise ValueError(f"SlidingWindowBoxInferer: expected images [B, C, {len(self.roi_size)} spatial], "
                                 f"got shape {tuple(images.shape)}")
            images = list(images)
        return [self._infer_one(image, predictor, index) for index, image in enumerate(images)]

    def _infer_one(self, image: torch.Tensor, predictor, index: int) -> dict[str, torch.Tensor]:
        dims = len(self.roi_size)
        if hasattr(image, "as_tensor"):  # MetaTensor: plain tensor, metadata is not needed for tiling
            image = image.as_tensor()
        if not isinstance(image, torch.Tensor) or image.ndim != dims + 1:
            raise ValueError(f"SlidingWindowBoxInferer: image {index} must be a tensor [C, {dims} spatial], "
                             f"got {type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
        image_size = tuple(image.shape[1:])
        tile = self.tile_size(image_size)
        device = self.device if self.device is not None else image.device
        padding = [max(0, r - s) for s, r in zip(image_size, tile)]
        if any(padding):
            pad = [p for amount in reversed(padding) for p in (0, amount)]  # F.pad lists the last axis first
            image = F.pad(image, pad, mode="constant", value=self.pad_value)
        origins = tile_origins(image_size, tile, self.overlap)
        mirrors = self.mirror_combinations()
        jobs = [(origin, mirror) for origin in origins for mirror in mirrors]

        boxes, scores, labels, weights = [], [], [], []
        for first in range(0, len(jobs), self.sw_batch_size):
            batch_jobs = jobs[first:first + self.sw_batch_size]
            patches = []
            for origin, mirror in batch_jobs:
                patch = image[(slice(None),) + tuple(slice(o, o + r) for o, r in zip(origin, tile))]
                if mirror:
                    patch = torch.flip(patch, dims=[a + 1 for a in mirror])
                patches.append(patch)
            predictions = predictor(torch.stack(patches).to(device))
            if not isinstance(predictions, (list, tuple)) or len(predictions) != len(batch_jobs):
                raise ValueError(f"SlidingWindowBoxInferer: the predictor must return a list of {len(batch_jobs)} "
                                 f"detection dicts (one per patch), got {type(predictions).__name__} "
                                 f"of length {len(predictions) if hasattr(predictions, '__len__') else '?'}")
            for (origin, mirror), prediction in zip(batch_jobs, predictions):
                tile_boxes, tile_scores, tile_labels, tile_weights = self._tile_to_volume(
                    prediction, origin, mirror, image_size, tile)
                boxes.append(tile_boxes)
                scores.append(tile_scores)
                labels.append(tile_labels)
                weights.append(tile_weights)

        boxes, scores, labels, weights = torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(weights)
        expected = len(mirrors) * _mean_coverage(boxes, _tile_coverage(image_size, tile, origins))
        merged_boxes, merged_scores, merged_labels = weighted_box_clustering(
            boxes, scores, labels, weights=weights, iou_thresh=self.wbc_iou_thresh,
            score_thresh=self.score_thresh, num_expected=expected)
        keep = slice(0, self.detections_per_image)
        return {"box": merged_boxes[keep].float(), "label": merged_labels[keep].long(),
                "label_scores": merged_scores[keep].float()}

    def _tile_to_volume(self, prediction, origin, mirror, image_size, tile_size):
        """One patch's detections -> (boxes in the volume, scores, labels, tile weights), all on the CPU."""
        dims = len(self.roi_size)
        for key in ("box", "label", "label_scores"):
            if not isinstance(prediction, dict) or key not in prediction:
                raise ValueError(f"SlidingWindowBoxInferer: each prediction must be a dict with 'box', 'label' and "
                                 f"'label_scores'; got {type(prediction).__name__} "
                                 f"{sorted(prediction) if isinstance(prediction, dict) else ''}")
        boxes = torch.as_tensor(prediction["box"]).detach().float().cpu().reshape(-1, 2 * dims).clone()
        scores = torch.as_tensor(prediction["label_scores"]).detach().float().cpu().reshape(-1)
        labels = torch.as_tensor(prediction["label"]).detach().long().cpu().reshape(-1)
        if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
            raise ValueError(f"SlidingWindowBoxInferer: prediction has {boxes.shape[0]} boxes, {scores.shape[0]} "
                             f"scores and {labels.shape[0]} labels")
        for axis in mirror:  # a box [lo, hi) in a mirrored patch of width W was [W - hi, W - lo)
            width = tile_size[axis]
            boxes[:, [axis, axis + dims]] = width - boxes[:, [axis + dims, axis]]
        tile = torch.as_tensor(tile_size, dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), torch.cat([tile, tile]))
        weights = box_tile_weights(boxes, tile_size, origin, image_size, self.border_sigma_scale)
        shift = torch.as_tensor(origin, dtype=torch.float32)
        limit = torch.as_tensor(image_size, dtype=torch.float32)
        boxes = torch.minimum(boxes + torch.cat([shift, shift]), torch.cat([limit, limit]))
        keep = ((boxes[:, dims:] - boxes[:, :dims]) > 1e-2).all(dim=1)  # cut away by clipping (or empty)
        return boxes[keep], scores[keep], labels[keep], weights[keep]
