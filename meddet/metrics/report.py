"""Evaluation report of a set of detections: ``metrics.json``, ``per_case.csv`` and ``froc.png``.

``metrics.json`` holds the COCO metrics (MONAI key names), the FROC (``froc_fp_rates``,
``froc_sensitivities``, ``froc_score``, how it was matched: ``froc_criterion``, ``froc_duplicate_hits``,
``froc_iou_thresh``) and the counts ``num_images``, ``num_gt``, ``num_predictions``.

``per_case.csv`` has one row per image, matched as nnDetection's FROC (IoU >= ``iou_thresh``, by
descending score, duplicates are false positives; see `meddet.metrics.froc.match_detections`); with the
default threshold the columns are:

- ``image``, ``num_gt``, ``num_pred``;
- ``tp_iou0.1``, ``fp_iou0.1``, ``fn_iou0.1``: counts over all detections of the image;
- ``tp_iou0.1_score0.5``, ``fp_iou0.1_score0.5``, ``fn_iou0.1_score0.5``: the same over the detections
  with score >= ``score_thresh`` (greedy matching by score makes this the same as re-matching them);
- ``max_score``: highest detection score (empty without detections);
- ``mean_best_iou_gt``: mean over the ground truths of their best IoU with a detection of the same class
  (0 for a missed one; empty without ground truth).

Ground truths may carry ``ignore_box`` regions (detections there count neither way, in the COCO metrics, the
FROC and ``per_case.csv``) and ``diameter_mm``: then ``metrics.json`` also holds the LUNA16 CPM by the
challenge's rules (``luna16_cpm``, ``luna16_cpm_ci``: 95 % bootstrap interval over scans,
``luna16_sensitivities`` at 1/8 ... 8 FP per scan; see `meddet.metrics.cpm`) and ``luna16_froc.png`` its curve.

``froc.png`` plots sensitivity against false positives per scan (log2 axis) as the score reads it, with the
operating points at the FROC rates marked.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data.box_utils import box_iou

from meddet.data.datalist import load_datalist
from meddet.metrics.coco import coco_metrics, detections_to_numpy
from meddet.metrics.coco import ignore_regions
from meddet.metrics.cpm import cpm_from_detections
from meddet.metrics.froc import FROC_FP_RATES, FALSE_POSITIVE, TRUE_POSITIVE, froc, match_detections
from meddet.metrics.froc_plot import save_froc_png

__all__ = ["evaluate_detections", "evaluate_files"]


def _per_case_rows(preds, gts, ignores, image_names, iou_thresh: float, score_thresh: float) -> list[dict]:
    tag = f"iou{iou_thresh:g}"
    rows = []
    for name, pred, gt, ignore in zip(image_names, preds, gts, ignores):
        status, _ = match_detections(
            pred["box"], pred["label"], pred["label_scores"], gt["box"], gt["label"], "iou", iou_thresh,
            "false_positive", ignore,
        )
        confident = pred["label_scores"] >= score_thresh
        num_gt, num_pred = len(gt["label"]), len(pred["label"])
        tp, tp_confident = int(np.sum(status == TRUE_POSITIVE)), int(np.sum(status[confident] == TRUE_POSITIVE))
        best_iou = ""
        if num_gt:
            best = np.zeros(num_gt)
            if num_pred:
                iou = np.asarray(box_iou(pred["box"], gt["box"]), dtype=np.float64)
                iou[pred["label"][:, None] != gt["label"][None, :]] = 0.0
                best = iou.max(axis=0)
            best_iou = float(np.mean(best))
        rows.append(
            {
                "image": name,
                "num_gt": num_gt,
                "num_pred": num_pred,
                f"tp_{tag}": tp,
                f"fp_{tag}": int(np.sum(status == FALSE_POSITIVE)),
                f"fn_{tag}": num_gt - tp,
                f"tp_{tag}_score{score_thresh:g}": tp_confident,
                f"fp_{tag}_score{score_thresh:g}": int(np.sum(status[confident] == FALSE_POSITIVE)),
                f"fn_{tag}_score{score_thresh:g}": num_gt - tp_confident,
                "max_score": float(pred["label_scores"].max()) if num_pred else "",
                "mean_best_iou_gt": best_iou,
            }
        )
    return rows


def _plot_froc(result: dict, path: Path) -> None:
    save_froc_png(path, result["curve_fps_per_scan"], result["curve_sensitivity"], result["froc_fp_rates"],
                  result["froc_sensitivities"],
                  f"FROC ({result['froc_criterion']}) score {result['froc_score']:.3f}: "
                  f"{result['num_images']} scans, {result['num_gt']} objects")


def evaluate_detections(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    class_names: Sequence[str],
    output_dir,
    image_names: Sequence[str] | None = None,
    box_mode: str = "cccwhd",
    froc_criterion: str = "iou",
    iou_thresh: float = 0.1,
    score_thresh: float = 0.5,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> dict:
    """Compute COCO metrics and FROC, write the report files (module docstring) and return the metrics.

    Args:
        predictions: per-image dicts ``"box"`` [N, 6], ``"label"`` [N], ``"label_scores"`` [N].
        ground_truths: per-image dicts ``"box"`` [G, 6], ``"label"`` [G], aligned with ``predictions``.
        class_names: one name per class id.
        output_dir: folder for ``metrics.json``, ``per_case.csv``, ``froc.png`` (created if missing).
        image_names: one name per image for ``per_case.csv`` (default ``"0"``, ``"1"``, ...).
        box_mode: mode of all boxes; the default ``"cccwhd"`` is the world-mm datalist format, which makes
            the centre-distance FROC criterion a distance in mm.
        froc_criterion: ``"iou"`` (nnDetection) or ``"center_distance"`` (LUNA16), see `meddet.metrics.froc`.
        iou_thresh: IoU of a hit for the FROC (IoU criterion) and for ``per_case.csv``.
        score_thresh: score of the second operating point in ``per_case.csv``.
        fp_rates: false positives per scan at which the FROC is read.

    Returns:
        the dict written to ``metrics.json``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground truths must be aligned per image: {len(predictions)} vs {len(ground_truths)}"
        )
    if image_names is None:
        image_names = [str(i) for i in range(len(predictions))]
    if len(image_names) != len(predictions):
        raise ValueError(f"{len(image_names)} image names for {len(predictions)} images")

    metrics = coco_metrics(predictions, ground_truths, class_names, box_mode=box_mode)
    froc_result = froc(
        predictions, ground_truths, criterion=froc_criterion, iou_thresh=iou_thresh, fp_rates=fp_rates,
        box_mode=box_mode,
    )
    for key in ("froc_fp_rates", "froc_sensitivities", "froc_score", "froc_criterion", "froc_duplicate_hits",
                "froc_iou_thresh"):
        if key in froc_result:
            metrics[key] = froc_result[key]
    preds = detections_to_numpy(predictions, "prediction", box_mode)
    gts = detections_to_numpy(ground_truths, "ground truth", box_mode)
    metrics["num_images"] = len(gts)
    metrics["num_gt"] = int(sum(len(g["label"]) for g in gts))
    metrics["num_predictions"] = int(sum(len(p["label"]) for p in preds))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if box_mode == "cccwhd" and any("diameter_mm" in g for g in ground_truths):
        cpm = cpm_from_detections(predictions, ground_truths)
        metrics.update(luna16_cpm=cpm["cpm"], luna16_cpm_ci=cpm["cpm_ci"], luna16_sensitivities=cpm["sensitivities"])
        low, high = cpm["cpm_ci"]
        save_froc_png(output_dir / "luna16_froc.png", cpm["curve_fps_per_scan"], cpm["curve_sensitivity"],
                      cpm["fp_rates"], cpm["sensitivities"],
                      f"LUNA16 rules: CPM {cpm['cpm']:.3f} ({low:.3f}-{high:.3f}), {cpm['num_scans']} scans, "
                      f"{cpm['num_nodules']} nodules", intervals=cpm["sensitivities_ci"])
    with open(output_dir / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)

    rows = _per_case_rows(preds, gts, ignore_regions(ground_truths, box_mode), list(image_names), iou_thresh,
                          score_thresh)
    with open(output_dir / "per_case.csv", "w", newline="", encoding="utf-8") as f:
        fields = list(rows[0]) if rows else ["image", "num_gt", "num_pred"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    _plot_froc(froc_result, output_dir / "froc.png")
    return metrics


def _first_path(value, where: str) -> str:
    if isinstance(value, (list, tuple)):  # multi-channel entries: the first file names the case
        value = value[0] if value else None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where}: 'image' must be a path (or a list of paths), got {value!r}")
    return os.fspath(value)


def _normalised(path: str, base_dir) -> str:
    return os.path.realpath(os.path.join(base_dir, os.path.expanduser(path)))


def evaluate_files(
    predictions_json,
    data_list_file_path,
    output_dir,
    data_list_key: str = "validation",
    dataset_dir=None,
    class_names: Sequence[str] = ("lesion",),
    froc_criterion: str = "iou",
    iou_thresh: float = 0.1,
    score_thresh: float = 0.5,
) -> dict:
    """Evaluate a predictions file against a MONAI detection datalist (world mm, `cccwhd`).

    ``predictions_json`` is a list of ``{"image": path, "box": [[cx, cy, cz, w, h, d], ...], "label": [...],
    "label_scores": [...]}`` in world mm. Entries are matched to the datalist items by image path:
    relative paths in either file are taken relative to ``dataset_dir`` (default: the datalist's folder),
    then both sides are compared as normalised absolute paths (symlinks resolved). Every datalist item
    needs exactly one prediction entry (an item without one is an error naming it); prediction entries for
    images outside ``data_list_key`` are ignored. Writes the report of `evaluate_detections` to
    ``output_dir`` and returns its metrics.
    """
    predictions_json = Path(predictions_json)
    data_list_file_path = Path(data_list_file_path)
    # absolute, so that paths joined by MONAI's datalist loader and ours agree
    base_dir = Path(os.path.abspath(dataset_dir if dataset_dir is not None else data_list_file_path.parent))
    if not predictions_json.is_file():
        raise FileNotFoundError(f"predictions file {predictions_json} does not exist")
    with open(predictions_json, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{predictions_json}: expected a list of per-image prediction entries")

    by_image = {}
    for index, entry in enumerate(entries):
        where = f"{predictions_json}: entry {index}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{where}: expected a dict with 'image', 'box', 'label', 'label_scores'")
        key = _normalised(_first_path(entry["image"], where), base_dir)
        if key in by_image:
            raise ValueError(f"{where}: a second prediction entry for image {key}")
        by_image[key] = entry

    # the same validated reader as training (boxes and labels checked, named by item); the images are not opened
    items = load_datalist(data_list_file_path, base_dir, data_list_key, check_images=False)
    predictions, ground_truths, names = [], [], []
    for index, item in enumerate(items):
        where = f"{data_list_file_path} [{data_list_key}][{index}]"
        image = _normalised(_first_path(item["image"], where), base_dir)
        if image not in by_image:
            raise ValueError(f"{predictions_json}: no prediction entry for image {image} (datalist {where})")
        entry = by_image[image]
        for key in ("box", "label", "label_scores"):
            if key not in entry:
                raise ValueError(f"{predictions_json}: entry for image {image} has no '{key}'")
        predictions.append(
            {key: np.asarray(entry[key], dtype=np.float64) for key in ("box", "label", "label_scores")}
        )
        truth = {"box": np.asarray(item["box"], dtype=np.float64).reshape(-1, 6), "label": np.asarray(item["label"])}
        if len(item.get("ignore_box", ())):
            truth["ignore_box"] = np.asarray(item["ignore_box"], dtype=np.float64).reshape(-1, 6)
        if "diameter_mm" in item:
            truth["diameter_mm"] = np.asarray(item["diameter_mm"], dtype=np.float64).reshape(-1)
        ground_truths.append(truth)
        names.append(image)

    return evaluate_detections(
        predictions, ground_truths, class_names, output_dir, image_names=names, box_mode="cccwhd",
        froc_criterion=froc_criterion, iou_thresh=iou_thresh, score_thresh=score_thresh,
    )
