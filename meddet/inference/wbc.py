"""Weighted box clustering (WBC): merge overlapping predictions of tiles and test-time augmentations.

The algorithm follows nnDetection's `batched_wbc` (per class, IoU threshold 0.1 in its default
ensembling parameters, missing-prediction weight 1):

1. sort the boxes of one class by score, highest first;
2. the highest unclustered box seeds a cluster; every unclustered box with IoU > `iou_thresh` against the
   seed joins it; repeat with the next unclustered box;
3. each member gets a match weight ``m = IoU(member, seed) * weight`` (the seed has IoU 1);
4. merged box = mean of member coordinates weighted by ``m * score``;
5. merged score = ``sum(m * score) / (sum(m) + n_missing * mean(m))`` with
   ``n_missing = max(0, n_expected - n_members)`` and ``n_expected`` the mean over members of the number
   of predictions expected at that position (tile overlap x test-time augmentation passes), so a lesion
   seen by only one of eight mirrored passes scores an eighth of a lesion seen by all eight;
6. merged boxes scoring below `score_thresh` are dropped.

Step 2 is greedy NMS in disguise: the seeds are exactly the boxes NMS keeps, and each other box belongs to
the first seed (in score order) that overlaps it. That lets us work block-wise without an N x N IoU matrix:
a block of boxes (in score order) is compared with the seeds found so far ([block, seeds] IoU); the boxes
no earlier seed claims are resolved among themselves with the fixed-point form of greedy NMS (iterate
``keep_j = not any_i<j (keep_i and IoU_ij > t)`` until stable; it equals the sequential result because
entry j only depends on entries before it). Seeds far from a block are skipped by sorting along x (see
`_overlapping_pairs`), so 10k predictions spread over a volume merge in a fraction of a second on one core.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data.box_utils import box_iou

__all__ = ["weighted_box_clustering"]

_BLOCK = 512  # boxes per block: bounds memory at [block, seeds] IoU values, keeps Python iterations few
_RUN = 64  # neighbouring boxes (along x) tested together against the seeds within their reach


def _as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if device is not None:
        x = x.to(device)
    return x if dtype is None else x.to(dtype)


def _score_order(boxes: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Indices sorting by score (descending), ties broken by weight and coordinates, so the result does not
    depend on the order the boxes came in."""
    order = torch.arange(len(scores), device=scores.device)
    keys = [boxes[:, k] for k in reversed(range(boxes.shape[1]))] + [-weights, -scores]
    for key in keys:  # least significant key first; stable sorts keep earlier orderings among ties
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _overlapping_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, iou_thresh: float):
    """Pairs (i, j) with IoU(boxes1[i], boxes2[j]) > iou_thresh, as (rows, cols, iou) 1-D tensors.

    Far-apart boxes (the common case in a whole volume) are barely looked at: both sets are sorted along
    x, `boxes1` is taken in runs of neighbours, and each run is tested (interval overlap in every axis)
    only against the slice of `boxes2` that can reach it along x. The IoU is computed for the pairs that
    intersect.
    """
    half = boxes1.shape[1] // 2
    order1 = torch.argsort(boxes1[:, 0])
    order2 = torch.argsort(boxes2[:, 0])
    columns1 = boxes1[order1].t().contiguous()  # [2D, n1], contiguous rows make the broadcast tests fast
    columns2 = boxes2[order2].t().contiguous()
    widest = float((columns2[half] - columns2[0]).max())
    # boxes2[j] can meet a box along x only if lo - widest < lo2[j] < hi
    begins = torch.searchsorted(columns2[0], columns1[0] - widest, right=True).tolist()
    ends = torch.searchsorted(columns2[0], torch.cummax(columns1[half], 0).values, right=False).tolist()
    rows, cols = [], []
    for first in range(0, boxes1.shape[0], _RUN):
        last = min(first + _RUN, boxes1.shape[0])
        begin, end = begins[first], ends[last - 1]  # lo sorted: the first box reaches lowest, cummax the highest
        if end <= begin:
            continue
        run, candidates = columns1[:, first:last, None], columns2[:, None, begin:end]
        touching = torch.lt(run[0], candidates[half]) & torch.lt(candidates[0], run[half])
        for axis in range(1, half):
            touching &= torch.lt(run[axis], candidates[axis + half])
            touching &= torch.lt(candidates[axis], run[axis + half])
        r, c = torch.nonzero(touching, as_tuple=True)
        rows.append(r + first)
        cols.append(c + begin)
    if not rows:
        empty = torch.empty(0, dtype=torch.long, device=boxes1.device)
        return empty, empty, torch.empty(0, dtype=torch.float32, device=boxes1.device)
    rows, cols = torch.cat(rows), torch.cat(cols)
    a, b = columns1[:, rows].float(), columns2[:, cols].float()  # [2D, pairs]
    inter = (torch.minimum(a[half:], b[half:]) - torch.maximum(a[:half], b[:half])).prod(dim=0)
    volume_a = (a[half:] - a[:half]).prod(dim=0)
    volume_b = (b[half:] - b[:half]).prod(dim=0)
    iou = inter / (volume_a + volume_b - inter + torch.finfo(torch.float32).eps)
    keep = iou > iou_thresh
    return order1[rows[keep]], order2[cols[keep]], iou[keep]


def _cluster_ids(boxes: torch.Tensor, iou_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy clustering of score-sorted boxes [n, 2D].

    Returns (cluster [n] long in 0..S-1, numbered in seed order; iou_with_seed [n]; seed positions [S]).
    """
    n = boxes.shape[0]
    device = boxes.device
    seed_of = torch.empty(n, dtype=torch.long, device=device)
    iou_with_seed = torch.empty(n, dtype=torch.float32, device=device)
    seeds = torch.empty(0, dtype=torch.long, device=device)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        block = boxes[start:stop]
        owner = torch.full((stop - start,), -1, dtype=torch.long, device=device)
        owner_iou = torch.ones(stop - start, dtype=torch.float32, device=device)
        if seeds.numel() > 0:
            rows, cols, iou = _overlapping_pairs(block, boxes[seeds], iou_thresh)  # cols = seed ranks
            if rows.numel() > 0:
                first = torch.full((stop - start,), seeds.numel(), dtype=torch.long, device=device)
                first.scatter_reduce_(0, rows, cols, reduce="amin")  # highest-scoring overlapping seed
                chosen = cols == first[rows]
                owner[rows[chosen]] = seeds[cols[chosen]]
                owner_iou[rows[chosen]] = iou[chosen]
        free = torch.nonzero(owner < 0).flatten()
        if free.numel() > 0:
            iou = box_iou(block[free], block[free]).float()  # [f, f]
            later = torch.triu(iou > iou_thresh, diagonal=1)  # row i overlaps a lower-ranked column j
            keep = torch.ones(free.numel(), dtype=torch.bool, device=device)
            while True:
                new_keep = ~(later & keep[:, None]).any(dim=0)
                if torch.equal(new_keep, keep):
                    break
                keep = new_keep
            claim = later & keep[:, None]
            claim.diagonal().copy_(keep)  # a kept box claims itself
            first = claim.to(torch.uint8).argmax(dim=0)  # first kept row claiming each column
            owner[free] = start + free[first]
            columns = torch.arange(free.numel(), device=device)
            owner_iou[free] = torch.where(keep, torch.ones_like(iou[0]), iou[first, columns])
            seeds = torch.cat([seeds, start + free[keep]])
        seed_of[start:stop] = owner
        iou_with_seed[start:stop] = owner_iou
    cluster_of_seed = torch.full((n,), -1, dtype=torch.long, device=device)
    cluster_of_seed[seeds] = torch.arange(seeds.numel(), device=device)
    return cluster_of_seed[seed_of], iou_with_seed, seeds


def _merge_one_class(boxes, scores, weights, expected, iou_thresh, missing_weight):
    """Cluster and consolidate boxes of one class (already score-sorted). Returns (boxes [S, 2D], scores [S])."""
    cluster, iou_with_seed, seeds = _cluster_ids(boxes, iou_thresh)
    n_clusters = seeds.numel()
    dtype = torch.float64 if boxes.device.type == "cpu" else torch.float32
    b, s, w, e = boxes.to(dtype), scores.to(dtype), weights.to(dtype), expected.to(dtype)
    match = iou_with_seed.to(dtype) * w
    match_score = match * s

    def per_cluster(values):
        out = torch.zeros((n_clusters,) + values.shape[1:], dtype=dtype, device=boxes.device)
        return out.index_add_(0, cluster, values)

    count = per_cluster(torch.ones_like(s))
    sum_match = per_cluster(match)
    sum_match_score = per_cluster(match_score)
    n_missing = (per_cluster(e) / count - count).clamp(min=0)
    denominator = sum_match + n_missing * (sum_match / count) * missing_weight
    merged_scores = torch.where(denominator > 0, sum_match_score / denominator.clamp(min=1e-30),
                                torch.zeros_like(denominator))
    weighted_coords = per_cluster(b * match_score[:, None])
    # a cluster whose members all have zero weight or score keeps its seed box instead of dividing by zero
    merged_boxes = torch.where((sum_match_score > 0)[:, None],
                               weighted_coords / sum_match_score.clamp(min=1e-30)[:, None], b[seeds])
    return merged_boxes.to(boxes.dtype), merged_scores.to(scores.dtype)


def weighted_box_clustering(
    boxes,
    scores,
    labels,
    weights=None,
    iou_thresh: float = 0.1,
    score_thresh: float = 0.0,
    num_expected=1.0,
    missing_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge overlapping boxes of the same class by weighted box clustering (see the module docstring).

    Args:
        boxes: [N, 6] `xyzxyz` boxes (or [N, 4] `xyxy`), tensor or array, CPU or GPU.
        scores: [N] scores in [0, 1].
        labels: [N] integer class ids; boxes of different classes never merge.
        weights: [N] per-box weights (e.g. tile-border weighting); None means all ones.
        iou_thresh: a box joins a cluster when its IoU with the seed is strictly greater than this
            (nnDetection's default 0.1).
        score_thresh: merged boxes scoring below this are dropped.
        num_expected: how many predictions of one object are expected at a position (number of test-time
            augmentation passes x tiles covering it); a float, or [N] per box (averaged per cluster).
        missing_weight: how strongly missing predictions lower the merged score (1 = as a zero-score vote).

    Returns:
        (boxes [M, 2D], scores [M], labels [M] long), sorted by score (highest first), on the input's device.
    """
    boxes = _as_tensor(boxes)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    device = boxes.device
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise ValueError(f"weighted_box_clustering: boxes must have shape [N, 6] (or [N, 4]), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    scores = _as_tensor(scores, device=device).reshape(-1)
    scores = scores if scores.is_floating_point() else scores.float()
    labels = _as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    weights = (torch.ones(n, dtype=scores.dtype, device=device) if weights is None
               else _as_tensor(weights, dtype=scores.dtype, device=device).reshape(-1))
    expected = _as_tensor(num_expected, dtype=scores.dtype, device=device).reshape(-1)
    if expected.numel() == 1:
        expected = expected.expand(n)
    for name, values in (("scores", scores), ("labels", labels), ("weights", weights), ("num_expected", expected)):
        if values.numel() != n:
            raise ValueError(f"weighted_box_clustering: {name} has {values.numel()} entries but there are {n} boxes")
    if not 0.0 <= iou_thresh < 1.0:
        raise ValueError(f"weighted_box_clustering: iou_thresh must be in [0, 1), got {iou_thresh}")
    half = boxes.shape[1] // 2
    if n and (boxes[:, half:] < boxes[:, :half]).any():
        raise ValueError("weighted_box_clustering: some boxes have max < min; "
                         "boxes must be `xyzxyz` with positive size")
    if n and (weights < 0).any():
        raise ValueError("weighted_box_clustering: weights must be non-negative")

    out_boxes, out_scores, out_labels = [], [], []
    for label in torch.unique(labels):
        idx = torch.nonzero(labels == label).flatten()
        idx = idx[_score_order(boxes[idx], scores[idx], weights[idx])]
        merged_boxes, merged_scores = _merge_one_class(boxes[idx], scores[idx], weights[idx], expected[idx],
                                                       iou_thresh, missing_weight)
        out_boxes.append(merged_boxes)
        out_scores.append(merged_scores)
        out_labels.append(torch.full_like(merged_scores, int(label), dtype=torch.long))
    if not out_boxes:
        return boxes.new_zeros((0, boxes.shape[1])), scores.new_zeros((0,)), labels.new_zeros((0,))
    merged_boxes, merged_scores, merged_labels = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    keep = merged_scores >= score_thresh
    merged_boxes, merged_scores, merged_labels = merged_boxes[keep], merged_scores[keep], merged_labels[keep]
    order = torch.sort(merged_scores, descending=True, stable=True).indices
    return merged_boxes[order], merged_scores[order], merged_labels[order]
