"""Anchor planning from training box sizes, and the MONAI anchor generator built from the plan.

Anchors follow nnDetection's scheme: one set of base shapes ``[w, h, d]`` for the first (finest) detection
level, made of every combination of ``num_per_axis`` widths, heights and depths (27 by default); coarser
levels reuse the same shapes multiplied by their level scale (stride relative to the first level).

Planning maximises the mean over training boxes of the best *centred* IoU between a box and any anchor of
any level (both boxes centred at the same point, so only sizes matter). The search is a coordinate descent
over even integer sizes, started from per-axis quantiles: MONAI's `AnchorGeneratorWithAnchorShape` rounds
half-sizes to integers, so even sizes are the ones it represents exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

_MAX_PLANNING_BOXES = 5000  # more boxes than this are subsampled (fixed seed): the optimum barely moves
_MAX_CANDIDATES_PER_AXIS = 40  # even sizes tried per axis, geometrically spaced when the range is large


def _check_box_sizes(box_sizes) -> np.ndarray:
    sizes = np.asarray(box_sizes, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape[1] != 3:
        raise ValueError(f"box_sizes must have shape [N, 3] (voxel sizes w, h, d), got shape {sizes.shape}")
    if sizes.shape[0] == 0:
        raise ValueError("box_sizes is empty: anchors cannot be planned without at least one training box")
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError("box_sizes must be finite and strictly positive (voxel sizes at the training spacing)")
    return sizes


def _all_anchor_shapes(anchor_shapes, level_scales) -> np.ndarray:
    """[S, 3] base shapes x [L] scales -> [L * S, 3] anchor sizes of every level."""
    shapes = np.asarray(anchor_shapes, dtype=np.float64).reshape(-1, 3)
    scales = np.asarray(level_scales, dtype=np.float64).reshape(-1, 1, 1)
    return (scales * shapes[None]).reshape(-1, 3)


def _centred_iou(box_sizes: np.ndarray, anchor_sizes: np.ndarray) -> np.ndarray:
    """IoU of boxes and anchors sharing a centre: [..., N, 3] x [..., A, 3] -> [..., N, A]."""
    inter = np.prod(np.minimum(box_sizes[..., :, None, :], anchor_sizes[..., None, :, :]), axis=-1)
    union = np.prod(box_sizes, axis=-1)[..., :, None] + np.prod(anchor_sizes, axis=-1)[..., None, :] - inter
    return inter / union


def anchor_coverage(box_sizes, anchor_shapes, level_scales: Sequence[float] = (1, 2, 4, 8)) -> float:
    """Mean over boxes of the best centred IoU with any anchor of any level.

    Args:
        box_sizes: [N, 3] box sizes in voxels (w, h, d along array axes x, y, z).
        anchor_shapes: [S, 3] base anchor shapes of the first detection level.
        level_scales: multiplier of the base shapes for each detection level.
    """
    sizes = _check_box_sizes(box_sizes)
    return float(_centred_iou(sizes, _all_anchor_shapes(anchor_shapes, level_scales)).max(axis=1).mean())


def _even_round(values: np.ndarray) -> np.ndarray:
    return np.maximum(2, 2 * np.round(np.asarray(values, dtype=np.float64) / 2.0)).astype(np.int64)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted even sizes made pairwise distinct by pushing repeats up by 2."""
    values = np.sort(values)
    for i in range(1, len(values)):
        values[i] = max(values[i], values[i - 1] + 2)
    return values


def _size_candidates(largest: float) -> np.ndarray:
    """Even sizes from 2 to the largest box size rounded up: all of them, or a geometric subset for large
    ranges."""
    top = max(2, 2 * int(np.ceil(largest / 2.0)))
    if top // 2 <= _MAX_CANDIDATES_PER_AXIS:
        return np.arange(2, top + 1, 2)
    return np.unique(_even_round(np.geomspace(2, top, _MAX_CANDIDATES_PER_AXIS)))


def _combine(axis_values: list[np.ndarray]) -> np.ndarray:
    """Per-axis candidate lists -> [n_w * n_h * n_d, 3] shapes, widths varying slowest."""
    grid = np.meshgrid(*axis_values, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1)


def plan_anchor_shapes(
    box_sizes, level_scales: Sequence[float] = (1, 2, 4, 8), num_per_axis: int = 3, max_sweeps: int = 20
) -> list[list[int]]:
    """Plan ``num_per_axis ** 3`` base anchor shapes for the first detection level.

    Args:
        box_sizes: [N, 3] float box sizes in voxels at the training spacing (w, h, d along x, y, z).
        level_scales: anchor scale of each detection level relative to the first (strides 4, 8, 16, 32 ->
            1, 2, 4, 8).
        num_per_axis: number of candidate sizes per axis; the shapes are all their combinations.
        max_sweeps: upper bound on coordinate-descent sweeps (it usually converges in a few).

    Returns:
        ``num_per_axis ** 3`` shapes ``[w, h, d]``: even integers >= 2, widths varying slowest, then heights,
        then depths. Multiplying them by ``level_scales`` gives the anchors of every level.

    Steps:
        1. start each axis at the (2i + 1) / (2 num_per_axis) quantiles of the box sizes on that axis
           (rounded to even sizes, repeats pushed apart);
        2. repeatedly replace one per-axis value at a time by the even integer that maximises the mean best
           centred IoU (candidates: 2 .. the largest box size on that axis rounded up, a geometric subset of 40
           for large ranges, minus the sizes held by the other values of that axis), until a sweep changes
           nothing. This finds a local optimum; boxes beyond 5000 are subsampled with a fixed seed.
    """
    sizes = _check_box_sizes(box_sizes)
    if num_per_axis < 1:
        raise ValueError(f"num_per_axis must be >= 1, got {num_per_axis}")
    scales = np.asarray(level_scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or np.any(scales <= 0):
        raise ValueError(f"level_scales must be a non-empty sequence of positive numbers, got {level_scales}")
    if sizes.shape[0] > _MAX_PLANNING_BOXES:
        rows = np.random.default_rng(0).choice(sizes.shape[0], _MAX_PLANNING_BOXES, replace=False)
        sizes = sizes[rows]

    quantiles = (2 * np.arange(num_per_axis) + 1) / (2.0 * num_per_axis)
    axis_values = [_distinct(_even_round(np.quantile(sizes[:, axis], quantiles))) for axis in range(3)]
    candidates = [np.union1d(_size_candidates(sizes[:, axis].max()), axis_values[axis]) for axis in range(3)]

    def score(values: list[np.ndarray]) -> float:
        return float(_centred_iou(sizes, _all_anchor_shapes(_combine(values), scales)).max(axis=1).mean())

    best = score(axis_values)
    for _ in range(max_sweeps):
        improved = False
        for axis in range(3):
            for slot in range(num_per_axis):
                # Only the shapes using this slot change; the best IoU over all other anchors is fixed.
                shapes = _combine(axis_values)
                uses_slot = shapes[:, axis] == axis_values[axis][slot]
                others = shapes[~uses_slot]
                fixed = (
                    _centred_iou(sizes, _all_anchor_shapes(others, scales)).max(axis=1)
                    if len(others)
                    else np.zeros(len(sizes))
                )
                varying = np.repeat(shapes[uses_slot][None], len(candidates[axis]), axis=0).astype(np.float64)
                varying[:, :, axis] = candidates[axis][:, None]
                varying_all_levels = (scales[None, :, None, None] * varying[:, None]).reshape(len(varying), -1, 3)
                trial = _centred_iou(sizes[None], varying_all_levels).max(axis=2)  # [C, N]
                means = np.maximum(trial, fixed[None]).mean(axis=1)
                # Sizes held by the other slots of this axis are excluded: a repeated size wastes anchors.
                means[np.isin(candidates[axis], np.delete(axis_values[axis], slot))] = -np.inf
                choice = int(np.argmax(means))
                if means[choice] > best + 1e-9:
                    axis_values[axis] = axis_values[axis].copy()
                    axis_values[axis][slot] = candidates[axis][choice]
                    best = float(means[choice])
                    improved = True
        if not improved:
            break
    axis_values = [np.sort(values) for values in axis_values]
    return [[int(v) for v in shape] for shape in _combine(axis_values)]


def build_anchor_generator(
    anchor_shapes: Sequence[Sequence[float]], level_scales: Sequence[float] = (1, 2, 4, 8)
) -> AnchorGeneratorWithAnchorShape:
    """MONAI anchor generator for ``anchor_shapes`` (first level) scaled by ``level_scales``.

    Anchors come out per level in the order (x, y, z, anchor) with the anchor index fastest, centred at
    ``index * stride + stride // 2`` along each array axis ("ij" indexing keeps our [B, C, X, Y, Z] axes).
    Odd sizes are rounded by MONAI (half-sizes are rounded to integers), hence the even shapes from
    `plan_anchor_shapes`.
    """
    shapes = np.asarray(anchor_shapes, dtype=np.float64)
    if shapes.ndim != 2 or shapes.shape[1] != 3 or shapes.shape[0] == 0:
        raise ValueError(f"anchor_shapes must be a non-empty list of [w, h, d], got shape {shapes.shape}")
    if np.any(shapes <= 0):
        raise ValueError("anchor_shapes must be strictly positive")
    return AnchorGeneratorWithAnchorShape(
        feature_map_scales=tuple(level_scales),
        base_anchor_shapes=[[float(v) for v in shape] for shape in shapes],
        indexing="ij",
    )
