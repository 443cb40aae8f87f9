"""COCO-style detection metrics (mAP, AP@IoU, mAR, AR@IoU) through MONAI's `COCOMetric` + `matching_batch`.

Inputs are per-image lists aligned by index:
- predictions: dicts with ``"box"`` [N, 6], ``"label"`` [N] and ``"label_scores"`` [N];
- ground truths: dicts with ``"box"`` [G, 6] and ``"label"`` [G];
numpy arrays, torch tensors or nested lists; labels are 0-based class ids into ``class_names``.

Metric keys are MONAI's, e.g. with the defaults ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``,
``AP_IoU_0.10_MaxDet_100``, ``AP_IoU_0.50_MaxDet_100``, ``mAR_IoU_0.10_0.50_0.05_MaxDet_100``,
``AR_IoU_0.10_MaxDet_100``, plus the same prefixed by each class name (``lesion_AP_IoU_0.10_MaxDet_100``).

Conventions inherited from MONAI (and nnDetection, which it mirrors):
- a value of -1 means "undefined": the class has no ground truth in the whole set;
- mAP/AP average the per-class precision curves *including* the -1 of classes without ground truth
  (pycocotools would skip them), so with several classes report per-class keys when one is absent;
- images with neither boxes nor predictions contribute nothing; predictions on an image without
  ground truth are false positives; ``max_detection`` caps detections per image *and class*.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou, convert_box_mode

__all__ = ["coco_metrics", "detections_to_numpy", "ignore_regions"]


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def detections_to_numpy(
    items: Sequence[dict], kind: str, box_mode: str = "xyzxyz", with_scores: bool | None = None
) -> list[dict[str, np.ndarray]]:
    """Validate per-image detection/target dicts and return numpy copies with `xyzxyz` boxes.

    Args:
        items: per-image dicts with ``"box"`` [N, 6] and ``"label"`` [N] (and ``"label_scores"`` [N]
            for predictions); numpy, torch or lists.
        kind: ``"prediction"`` or ``"ground truth"``; used in error messages and to decide whether scores
            are required (predictions) or ignored (ground truths).
        box_mode: MONAI box mode of the input boxes (e.g. ``"xyzxyz"``, ``"cccwhd"``); converted to
            ``"xyzxyz"`` with `monai.data.box_utils.convert_box_mode`.
        with_scores: override whether ``"label_scores"`` is read; default: only for predictions.

    Returns:
        list of dicts with ``"box"`` float64 [N, 6] (`xyzxyz`), ``"label"`` int64 [N] and, for
        predictions, ``"label_scores"`` float64 [N].
    """
    if with_scores is None:
        with_scores = kind == "prediction"
    converted = []
    for index, item in enumerate(items):
        where = f"{kind} {index}"
        if not isinstance(item, dict):
            raise TypeError(f"{where}: expected a dict with 'box' and 'label', got {type(item).__name__}")
        for key in ("box", "label") + (("label_scores",) if with_scores else ()):
            if key not in item:
                raise KeyError(f"{where}: missing key '{key}' (has {sorted(item)})")
        boxes = _numpy(item["box"]).astype(np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 6)
        if boxes.ndim != 2 or boxes.shape[1] != 6:
            raise ValueError(f"{where}: 'box' must have shape [N, 6] (3D boxes), got {tuple(boxes.shape)}")
        labels = _numpy(item["label"]).reshape(-1)
        if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{where}: 'label' must hold integer class ids, got {labels.tolist()}")
        labels = labels.astype(np.int64)
        if len(labels) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(labels)} labels")
        if box_mode != "xyzxyz" and len(boxes):
            boxes = np.asarray(convert_box_mode(boxes, src_mode=box_mode, dst_mode="xyzxyz"), dtype=np.float64)
        if len(boxes) and np.any(boxes[:, 3:] < boxes[:, :3]):
            raise ValueError(f"{where}: boxes with negative size (after conversion to xyzxyz): {boxes.tolist()}")
        entry = {"box": boxes, "label": labels}
        if with_scores:
            scores = _numpy(item["label_scores"]).astype(np.float64).reshape(-1)
            if len(scores) != len(boxes):
                raise ValueError(f"{where}: {len(boxes)} boxes but {len(scores)} label_scores")
            entry["label_scores"] = scores
        converted.append(entry)
    return converted


def ignore_regions(ground_truths: Sequence[dict], box_mode: str = "xyzxyz") -> list[np.ndarray]:
    """Per scan, the ``"ignore_box"`` entries of the ground-truth dicts as `xyzxyz` [I, 6] (empty if absent)."""
    regions = []
    for index, item in enumerate(ground_truths):
        raw = item.get("ignore_box") if isinstance(item, dict) else None
        boxes = np.asarray(raw if raw is not None and len(raw) else np.zeros((0, 6)), dtype=np.float64).reshape(-1, 6)
        if len(boxes):
            boxes = detections_to_numpy([{"box": boxes, "label": np.zeros(len(boxes))}],
                                        f"ground truth {index} ignore region", box_mode)[0]["box"]
        regions.append(boxes)
    return regions


def _check_aligned(predictions: Sequence, ground_truths: Sequence, num_classes: int, preds, gts) -> None:
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground truths must be aligned per image: {len(predictions)} vs {len(ground_truths)}"
        )
    for kind, items in (("prediction", preds), ("ground truth", gts)):
        for index, item in enumerate(items):
            bad = item["label"][(item["label"] < 0) | (item["label"] >= num_classes)]
            if bad.size:
                raise ValueError(
                    f"{kind} {index}: labels {sorted(set(bad.tolist()))} outside [0, {num_classes}) "
                    f"for {num_classes} class name(s)"
                )


def coco_metrics(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    class_names: Sequence[str],
    box_mode: str = "xyzxyz",
    iou_list: Sequence[float] = (0.1, 0.5),
    iou_range: Sequence[float] = (0.1, 0.5, 0.05),
    max_detection: Sequence[int] = (100,),
) -> dict[str, float]:
    """COCO metrics of per-image predictions against ground truths (see the module docstring for keys).

    Args:
        predictions: per-image dicts ``"box"`` [N, 6], ``"label"`` [N], ``"label_scores"`` [N].
        ground_truths: per-image dicts ``"box"`` [G, 6], ``"label"`` [G], optionally ``"ignore_box"`` [I, 6]
            (class-agnostic ignore regions, same mode), aligned with ``predictions``.
        class_names: one name per class id; names prefix the per-class keys.
        box_mode: mode of all boxes (``"xyzxyz"`` voxel corners or ``"cccwhd"`` centre/size, any frame:
            IoU is computed in that frame).
        iou_list: IoU thresholds reported individually (``AP_IoU_<t>``, ``AR_IoU_<t>``).
        iou_range: (start, stop, step) of the IoU thresholds averaged into ``mAP``/``mAR``.
        max_detection: caps on detections per image and class; mAR is reported for each, the others use
            the last.

    Returns:
        dict metric name -> float (MONAI's names).
    """
    preds = detections_to_numpy(predictions, "prediction", box_mode)
    gts = detections_to_numpy(ground_truths, "ground truth", box_mode)
    _check_aligned(predictions, ground_truths, len(class_names), preds, gts)

    metric = COCOMetric(
        classes=list(class_names), iou_list=iou_list, iou_range=iou_range, max_detection=max_detection, verbose=False
    )
    # ignore regions enter as ignored ground truths of every class (COCO's crowd rule): a detection matching
    # one is neither a true nor a false positive
    gt_boxes, gt_classes, gt_ignore = [], [], []
    classes = np.arange(len(class_names))
    for g, ignore in zip(gts, ignore_regions(ground_truths, box_mode)):
        gt_boxes.append(np.concatenate([g["box"], np.tile(ignore, (len(classes), 1))]))
        gt_classes.append(np.concatenate([g["label"], np.repeat(classes, len(ignore))]))
        gt_ignore.append(np.r_[np.zeros(len(g["label"]), dtype=bool), np.ones(len(classes) * len(ignore), dtype=bool)])
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[p["box"] for p in preds],
        pred_classes=[p["label"] for p in preds],
        pred_scores=[p["label_scores"] for p in preds],
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        gt_ignore=gt_ignore,
        max_detections=max(max_detection),
    )
    values, _ = metric(matches)
    return {key: float(value) for key, value in values.items()}
