"""Box-based FROC: sensitivity at fixed numbers of false positives per scan, and their mean (CPM score).

Matching, per scan and class (detections of one class never hit a ground truth of another; the FROC pools
all classes, every object weighing the same, as nnDetection's pooled FROC):

1. detections are visited from the highest score down (stable sort, so ties keep their input order);
2. a detection *hits* a ground truth when
   - ``criterion="iou"``: their IoU >= ``iou_thresh`` (0.1 by default, nnDetection's FROC threshold), or
   - ``criterion="center_distance"``: the detection centre lies strictly inside the sphere around the
     ground-truth centre whose radius is half the *mean* of the ground truth's three sizes (LUNA16 CPM
     counts a candidate within the annotated nodule's radius, diameter_mm / 2; for the box around a sphere
     all three sizes equal the diameter; the mean is the rotation-neutral choice for other shapes, while
     the max would let elongated lesions swallow distant detections). Distances are measured in the box
     frame, so pass world (mm) boxes when voxels are anisotropic;
3. a detection that hits a ground truth not matched yet is a true positive and takes the best such
   ground truth (highest IoU / nearest centre);
4. a detection that hits only ground truths already matched (a duplicate) is
   - a false positive with ``duplicate_hits="false_positive"``: nnDetection's convention, which runs the
     COCO matcher at IoU 0.1 (MONAI's `matching_batch` gives the same flags), default for ``"iou"``;
   - ignored (neither TP nor FP) with ``duplicate_hits="ignore"``: LUNA16's official evaluation,
     default for ``"center_distance"``;
5. any other detection is a false positive.

The curve has one operating point per distinct score (all detections scoring >= s), starting at (0, 0);
FP per scan = FP / number of scans (scans without ground truth and without detections count),
sensitivity = TP / number of ground truths. Sensitivities at the requested rates are linearly
interpolated between operating points (`numpy.interp`, as nnDetection and the LUNA16 script): at a rate
where the curve jumps, the upper value counts, and beyond the last operating point the final
sensitivity is carried on. Without any ground truth every sensitivity is 0 (nnDetection's convention).

`monai.metrics.froc.compute_froc_curve_data` is not used: it skips the lowest score present (CAMELYON
style, where a 0 in `tp_probs` marks each missed target), so unless some target is missed it drops the
operating point "all detections": one scan with a FP at 0.9 and its only GT found at 0.3 gives
sensitivity 0 at 1 FP/scan instead of 1. Its per-target `tp_probs` also cannot express duplicates counted
as false positives, and it divides by zero without targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.data.box_utils import box_iou

from meddet.metrics.coco import detections_to_numpy

__all__ = ["FROC_FP_RATES", "froc", "froc_curve", "match_detections"]

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1
_CRITERIA = ("iou", "center_distance")
_DUPLICATE_RULES = ("false_positive", "ignore")


def _hit_quality(pred_boxes: np.ndarray, gt_boxes: np.ndarray, criterion: str, iou_thresh: float):
    """Per pair: whether it is a hit, and a quality where larger is better (to pick among hits)."""
    if criterion == "iou":
        # the same IoU as the COCO matcher (MONAI, float32) so that both agree on every hit
        iou = np.asarray(box_iou(pred_boxes, gt_boxes), dtype=np.float64)
        return iou >= iou_thresh, iou
    pred_centres = (pred_boxes[:, :3] + pred_boxes[:, 3:]) / 2
    gt_centres = (gt_boxes[:, :3] + gt_boxes[:, 3:]) / 2
    gt_radii = np.mean(gt_boxes[:, 3:] - gt_boxes[:, :3], axis=1) / 2
    distance = np.linalg.norm(pred_centres[:, None, :] - gt_centres[None, :, :], axis=-1)
    return distance < gt_radii[None, :], -distance


def _resolve(criterion: str, duplicate_hits: str | None) -> str:
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    if duplicate_hits is None:
        return "false_positive" if criterion == "iou" else "ignore"
    if duplicate_hits not in _DUPLICATE_RULES:
        raise ValueError(f"duplicate_hits must be one of {_DUPLICATE_RULES} or None, got {duplicate_hits!r}")
    return duplicate_hits


def match_detections(
    pred_boxes,
    pred_labels,
    pred_scores,
    gt_boxes,
    gt_labels,
    criterion: str = "iou",
    iou_thresh: float = 0.1,
    duplicate_hits: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one scan's detections to its ground truths (steps 1-5 of the module docstring).

    Args:
        pred_boxes: [N, 6] `xyzxyz` detections; pred_labels [N]; pred_scores [N].
        gt_boxes: [G, 6] `xyzxyz` ground truths; gt_labels [G].
        criterion: ``"iou"`` or ``"center_distance"``.
        iou_thresh: minimum IoU of a hit for ``criterion="iou"``.
        duplicate_hits: ``"false_positive"``, ``"ignore"`` or None (the criterion's convention).

    Returns:
        status: int [N] in the input order, 1 = true positive, 0 = false positive, -1 = ignored duplicate;
        gt_matched: bool [G], whether each ground truth was found.
    """
    duplicate_rule = _resolve(criterion, duplicate_hits)
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 6)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 6)
    pred_labels = np.asarray(pred_labels).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)

    status = np.full(len(pred_boxes), FALSE_POSITIVE, dtype=np.int64)
    gt_matched = np.zeros(len(gt_boxes), dtype=bool)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return status, gt_matched

    hits, quality = _hit_quality(pred_boxes, gt_boxes, criterion, iou_thresh)
    hits &= pred_labels[:, None] == gt_labels[None, :]
    for det in np.argsort(-pred_scores, kind="mergesort"):
        if not hits[det].any():
            continue
        open_hits = hits[det] & ~gt_matched
        if open_hits.any():
            best = int(np.argmax(np.where(open_hits, quality[det], -np.inf)))
            gt_matched[best] = True
            status[det] = TRUE_POSITIVE
        elif duplicate_rule == "ignore":
            status[det] = IGNORED
    return status, gt_matched


def froc_curve(statuses: Sequence[np.ndarray], scores: Sequence[np.ndarray], num_gt: int, num_images: int):
    """FROC operating points from per-detection flags pooled over scans.

    Args:
        statuses: per scan, int [N] from `match_detections` (1 TP, 0 FP, -1 ignored).
        scores: per scan, float [N] detection scores.
        num_gt: ground truths in the whole set; num_images: scans in the whole set.

    Returns:
        fps_per_scan, sensitivity: float arrays [P + 1], non-decreasing, starting at (0, 0), one point per
        distinct score (all detections with score >= that score).
    """
    status = np.concatenate([np.asarray(s).reshape(-1) for s in statuses] + [np.zeros(0, dtype=np.int64)])
    score = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in scores] + [np.zeros(0)])
    counted = status != IGNORED
    status, score = status[counted], score[counted]
    order = np.argsort(-score, kind="mergesort")
    status, score = status[order], score[order]
    cum_tp = np.cumsum(status == TRUE_POSITIVE)
    cum_fp = np.cumsum(status == FALSE_POSITIVE)
    # one operating point per distinct score: the last detection of each run of equal scores
    last_of_tie = np.r_[score[1:] != score[:-1], True] if len(score) else np.zeros(0, dtype=bool)
    fps = np.r_[0.0, cum_fp[last_of_tie] / max(num_images, 1)]
    sensitivity = np.r_[0.0, cum_tp[last_of_tie] / num_gt] if num_gt > 0 else np.zeros(1 + last_of_tie.sum())
    return fps, sensitivity


def froc(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    criterion: str = "iou",
    iou_thresh: float = 0.1,
    fp_rates: Sequence[float] = FROC_FP_RATES,
    box_mode: str = "xyzxyz",
    duplicate_hits: str | None = None,
) -> dict:
    """FROC of per-scan predictions against ground truths.

    Args:
        predictions: per-scan dicts ``"box"`` [N, 6], ``"label"`` [N], ``"label_scores"`` [N].
        ground_truths: per-scan dicts ``"box"`` [G, 6], ``"label"`` [G], aligned with ``predictions``.
        criterion, iou_thresh, duplicate_hits: see `match_detections`.
        fp_rates: false positives per scan at which sensitivity is read (default 1/8 ... 8).
        box_mode: MONAI mode of all boxes (``"xyzxyz"``, ``"cccwhd"``, ...).

    Returns:
        dict with ``froc_fp_rates`` (list), ``froc_sensitivities`` (list, one per rate), ``froc_score``
        (their mean), ``curve_fps_per_scan`` and ``curve_sensitivity`` (operating points, lists),
        ``num_images``, ``num_gt``, ``num_tp``, ``num_fp`` (over all detections), ``froc_criterion``,
        ``froc_duplicate_hits`` and, for the IoU criterion, ``froc_iou_thresh``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground truths must be aligned per scan: {len(predictions)} vs {len(ground_truths)}"
        )
    duplicate_rule = _resolve(criterion, duplicate_hits)
    preds = detections_to_numpy(predictions, "prediction", box_mode)
    gts = detections_to_numpy(ground_truths, "ground truth", box_mode)

    statuses = [
        match_detections(
            p["box"], p["label"], p["label_scores"], g["box"], g["label"], criterion, iou_thresh, duplicate_rule
        )[0]
        for p, g in zip(preds, gts)
    ]
    num_gt = int(sum(len(g["label"]) for g in gts))
    fps, sensitivity = froc_curve(statuses, [p["label_scores"] for p in preds], num_gt, len(gts))
    sens_at_rates = np.interp(np.asarray(fp_rates, dtype=np.float64), fps, sensitivity)
    all_status = np.concatenate([np.zeros(0, dtype=np.int64)] + statuses)
    result = {
        "froc_fp_rates": [float(r) for r in fp_rates],
        "froc_sensitivities": [float(s) for s in sens_at_rates],
        "froc_score": float(np.mean(sens_at_rates)) if len(sens_at_rates) else 0.0,
        "curve_fps_per_scan": fps.tolist(),
        "curve_sensitivity": sensitivity.tolist(),
        "num_images": len(gts),
        "num_gt": num_gt,
        "num_tp": int(np.sum(all_status == TRUE_POSITIVE)),
        "num_fp": int(np.sum(all_status == FALSE_POSITIVE)),
        "froc_criterion": criterion,
        "froc_duplicate_hits": duplicate_rule,
    }
    if criterion == "iou":
        result["froc_iou_thresh"] = float(iou_thresh)
    return result
