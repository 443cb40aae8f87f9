"""Tests of meddet.metrics: COCO metrics against MONAI, FROC against hand-computed examples, report files,
datalist matching and the ignite metric."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou, convert_box_mode

from meddet.data import DatalistError
import meddet.metrics.ignite_metric as ignite_metric_module
from meddet.metrics import (
    DetectionMAP,
    coco_metrics,
    evaluate_detections,
    evaluate_files,
    froc,
    match_detections,
)

torch.set_num_threads(1)
CLASSES = ("nodule", "mass")


# ----------------------------------------------------------------------------------------------------------
# data
def random_set(seed: int = 0):
    """5 images of world `cccwhd` boxes, 2 classes: image 1 has GT but no predictions, image 3 predictions but
    no GT, image 4 neither. Predictions are jittered copies of the GT plus random false positives."""
    rng = np.random.default_rng(seed)
    num_gt = [3, 2, 4, 0, 0]
    num_fp = [2, 0, 1, 3, 0]
    preds, gts = [], []
    for image, (n_gt, n_fp) in enumerate(zip(num_gt, num_fp)):
        centres = rng.uniform(0, 200, size=(n_gt, 3))
        sizes = rng.uniform(5, 30, size=(n_gt, 3))
        labels = rng.integers(0, 2, size=n_gt)
        if image == 0:
            labels[:2] = [0, 1]  # both classes have ground truth somewhere
        gts.append({"box": np.concatenate([centres, sizes], axis=1).reshape(-1, 6), "label": labels})
        if image == 1:
            preds.append({"box": np.zeros((0, 6)), "label": np.zeros(0, dtype=int), "label_scores": np.zeros(0)})
            continue
        hit_centres = centres + rng.normal(0, 3, size=centres.shape)
        hit_sizes = sizes * rng.uniform(0.7, 1.3, size=sizes.shape)
        fp_boxes = np.concatenate([rng.uniform(0, 200, (n_fp, 3)), rng.uniform(5, 30, (n_fp, 3))], axis=1)
        boxes = np.concatenate([np.concatenate([hit_centres, hit_sizes], axis=1).reshape(-1, 6), fp_boxes])
        pred_labels = np.concatenate([labels, rng.integers(0, 2, size=n_fp)])
        scores = rng.uniform(0.05, 1.0, size=len(boxes))
        preds.append({"box": torch.as_tensor(boxes, dtype=torch.float32), "label": torch.as_tensor(pred_labels),
                      "label_scores": torch.as_tensor(scores, dtype=torch.float32)})
    return preds, gts


def monai_coco(preds, gts, box_mode="cccwhd"):
    """The reference: MONAI's COCOMetric + matching_batch called directly, as in MONAI's docstring."""

    def xyzxyz(boxes):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        return convert_box_mode(boxes, src_mode=box_mode, dst_mode="xyzxyz") if len(boxes) else boxes

    metric = COCOMetric(classes=list(CLASSES), iou_list=(0.1, 0.5), iou_range=(0.1, 0.5, 0.05),
                        max_detection=(100,), verbose=False)
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[xyzxyz(p["box"]) for p in preds],
        pred_classes=[np.asarray(p["label"]) for p in preds],
        pred_scores=[np.asarray(p["label_scores"], dtype=np.float64) for p in preds],
        gt_boxes=[xyzxyz(g["box"]) for g in gts],
        gt_classes=[np.asarray(g["label"]) for g in gts],
        max_detections=100,
    )
    return metric(matches)[0]


def cube(x, y=0.0, z=0.0, size=10.0):
    return [x, y, z, x + size, y + size, z + size]


def hand_froc_set():
    """4 scans, 5 ground truths, 10 detections (xyzxyz voxel boxes, one class).

    scan A: GT a1 = cube(0), a2 = cube(50); d1 0.95 = a1 (IoU 1, TP); d2 0.90 = cube(5) hits only a1,
            already taken (IoU 1/3: a duplicate); d3 0.40 = a2 (TP)
    scan B: GT b1 = cube(0); d4 0.85 far away (FP); d5 0.60 = b1 (TP)
    scan C: GT c1 = cube(0), c2 = cube(50); d6 0.80 = c1 (TP); d7 0.30, d8 0.20 far (FP); c2 missed
    scan D: no GT; d9 0.95 and d10 0.50 far (FP)
    """
    def far(k):
        return cube(200.0 + 20.0 * k)

    gts = [
        {"box": [cube(0), cube(50)], "label": [0, 0]},
        {"box": [cube(0)], "label": [0]},
        {"box": [cube(0), cube(50)], "label": [0, 0]},
        {"box": np.zeros((0, 6)), "label": []},
    ]
    preds = [
        {"box": [cube(0), cube(5), cube(50)], "label": [0, 0, 0], "label_scores": [0.95, 0.90, 0.40]},
        {"box": [far(0), cube(0)], "label": [0, 0], "label_scores": [0.85, 0.60]},
        {"box": [cube(0), far(1), far(2)], "label": [0, 0, 0], "label_scores": [0.80, 0.30, 0.20]},
        {"box": [far(3), far(4)], "label": [0, 0], "label_scores": [0.95, 0.50]},
    ]
    return preds, gts


# ----------------------------------------------------------------------------------------------------------
# COCO
def test_coco_metrics_equal_monai_and_handle_empty_images():
    preds, gts = random_set()
    ours = coco_metrics(preds, gts, CLASSES, box_mode="cccwhd")
    reference = monai_coco(preds, gts)
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key] == pytest.approx(float(reference[key]), abs=1e-6), key
    map_key = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
    assert 0.0 < ours[map_key] < 1.0  # a non-trivial set: partly right, partly wrong
    assert {"AP_IoU_0.10_MaxDet_100", "AP_IoU_0.50_MaxDet_100", "mAR_IoU_0.10_0.50_0.05_MaxDet_100",
            "nodule_AP_IoU_0.10_MaxDet_100", "mass_AR_IoU_0.50_MaxDet_100"} <= set(ours)


def test_coco_metrics_perfect_and_no_predictions():
    _, gts = random_set()
    perfect = [{"box": g["box"], "label": g["label"], "label_scores": np.ones(len(g["label"]))} for g in gts]
    perfect_map = coco_metrics(perfect, gts, CLASSES, box_mode="cccwhd")["mAP_IoU_0.10_0.50_0.05_MaxDet_100"]
    assert perfect_map == pytest.approx(1.0)
    empty = [{"box": [], "label": [], "label_scores": []} for _ in gts]
    assert coco_metrics(empty, gts, CLASSES, box_mode="cccwhd")["AP_IoU_0.10_MaxDet_100"] == 0.0


def test_coco_metrics_rejects_bad_input():
    preds, gts = random_set()
    with pytest.raises(ValueError, match="aligned"):
        coco_metrics(preds[:4], gts, CLASSES, box_mode="cccwhd")
    with pytest.raises(ValueError, match="outside"):
        coco_metrics(preds, gts, CLASSES[:1], box_mode="cccwhd")
    with pytest.raises(KeyError, match="label_scores"):
        coco_metrics([{"box": [cube(0)], "label": [0]}], [{"box": [cube(0)], "label": [0]}], CLASSES)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        coco_metrics([{"box": [[0, 0, 1, 1]], "label": [0], "label_scores": [1.0]}],
                     [{"box": [cube(0)], "label": [0]}], CLASSES)


# ----------------------------------------------------------------------------------------------------------
# FROC
def test_froc_hand_example_nndetection_convention():
    preds, gts = hand_froc_set()
    result = froc(preds, gts)  # IoU >= 0.1, duplicates are false positives
    # Sorted by score (ties pooled over scans): {0.95: d1 TP, d9 FP}, 0.90 d2 FP (duplicate), 0.85 d4 FP,
    # 0.80 d6 TP, 0.60 d5 TP, 0.50 d10 FP, 0.40 d3 TP, 0.30 d7 FP, 0.20 d8 FP.
    # Operating points (FP/4 scans, TP/5 GT): (0,0) (0.25,0.2) (0.5,0.2) (0.75,0.2) (0.75,0.4) (0.75,0.6)
    # (1,0.6) (1,0.8) (1.25,0.8) (1.5,0.8).
    # 1/8: halfway between (0,0) and (0.25,0.2) -> 0.1;  1/4 -> 0.2;  1/2 -> 0.2;
    # 1: the curve jumps from 0.6 to 0.8 at 1 FP/scan, the upper value counts -> 0.8;
    # 2, 4, 8: beyond the last point (1.5) the final sensitivity 0.8 is carried on.
    expected = [0.1, 0.2, 0.2, 0.8, 0.8, 0.8, 0.8]
    assert result["froc_sensitivities"] == pytest.approx(expected, abs=1e-9)
    assert result["froc_score"] == pytest.approx(3.7 / 7, abs=1e-9)
    assert result["froc_fp_rates"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    # the curve keeps the corners only (collinear points dropped, as the LUNA16 script's roc_curve):
    # (0.5, 0.2) lies between (0.25, 0.2) and (0.75, 0.2), (0.75, 0.4) on the vertical run, (1.25, 0.8)
    # between (1, 0.8) and (1.5, 0.8)
    assert result["curve_fps_per_scan"] == pytest.approx([0, 0.25, 0.75, 0.75, 1, 1, 1.5])
    assert result["curve_sensitivity"] == pytest.approx([0, 0.2, 0.2, 0.6, 0.6, 0.8, 0.8])
    assert (result["num_images"], result["num_gt"], result["num_tp"], result["num_fp"]) == (4, 5, 4, 6)


def test_froc_hand_example_duplicates_ignored():
    preds, gts = hand_froc_set()
    result = froc(preds, gts, duplicate_hits="ignore")
    # d2 drops out: {0.95: TP, FP} (0.25,0.2); 0.85 FP (0.5,0.2); 0.80 TP (0.5,0.4); 0.60 TP (0.5,0.6);
    # 0.50 FP (0.75,0.6); 0.40 TP (0.75,0.8); 0.30 FP (1,0.8); 0.20 FP (1.25,0.8)
    # 1/8 -> 0.1; 1/4 -> 0.2; 1/2 -> upper value 0.6; 1 and above -> 0.8
    assert result["froc_sensitivities"] == pytest.approx([0.1, 0.2, 0.6, 0.8, 0.8, 0.8, 0.8], abs=1e-9)
    assert result["froc_score"] == pytest.approx(4.1 / 7, abs=1e-9)
    assert result["num_fp"] == 5


def test_froc_iou_threshold_and_no_ground_truth():
    preds, gts = hand_froc_set()
    # at IoU 0.5 the duplicate d2 (IoU 1/3) no longer hits anything: still a FP, same curve
    assert froc(preds, gts, iou_thresh=0.5)["froc_score"] == pytest.approx(3.7 / 7)
    # shrink every true positive to a box of IoU 0.125 with its GT: misses at 0.2, hits at 0.1
    shrunk = [{"box": [[0, 0, 0, 5, 5, 5]], "label": [0], "label_scores": [0.9]}]
    target = [{"box": [cube(0)], "label": [0]}]
    assert froc(shrunk, target, iou_thresh=0.1)["froc_sensitivities"][0] == 1.0
    assert froc(shrunk, target, iou_thresh=0.2)["froc_sensitivities"][0] == 0.0
    no_gt = froc(shrunk, [{"box": np.zeros((0, 6)), "label": []}])
    assert no_gt["froc_score"] == 0.0 and no_gt["num_fp"] == 1


def test_froc_last_operating_point_kept_when_nothing_is_missed():
    # one scan: a FP at 0.9, then the only GT found at 0.3; with all detections: 1 FP/scan, sensitivity 1
    preds = [{"box": [cube(100), cube(0)], "label": [0, 0], "label_scores": [0.9, 0.3]}]
    result = froc(preds, [{"box": [cube(0)], "label": [0]}])
    assert result["froc_sensitivities"] == pytest.approx([0, 0, 0, 1, 1, 1, 1])


def test_match_detections_equal_monai_matching_at_iou_0_1():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gt = np.concatenate([rng.uniform(0, 40, (6, 3)), rng.uniform(4, 12, (6, 3))], axis=1)
        pred = np.concatenate([rng.uniform(0, 40, (15, 3)), rng.uniform(4, 12, (15, 3))], axis=1)
        gt, pred = convert_box_mode(gt, src_mode="cccwhd"), convert_box_mode(pred, src_mode="cccwhd")
        gt_labels, pred_labels = rng.integers(0, 2, 6), rng.integers(0, 2, 15)
        scores = rng.uniform(size=15)
        status, gt_matched = match_detections(pred, pred_labels, scores, gt, gt_labels)
        reference = matching_batch(box_iou, [0.1], [pred], [pred_labels], [scores], [gt], [gt_labels],
                                   max_detections=1000)[0]
        expected = np.zeros(15)
        for label, result in reference.items():
            members = np.flatnonzero(pred_labels == label)
            order = members[np.argsort(-scores[members], kind="mergesort")]
            expected[order] = result["dtMatches"][0]
        assert np.array_equal(status, expected)
        assert gt_matched.sum() == status.sum() > 0


def test_center_distance_criterion():
    # GT A: cube of size 10, centre (5, 5, 5), radius 5. GT B: 20 x 4 x 6 box centred at (50, 50, 50):
    # mean size 10 -> radius 5 (half its largest size would be 10).
    gts = [{"box": [cube(0), [40, 48, 47, 60, 52, 53]], "label": [0, 0]}]
    d1 = [8, 4, 4, 10, 6, 6]        # 2^3 box centred at (9, 5, 5): 4 from A's centre, IoU with A 8/1000
    d2 = [56, 49, 49, 58, 51, 51]   # centred at (57, 50, 50): 7 from B's centre, IoU with B 8/480
    d3 = [0, 4, 4, 2, 6, 6]         # centred at (1, 5, 5): inside A's radius too, a duplicate of d1
    preds = [{"box": [d1, d2, d3], "label": [0, 0, 0], "label_scores": [0.9, 0.8, 0.7]}]

    by_iou = froc(preds, gts, criterion="iou")
    assert by_iou["num_tp"] == 0 and by_iou["froc_score"] == 0.0

    by_centre = froc(preds, gts, criterion="center_distance")
    # d1 hits A; d2 lies outside B's radius (mean size) -> FP; d3 is a duplicate of A -> ignored (LUNA16)
    assert (by_centre["num_tp"], by_centre["num_fp"]) == (1, 1)
    assert by_centre["froc_duplicate_hits"] == "ignore"
    # points (0,0) (0,0.5) (1,0.5): sensitivity 0.5 at every rate
    assert by_centre["froc_sensitivities"] == pytest.approx([0.5] * 7)

    with pytest.raises(ValueError, match="LUNA16 rules"):
        froc(preds, gts, criterion="center_distance", duplicate_hits="false_positive")
    with pytest.raises(ValueError, match="criterion"):
        froc(preds, gts, criterion="distance")


# ----------------------------------------------------------------------------------------------------------
# report files
def test_evaluate_detections_writes_monai_numbers(tmp_path):
    preds, gts = random_set(seed=1)
    names = [f"case_{i}" for i in range(5)]
    returned = evaluate_detections(preds, gts, CLASSES, tmp_path, image_names=names, box_mode="cccwhd")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == returned
    reference = monai_coco(preds, gts)
    for key, value in reference.items():
        assert isinstance(written[key], float)
        assert written[key] == pytest.approx(float(value), abs=1e-6), key
    assert written["num_images"] == 5
    assert written["num_gt"] == sum(len(g["label"]) for g in gts)
    assert written["num_predictions"] == sum(len(p["label"]) for p in preds)
    assert len(written["froc_sensitivities"]) == 7
    assert written["froc_score"] == pytest.approx(np.mean(written["froc_sensitivities"]))

    with open(tmp_path / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == names
    assert [int(r["num_gt"]) for r in rows] == [len(g["label"]) for g in gts]
    assert [int(r["num_pred"]) for r in rows] == [len(p["label"]) for p in preds]
    for r in rows:
        assert int(r["tp_iou0.1"]) + int(r["fn_iou0.1"]) == int(r["num_gt"])
        assert int(r["tp_iou0.1"]) + int(r["fp_iou0.1"]) == int(r["num_pred"])
    assert rows[4]["max_score"] == "" and rows[4]["mean_best_iou_gt"] == ""
    assert rows[1]["max_score"] == "" and float(rows[1]["mean_best_iou_gt"]) == 0.0

    png = (tmp_path / "froc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "froc.png").shape[:2] == (450, 600)


def test_per_case_csv_hand_example(tmp_path):
    preds, gts = hand_froc_set()
    metrics = evaluate_detections(preds, gts, ["lesion"], tmp_path, image_names=list("ABCD"), box_mode="xyzxyz")
    assert metrics["froc_score"] == pytest.approx(3.7 / 7)
    with open(tmp_path / "per_case.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    a = rows["A"]  # d1 TP, d2 duplicate FP, d3 TP; at score >= 0.5 only d1 (TP) and d2 (FP) remain
    assert (a["tp_iou0.1"], a["fp_iou0.1"], a["fn_iou0.1"]) == ("2", "1", "0")
    assert (a["tp_iou0.1_score0.5"], a["fp_iou0.1_score0.5"], a["fn_iou0.1_score0.5"]) == ("1", "1", "1")
    assert float(a["max_score"]) == 0.95 and float(a["mean_best_iou_gt"]) == pytest.approx(1.0)
    c = rows["C"]  # c1 found exactly, c2 missed -> mean best IoU 0.5
    assert (c["tp_iou0.1"], c["fp_iou0.1"], c["fn_iou0.1"]) == ("1", "2", "1")
    assert float(c["mean_best_iou_gt"]) == pytest.approx(0.5)
    assert rows["D"]["mean_best_iou_gt"] == "" and rows["D"]["fp_iou0.1"] == "2"


def test_evaluate_files_matches_by_path(tmp_path):
    preds, gts = random_set(seed=2)
    dataset = tmp_path / "data"
    (dataset / "images").mkdir(parents=True)
    names = [f"images/case_{i}.nii.gz" for i in range(5)]
    datalist = {
        "training": [],
        "validation": [{"image": n, "box": np.asarray(g["box"]).tolist(), "label": np.asarray(g["label"]).tolist()}
                       for n, g in zip(names, gts)],
    }
    (dataset / "datalist.json").write_text(json.dumps(datalist))
    entries = [
        {"image": str(dataset / n) if i % 2 else f"./images/../{n}",  # absolute or relative to the dataset
         "box": np.asarray(p["box"]).tolist(), "label": np.asarray(p["label"]).tolist(),
         "label_scores": np.asarray(p["label_scores"]).tolist()}
        for i, (n, p) in enumerate(zip(names, preds))
    ]
    entries = entries[::-1] + [{"image": str(dataset / "images/other.nii.gz"), "box": [], "label": [],
                                "label_scores": []}]
    (tmp_path / "predictions.json").write_text(json.dumps(entries))

    metrics = evaluate_files(tmp_path / "predictions.json", dataset / "datalist.json", tmp_path / "out",
                             class_names=CLASSES)
    direct = evaluate_detections(preds, gts, CLASSES, tmp_path / "direct", box_mode="cccwhd")
    for key in ("mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.10_MaxDet_100", "froc_score", "num_gt"):
        assert metrics[key] == pytest.approx(direct[key], abs=1e-6)
    with open(tmp_path / "out" / "per_case.csv") as f:
        images = [r["image"] for r in csv.DictReader(f)]
    assert images == [str((dataset / n).resolve()) for n in names]

    (tmp_path / "predictions.json").write_text(json.dumps(entries[1:]))  # drops case_4
    with pytest.raises(ValueError, match=r"no prediction entry for image .*case_4\.nii\.gz"):
        evaluate_files(tmp_path / "predictions.json", dataset / "datalist.json", tmp_path / "out",
                       class_names=CLASSES)

    # the datalist is read by the same validating reader as training: a malformed box names its item
    datalist["validation"][1]["box"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]
    (dataset / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(DatalistError, match=r"datalist\.json[\s\S]*validation.*1"):
        evaluate_files(tmp_path / "predictions.json", dataset / "datalist.json", tmp_path / "out",
                       class_names=CLASSES)


# ----------------------------------------------------------------------------------------------------------
# ignite
def voxel_set():
    preds, gts = random_set(seed=4)
    to_voxel = [
        ({**p, "box": convert_box_mode(torch.as_tensor(np.asarray(p["box"]), dtype=torch.float32).reshape(-1, 6),
                                       src_mode="cccwhd")},
         {**g, "box": convert_box_mode(torch.as_tensor(g["box"], dtype=torch.float32).reshape(-1, 6),
                                       src_mode="cccwhd")})
        for p, g in zip(preds, gts)
    ]
    return [p for p, _ in to_voxel], [g for _, g in to_voxel]


def test_ignite_metric_equals_coco_metrics():
    preds, gts = voxel_set()
    # batches of 2, 2, 1 images; the last one in the decollated (list of per-image dicts) format
    batches = [{"pred": preds[0:2], "label": gts[0:2]}, {"pred": preds[2:4], "label": gts[2:4]},
               [{"pred": preds[4], "label": gts[4]}]]
    engine = Engine(lambda _engine, batch: batch)
    DetectionMAP(class_names=CLASSES).attach(engine, "val_mAP")
    state = engine.run(batches, max_epochs=1)
    expected = coco_metrics(preds, gts, CLASSES)
    assert state.metrics["val_mAP"] == pytest.approx(expected["mAP_IoU_0.10_0.50_0.05_MaxDet_100"], abs=1e-9)
    assert 0.0 < state.metrics["val_mAP"] < 1.0
    for key, value in expected.items():
        assert state.metrics[key] == pytest.approx(value, abs=1e-9)

    engine = Engine(lambda _engine, batch: batch)
    DetectionMAP(class_names=CLASSES, metric_key="AP_IoU_0.10_MaxDet_100", add_details=False).attach(engine, "ap")
    state = engine.run(batches, max_epochs=2)  # reset between epochs: the second epoch sees the same 5 images
    assert state.metrics == {"ap": pytest.approx(expected["AP_IoU_0.10_MaxDet_100"], abs=1e-9)}


def test_ignite_metric_gathers_all_ranks(monkeypatch):
    preds, gts = voxel_set()
    other_rank = DetectionMAP(class_names=CLASSES)
    other_rank.update((preds[3:], gts[3:]))
    # two ranks: all_gather of a Python object returns one entry per rank
    monkeypatch.setattr(ignite_metric_module.idist, "all_gather", lambda obj: [obj, other_rank._pairs])
    this_rank = DetectionMAP(class_names=CLASSES)
    this_rank.update((preds[:3], gts[:3]))
    expected = coco_metrics(preds, gts, CLASSES)["mAP_IoU_0.10_0.50_0.05_MaxDet_100"]
    assert this_rank.compute() == pytest.approx(expected, abs=1e-9)


def test_ignite_metric_rejects_bad_output():
    engine = Engine(lambda _engine, batch: {"pred": [], "seg": []})
    DetectionMAP().attach(engine, "map")
    with pytest.raises(ValueError, match="engine output"):
        engine.run([0], max_epochs=1)


def test_detections_on_ignore_regions_count_neither_way(tmp_path):
    # one scan: the only object found at 0.5; a detection at 0.9 on an ignore region, one at 0.3 elsewhere
    preds = [{"box": [cube(100), cube(0), cube(200)], "label": [0, 0, 0], "label_scores": [0.9, 0.5, 0.3]}]
    plain = [{"box": [cube(0)], "label": [0]}]
    ignoring = [{"box": [cube(0)], "label": [0], "ignore_box": [cube(101)]}]

    froc_plain, froc_ignoring = froc(preds, plain), froc(preds, ignoring)
    assert (froc_plain["num_fp"], froc_ignoring["num_fp"]) == (2, 1)
    # without the region the object comes after one FP (sensitivity 1 from 1 FP/scan on), with it first
    assert froc_plain["froc_sensitivities"][0] < 1.0 and froc_ignoring["froc_sensitivities"] == [1.0] * 7
    by_centre = froc(preds, ignoring, criterion="center_distance")
    assert (by_centre["num_tp"], by_centre["num_fp"]) == (1, 1)

    coco_plain = coco_metrics(preds, plain, ["lesion"])
    coco_ignoring = coco_metrics(preds, ignoring, ["lesion"])
    key = "AP_IoU_0.10_MaxDet_100"
    assert coco_plain[key] < 0.9 and coco_ignoring[key] == pytest.approx(1.0)

    evaluate_detections(preds, ignoring, ["lesion"], tmp_path, box_mode="xyzxyz")
    with open(tmp_path / "per_case.csv") as f:
        row = next(csv.DictReader(f))
    assert (row["tp_iou0.1"], row["fp_iou0.1"], row["fn_iou0.1"]) == ("1", "1", "0")
