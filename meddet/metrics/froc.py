"""Box-based FROC: sensitivity at fixed numbers of false positives per scan, and their mean (CPM score).

Two matching rules, per scan and class (detections of one class never hit a ground truth of another; the
FROC pools all classes, every object weighing the same, as nnDetection's pooled FROC):

``criterion="iou"`` (nnDetection), `match_detections`:

1. detections are visited from the highest score down (stable sort, so ties keep their input order);
2. a detection *hits* a ground truth when their IoU >= ``iou_thresh`` (0.1 by default);
3. a detection that hits a ground truth not matched yet is a true positive and takes the best such
   ground truth (highest IoU); the ground truth is found at that detection's score;
4. a detection that hits only ground truths already matched (a duplicate) is a false positive with
   ``duplicate_hits="false_positive"`` (nnDetection, which runs the COCO matcher at IoU 0.1; MONAI's
   `matching_batch` gives the same flags; the default) or ignored with ``duplicate_hits="ignore"``;
5. a detection that hits no ground truth but an ignore region (IoU >= ``iou_thresh``) is ignored;
6. any other detection is a false positive.

``criterion="center_distance"`` (the LUNA16 challenge's official rules, `match_by_center_distance`):

1. per scan and class, only the candidates scoring strictly above the 101st highest score are kept
   (at most 100; ties at the cut are all dropped, as the official script does);
2. a candidate hits a ground truth when its centre lies strictly inside the sphere around the ground
   truth's centre whose radius is half the ground truth's diameter: half the *mean* of its three sizes
   (a LUNA16 nodule box is the cube of its diameter; the mean is the rotation-neutral choice for other
   shapes, while the max would let elongated lesions swallow distant detections). Distances are measured
   in the box frame, so pass world (mm) boxes when voxels are anisotropic;
3. each ground truth is found at the highest score of all candidates hitting it; one candidate may hit
   several ground truths (overlapping nodules), and further hits on a found ground truth are neither true
   nor false positives;
4. a candidate hitting no ground truth but an ignore region (LUNA16's excluded findings, the same sphere
   rule) is ignored; every other candidate is a false positive.

Ignore regions are optional ``"ignore_box"`` entries of the ground-truth dicts, class-agnostic.

The curve is the LUNA16 script's: one operating point per distinct score of the counted entries (every
found ground truth at its score, every false positive at its score), as scikit-learn's ``roc_curve``
(collinear points dropped) with FP per scan computed as ``(k / F) * F / N`` and sensitivity as
``(t / T) * T / G`` (F false positives, T found of G ground truths, N scans: the same floating-point
steps, so a rate that lands exactly on a step reads the same value as the official script). Scans
without ground truth and without detections count in N. Sensitivities at the requested rates are read
by `numpy.interp`: at a rate where the curve jumps, the upper value counts, and beyond the last
operating point the final sensitivity is carried on. Without false positives the whole curve sits at 0
FP per scan (the official script's special case); when nothing is found, or there is no ground truth,
every sensitivity is 0 (the official script gives NaN for the former; 0 is the value the curve has).

`monai.metrics.froc.compute_froc_curve_data` is not used: it skips the lowest score present (CAMELYON
style, where a 0 in `tp_probs` marks each missed target), so unless some target is missed it drops the
operating point "all detections": one scan with a FP at 0.9 and its only GT found at 0.3 gives
sensitivity 0 at 1 FP/scan instead of 1. It also divides by zero without targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.data.box_utils import box_iou

from meddet.metrics.coco import detections_to_numpy, ignore_regions

__all__ = [
    "FROC_FP_RATES",
    "MAX_CANDIDATES_PER_SCAN",
    "cap_candidates",
    "froc",
    "froc_curve",
    "match_by_center_distance",
    "match_detections",
    "match_spheres",
]

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_CANDIDATES_PER_SCAN = 100
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1
_CRITERIA = ("iou", "center_distance")
_DUPLICATE_RULES = ("false_positive", "ignore")


def _resolve(criterion: str, duplicate_hits: str | None) -> str:
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    if criterion == "center_distance":
        if duplicate_hits not in (None, "ignore"):
            raise ValueError("criterion 'center_distance' follows the LUNA16 rules, where further hits on a "
                             f"found object are ignored; duplicate_hits={duplicate_hits!r} is not available")
        return "ignore"
    if duplicate_hits is None:
        return "false_positive"
    if duplicate_hits not in _DUPLICATE_RULES:
        raise ValueError(f"duplicate_hits must be one of {_DUPLICATE_RULES} or None, got {duplicate_hits!r}")
    return duplicate_hits


def _boxes(value) -> np.ndarray:
    return np.asarray(value if value is not None else np.zeros((0, 6)), dtype=np.float64).reshape(-1, 6)


def match_detections(
    pred_boxes,
    pred_labels,
    pred_scores,
    gt_boxes,
    gt_labels,
    criterion: str = "iou",
    iou_thresh: float = 0.1,
    duplicate_hits: str | None = None,
    ignore_boxes=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one IoU matching of one scan's detections (rule ``"iou"`` of the module docstring).

    Args:
        pred_boxes: [N, 6] `xyzxyz` detections; pred_labels [N]; pred_scores [N].
        gt_boxes: [G, 6] `xyzxyz` ground truths; gt_labels [G].
        criterion: ``"iou"`` (``"center_distance"`` has its own function, `match_by_center_distance`).
        iou_thresh: minimum IoU of a hit.
        duplicate_hits: ``"false_positive"`` (default) or ``"ignore"``.
        ignore_boxes: [I, 6] `xyzxyz` ignore regions (class-agnostic), or None.

    Returns:
        status: int [N] in the input order, 1 = true positive, 0 = false positive, -1 = ignored;
        gt_matched: bool [G], whether each ground truth was found.
    """
    if criterion != "iou":
        raise ValueError(f"match_detections matches by IoU; use match_by_center_distance for {criterion!r}")
    duplicate_rule = _resolve(criterion, duplicate_hits)
    pred_boxes, gt_boxes, ignore_boxes = _boxes(pred_boxes), _boxes(gt_boxes), _boxes(ignore_boxes)
    pred_labels = np.asarray(pred_labels).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)

    status = np.full(len(pred_boxes), FALSE_POSITIVE, dtype=np.int64)
    gt_matched = np.zeros(len(gt_boxes), dtype=bool)
    if len(pred_boxes) == 0:
        return status, gt_matched
    if len(ignore_boxes):
        # the same IoU as the COCO matcher (MONAI, float32) so that both agree on every hit
        on_ignore = (np.asarray(box_iou(pred_boxes, ignore_boxes), dtype=np.float64) >= iou_thresh).any(axis=1)
    else:
        on_ignore = np.zeros(len(pred_boxes), dtype=bool)
    if len(gt_boxes):
        iou = np.asarray(box_iou(pred_boxes, gt_boxes), dtype=np.float64)
        hits = (iou >= iou_thresh) & (pred_labels[:, None] == gt_labels[None, :])
    else:
        iou = hits = np.zeros((len(pred_boxes), 0))
    for det in np.argsort(-pred_scores, kind="mergesort"):
        if not hits[det].any():
            if on_ignore[det]:
                status[det] = IGNORED
            continue
        open_hits = hits[det] & ~gt_matched
        if open_hits.any():
            best = int(np.argmax(np.where(open_hits, iou[det], -np.inf)))
            gt_matched[best] = True
            status[det] = TRUE_POSITIVE
        elif duplicate_rule == "ignore":
            status[det] = IGNORED
    return status, gt_matched


def cap_candidates(scores, max_candidates: int = MAX_CANDIDATES_PER_SCAN) -> np.ndarray:
    """Bool mask of the candidates the LUNA16 script keeps: all of them when there are at most
    `max_candidates`, else those scoring strictly above the (max_candidates + 1)-th highest score."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) <= max_candidates:
        return np.ones(len(scores), dtype=bool)
    cut = np.sort(scores)[::-1][max_candidates]
    return scores > cut


def _centres_and_radii(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (boxes[:, :3] + boxes[:, 3:]) / 2, np.mean(boxes[:, 3:] - boxes[:, :3], axis=1) / 2


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """[P, C] whether each point lies strictly inside each sphere (squared distances, as the LUNA16 script)."""
    points, centres = np.asarray(points).reshape(-1, 3), np.asarray(centres).reshape(-1, 3)
    squared = np.sum((points[:, None, :] - centres[None, :, :]) ** 2, axis=-1)
    return squared < (np.asarray(radii, dtype=np.float64).reshape(-1) ** 2)[None, :]


def match_spheres(centres, scores, gt_centres, gt_radii, ignore_centres=None, ignore_radii=None,
                  max_candidates: int | None = MAX_CANDIDATES_PER_SCAN) -> tuple[np.ndarray, np.ndarray]:
    """One scan and class under the LUNA16 rules: candidate points against ground-truth and ignore spheres.

    Args:
        centres: [N, 3] candidate centres; scores [N].
        gt_centres: [G, 3] ground-truth centres; gt_radii [G] (diameter / 2).
        ignore_centres, ignore_radii: [I, 3], [I] ignore spheres (excluded findings), or None.
        max_candidates: cap on candidates (`cap_candidates`; None: no cap).

    Returns:
        found_scores: float [G], the score at which each ground truth is found (NaN when missed);
        fp_scores: float [F], the scores of the false-positive candidates.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if max_candidates is not None:
        kept = cap_candidates(scores, max_candidates)
        centres, scores = centres[kept], scores[kept]
    hits = _inside(centres, gt_centres, gt_radii)
    found = np.full(hits.shape[1], np.nan)
    for target in range(hits.shape[1]):
        if hits[:, target].any():
            found[target] = scores[hits[:, target]].max()
    if ignore_centres is not None and len(np.asarray(ignore_radii).reshape(-1)):
        on_ignore = _inside(centres, ignore_centres, ignore_radii).any(axis=1)
    else:
        on_ignore = np.zeros(len(centres), dtype=bool)
    return found, scores[~hits.any(axis=1) & ~on_ignore]


def match_by_center_distance(pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels, ignore_boxes=None,
                             max_candidates: int | None = MAX_CANDIDATES_PER_SCAN) -> tuple[np.ndarray, np.ndarray]:
    """`match_spheres` per class on `xyzxyz` boxes: a box's centre and half its mean size (rule
    ``"center_distance"`` of the module docstring). Ignore boxes are class-agnostic.

    Returns:
        found_scores: float [G] in the order of `gt_boxes` (NaN when missed); fp_scores: float [F].
    """
    pred_boxes, gt_boxes, ignore_boxes = _boxes(pred_boxes), _boxes(gt_boxes), _boxes(ignore_boxes)
    pred_labels = np.asarray(pred_labels).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    centres = _centres_and_radii(pred_boxes)[0]
    gt_centres, gt_radii = _centres_and_radii(gt_boxes)
    ignore_centres, ignore_radii = _centres_and_radii(ignore_boxes)

    found, false = np.full(len(gt_boxes), np.nan), [np.zeros(0)]
    for label in np.unique(pred_labels):
        members, targets = pred_labels == label, gt_labels == label
        found[targets], class_false = match_spheres(centres[members], pred_scores[members], gt_centres[targets],
                                                    gt_radii[targets], ignore_centres, ignore_radii, max_candidates)
        false.append(class_false)
    return found, np.concatenate(false)


def froc_curve(found_scores: Sequence[float], fp_scores: Sequence[float], num_gt: int, num_images: int):
    """FROC operating points, computed as the LUNA16 script computes them (module docstring).

    Args:
        found_scores: one score per *found* ground truth over the whole set (the score it is found at).
        fp_scores: one score per false positive over the whole set.
        num_gt: ground truths in the whole set (found or not); num_images: scans in the whole set.

    Returns:
        fps_per_scan, sensitivity: float arrays, non-decreasing, starting at (0, 0).
    """
    found = np.asarray(found_scores, dtype=np.float64).reshape(-1)
    false = np.asarray(fp_scores, dtype=np.float64).reshape(-1)
    num_found, num_false = len(found), len(false)
    if num_found == 0 or num_gt == 0:  # a flat curve at sensitivity 0
        if num_false == 0:
            return np.zeros(1), np.zeros(1)
        return np.array([0.0, num_false / max(num_images, 1)]), np.zeros(2)
    scores = np.r_[found, false]
    truth = np.r_[np.ones(num_found), np.zeros(num_false)]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, truth = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(truth)[last]
    fps = 1 + last - tps
    if len(fps) > 2:  # drop collinear points, as roc_curve(drop_intermediate=True)
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    tpr = tps / tps[-1]
    if num_false == 0:
        fps_per_scan = np.zeros(len(fps))
    else:
        fps_per_scan = (fps / fps[-1]) * num_false / max(num_images, 1)
    return fps_per_scan, (tpr * num_found) / num_gt


def _found_and_fp_scores(status: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return scores[status == TRUE_POSITIVE], scores[status == FALSE_POSITIVE]


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
        ground_truths: per-scan dicts ``"box"`` [G, 6], ``"label"`` [G], optionally ``"ignore_box"`` [I, 6],
            aligned with ``predictions``.
        criterion: ``"iou"`` or ``"center_distance"`` (module docstring).
        iou_thresh, duplicate_hits: see `match_detections` (IoU criterion only).
        fp_rates: false positives per scan at which sensitivity is read (default 1/8 ... 8).
        box_mode: MONAI mode of all boxes (``"xyzxyz"``, ``"cccwhd"``, ...).

    Returns:
        dict with ``froc_fp_rates`` (list), ``froc_sensitivities`` (list, one per rate), ``froc_score``
        (their mean), ``curve_fps_per_scan`` and ``curve_sensitivity`` (operating points, lists),
        ``num_images``, ``num_gt``, ``num_tp`` (ground truths found), ``num_fp`` (false positives, over all
        detections), ``froc_criterion``, ``froc_duplicate_hits`` and, for the IoU criterion,
        ``froc_iou_thresh``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground truths must be aligned per scan: {len(predictions)} vs {len(ground_truths)}"
        )
    duplicate_rule = _resolve(criterion, duplicate_hits)
    preds = detections_to_numpy(predictions, "prediction", box_mode)
    gts = detections_to_numpy(ground_truths, "ground truth", box_mode)
    ignores = ignore_regions(ground_truths, box_mode)

    found, false = [np.zeros(0)], [np.zeros(0)]
    for p, g, ignore in zip(preds, gts, ignores):
        if criterion == "iou":
            status, _ = match_detections(p["box"], p["label"], p["label_scores"], g["box"], g["label"], "iou",
                                         iou_thresh, duplicate_rule, ignore)
            scan_found, scan_false = _found_and_fp_scores(status, p["label_scores"])
        else:
            scan_found, scan_false = match_by_center_distance(p["box"], p["label"], p["label_scores"], g["box"],
                                                              g["label"], ignore)
            scan_found = scan_found[np.isfinite(scan_found)]
        found.append(scan_found)
        false.append(scan_false)
    found, false = np.concatenate(found), np.concatenate(false)
    num_gt = int(sum(len(g["label"]) for g in gts))
    fps, sensitivity = froc_curve(found, false, num_gt, len(gts))
    sens_at_rates = np.interp(np.asarray(fp_rates, dtype=np.float64), fps, sensitivity)
    result = {
        "froc_fp_rates": [float(r) for r in fp_rates],
        "froc_sensitivities": [float(s) for s in sens_at_rates],
        "froc_score": float(np.mean(sens_at_rates)) if len(sens_at_rates) else 0.0,
        "curve_fps_per_scan": fps.tolist(),
        "curve_sensitivity": sensitivity.tolist(),
        "num_images": len(gts),
        "num_gt": num_gt,
        "num_tp": int(len(found)),
        "num_fp": int(len(false)),
        "froc_criterion": criterion,
        "froc_duplicate_hits": duplicate_rule,
    }
    if criterion == "iou":
        result["froc_iou_thresh"] = float(iou_thresh)
    return result
