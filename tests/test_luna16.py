"""LUNA16: datalists from the challenge's layout, submissions, the official CPM rules, bad input, end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bundle_helpers import REPO, run_bundle
from meddet.data import load_datalist
from meddet.data.luna16 import (
    Luna16Error,
    build_fold_datalists,
    predictions_to_submission,
    read_annotations,
)
from meddet.data.synthetic import generate_luna16_like
from meddet.metrics import froc
from meddet.metrics.cpm import evaluate_submission

RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


# ----------------------------------------------------------------------------------------------------------
# the official rules, restated independently (loops, as noduleCADEvaluationLUNA16.py reads)
def _restated_roc(truth, probs):
    """scikit-learn's roc_curve(drop_intermediate=True): (fpr, tpr), one point per distinct threshold."""
    thresholds = sorted(set(probs), reverse=True)
    tps = [sum(1 for t, p in zip(truth, probs) if t == 1 and p >= s) for s in thresholds]
    fps = [sum(1 for t, p in zip(truth, probs) if t == 0 and p >= s) for s in thresholds]
    keep = [i for i in range(len(tps)) if i in (0, len(tps) - 1)
            or (fps[i + 1] - 2 * fps[i] + fps[i - 1]) != 0 or (tps[i + 1] - 2 * tps[i] + tps[i - 1]) != 0]
    tps, fps = [0.0] + [float(tps[i]) for i in keep], [0.0] + [float(fps[i]) for i in keep]
    return np.array(fps) / fps[-1] if fps[-1] > 0 else None, np.array(tps) / tps[-1]


def restated_official_sensitivities(nodules, excluded, candidates, uids):
    gt_list, prob_list, skip = [], [], []
    for uid in uids:
        cands = list(candidates.get(uid, []))
        if len(cands) > 100:
            threshold = sorted((c[3] for c in cands), reverse=True)[100]
            cands = [c for c in cands if c[3] > threshold]
        remaining = set(range(len(cands)))
        annotated = [(n, True) for n in nodules.get(uid, [])] + [(n, False) for n in excluded.get(uid, [])]
        for (x, y, z, diameter), included in annotated:
            if diameter < 0:
                diameter = 10.0
            radius_squared = (diameter / 2.0) ** 2
            matches = []
            for index, (cx, cy, cz, p) in enumerate(cands):
                if (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < radius_squared:
                    remaining.discard(index)
                    if included:
                        matches.append(p)
            if included:
                gt_list.append(1.0)
                prob_list.append(max(matches) if matches else -1e9)
                skip.append(not matches)
        for index in sorted(remaining):
            gt_list.append(0.0)
            prob_list.append(cands[index][3])
            skip.append(False)
    truth = [g for g, s in zip(gt_list, skip) if not s]
    probs = [p for p, s in zip(prob_list, skip) if not s]
    detected, total = sum(truth), sum(gt_list)
    fpr, tpr = _restated_roc(truth, probs)
    fps = np.zeros(len(tpr)) if sum(gt_list) == len(gt_list) else fpr * (len(probs) - detected) / len(uids)
    sens = (tpr * detected) / total
    return np.interp(RATES, fps, sens)


def _write_table(path, table, columns="diameter_mm"):
    with open(path, "w") as f:
        f.write(HEADER.replace("diameter_mm", columns))
        for uid, rows in table.items():
            f.writelines(f"{uid},{float(x)!r},{float(y)!r},{float(z)!r},{float(v)!r}\n" for x, y, z, v in rows)
    return str(path)


def _score(tmp_path, nodules, excluded, candidates, uids, name="case"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "uids.csv").write_text("".join(f"{u}\n" for u in uids))
    return evaluate_submission(_write_table(folder / "a.csv", nodules), _write_table(folder / "s.csv", candidates,
                                                                                      "probability"),
                               _write_table(folder / "e.csv", excluded), str(folder / "uids.csv"), folder,
                               bootstrap_samples=50)


def test_constructed_cases_equal_the_restated_official_rules(tmp_path):
    nodules = {
        # two overlapping nodules: the candidate at 0.9 lies inside both, 0.4 inside the second only
        "1.1": [[0.0, 0.0, 0.0, 10.0], [3.0, 0.0, 0.0, 10.0]],
        "1.2": [[50.0, 50.0, 50.0, 6.0]],
        "1.4": [[-20.0, 10.0, 5.0, 8.0]],  # missed
    }
    excluded = {
        "1.2": [[70.0, 50.0, 50.0, 4.0], [90.0, 90.0, 90.0, -1.0]],  # -1: a 10 mm sphere
        "1.1": [[1.0, 0.0, 0.0, 30.0]],  # overlaps the nodules: hits on both count for the nodule
    }
    candidates = {
        "1.1": [[1.5, 0.0, 0.0, 0.9], [7.0, 0.0, 0.0, 0.4], [1.0, 12.0, 0.0, 0.5], [40.0, 0, 0, 0.8]],
        "1.2": [[70.5, 50.0, 50.0, 0.95], [93.0, 90.0, 90.0, 0.7], [50.0, 50.0, 52.9, 0.3], [50.0, 50.0, 53.0, 0.6]],
        # > 100 candidates: 99 distinct scores, then 31 tied at 0.001: the 100th and 101st highest tie at the
        # cut, so all 31 are dropped and 99 are kept
        "1.3": [[200.0 + i, 0.0, 0.0, 0.9 - 0.005 * i if i < 99 else 0.001] for i in range(130)],
    }
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5"]  # 1.3 and 1.5: scans without nodules (1.5 without candidates)
    result = _score(tmp_path, nodules, excluded, candidates, uids)
    expected = restated_official_sensitivities(nodules, excluded, candidates, uids)
    assert result["sensitivities"] == pytest.approx(expected.tolist(), abs=1e-12)
    assert result["cpm"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    # by hand: 3 of 4 nodules found (both overlapping ones by the 0.9 candidate, 1.2's by 0.3; 1.4's missed).
    # FPs: 1.1: the candidate 40 mm out (0.5 lies on the 30 mm excluded finding, 0.4 hits the second nodule);
    # 1.2: 0.6 lies exactly 3 mm from a 6 mm nodule (not strictly inside), 0.95 and 0.7 sit on excluded
    # findings (the -1 diameter read as 10 mm); 1.3: the 99 kept candidates
    assert (result["num_nodules"], result["num_found"]) == (4, 3)
    assert result["num_fp"] == 1 + 1 + 99


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_equal_the_restated_official_rules_and_the_meddet_froc(tmp_path, seed):
    rng = np.random.default_rng(seed)
    uids = [f"2.{i}" for i in range(6)]
    nodules = {u: [[*rng.uniform(0, 60, 3), rng.uniform(4, 20)] for _ in range(rng.integers(0, 4))] for u in uids}
    excluded = {u: [[*rng.uniform(0, 60, 3), rng.choice([-1.0, 6.0])] for _ in range(rng.integers(0, 3))] for u in uids}
    candidates = {u: [[*rng.uniform(0, 60, 3), float(np.round(rng.uniform(), 2))] for _ in range(rng.integers(0, 40))]
                  for u in uids}
    for uid, rows in nodules.items():  # candidates near most nodules, some inside their radius, some not
        candidates[uid] += [[x + rng.normal(0, d / 3), y, z, float(np.round(rng.uniform(), 2))] for x, y, z, d in rows]
    nodules = {u: rows for u, rows in nodules.items() if rows}
    result = _score(tmp_path, nodules, excluded, candidates, uids)
    expected = restated_official_sensitivities(nodules, excluded, candidates, uids)
    assert result["num_found"] > 0
    assert result["sensitivities"] == pytest.approx(expected.tolist(), abs=1e-12)

    # the centre-distance FROC of meddet.metrics on the same scans as boxes: the same numbers
    def boxes(rows, diameter_of=lambda d: d):
        return [[x, y, z, diameter_of(d), diameter_of(d), diameter_of(d)] for x, y, z, d in rows]

    preds = [{"box": boxes([[x, y, z, 1.0] for x, y, z, _ in candidates.get(u, [])]),
              "label": [0] * len(candidates.get(u, [])), "label_scores": [p for *_, p in candidates.get(u, [])]}
             for u in uids]
    gts = [{"box": boxes(nodules.get(u, [])), "label": [0] * len(nodules.get(u, [])),
            "ignore_box": boxes(excluded.get(u, []), lambda d: 10.0 if d < 0 else d)} for u in uids]
    ours = froc(preds, gts, criterion="center_distance", box_mode="cccwhd")
    assert ours["froc_sensitivities"] == pytest.approx(result["sensitivities"], abs=1e-9)


def test_nothing_found_scores_zero_where_the_official_script_gives_nan(tmp_path):
    nodules, candidates = {"5.1": [[0.0, 0.0, 0.0, 6.0]]}, {"5.1": [[30.0, 0.0, 0.0, 0.9]]}
    with np.errstate(invalid="ignore"):
        assert np.isnan(restated_official_sensitivities(nodules, {}, candidates, ["5.1"])).all()
    assert _score(tmp_path, nodules, {}, candidates, ["5.1"])["sensitivities"] == [0.0] * 7


def test_perfect_and_shifted_submissions(tmp_path):
    nodules = {"3.1": [[10.0, 20.0, 30.0, 8.0], [-40.0, 0.0, 12.0, 5.0]], "3.2": [[0.0, 0.0, 0.0, 12.0]]}
    uids = ["3.1", "3.2", "3.3"]
    perfect = {u: [[x, y, z, 0.9] for x, y, z, _ in rows] for u, rows in nodules.items()}
    assert _score(tmp_path, nodules, {}, perfect, uids, "perfect")["cpm"] == 1.0
    shifted = {u: [[x + d / 2 + 0.01, y, z, 0.9] for x, y, z, d in rows] for u, rows in nodules.items()}
    result = _score(tmp_path, nodules, {}, shifted, uids, "shifted")
    assert result["cpm"] == 0.0 and result["num_fp"] == 3


# ----------------------------------------------------------------------------------------------------------
# datalists and submissions in the right frames
@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    root = tmp_path_factory.mktemp("luna16")
    truth = generate_luna16_like(root / "LUNA16", subsets=(0, 1, 2), scans_per_subset=4, seed=0)
    summary = build_fold_datalists(truth["luna_dir"], root / "lists")
    return {"root": root, "truth": truth, "summary": summary}


def test_datalists_per_fold_in_the_bundles_frame(luna):
    truth, summary = luna["truth"], luna["summary"]
    assert sorted(summary["datalists"]) == [0, 1, 2]
    assert summary["negative_scans"] == 3 and summary["scans"] == 12
    for fold, path in summary["datalists"].items():
        content = json.loads(open(path).read())
        validation = {item["seriesuid"] for item in content["validation"]}
        training = {item["seriesuid"] for item in content["training"]}
        assert validation == {u for u, s in truth["subset_of"].items() if s == fold}
        assert not validation & training and len(validation | training) == 12
        for item in content["validation"] + content["training"]:
            assert item["image"].startswith(f"subset{truth['subset_of'][item['seriesuid']]}/")
            rows = truth["nodules"][item["seriesuid"]]
            expected = [[-x, -y, z, d, d, d] for x, y, z, d in rows]  # LPS -> RAS
            assert np.allclose(np.asarray(item["box"]).reshape(-1, 6), np.asarray(expected).reshape(-1, 6))
            assert item["diameter_mm"] == pytest.approx([d for *_, d in rows])
            ignore = [[-x, -y, z, *([10.0 if d < 0 else d] * 3)] for x, y, z, d in truth["excluded"][item["seriesuid"]]]
            assert np.allclose(np.asarray(item.get("ignore_box", [])).reshape(-1, 6), np.asarray(ignore).reshape(-1, 6))
        # every box lies inside its scan as MONAI reads the .mhd (checked by the bundles' loader)
        items = load_datalist(path, luna["truth"]["luna_dir"], "training", num_classes=1)
        assert any("ignore_box" in item for item in items)
    assert json.loads(open(summary["overrides"]).read()) == {"class_names": ["nodule"]}


def test_submission_from_the_nodules_own_centres_equals_the_annotations(luna, tmp_path):
    path = luna["summary"]["datalists"][1]
    items = json.loads(open(path).read())["validation"]
    predictions = [{"image": os.path.join(luna["truth"]["luna_dir"], item["image"]), "box": item["box"],
                    "label": item["label"], "label_scores": [0.5] * len(item["box"])} for item in items]
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    predictions_to_submission(tmp_path / "predictions.json", tmp_path / "submission.csv")
    with open(tmp_path / "submission.csv") as f:
        rows = list(csv.DictReader(f))
    written = {}
    for row in rows:
        written.setdefault(row["seriesuid"], []).append([float(row[k]) for k in ("coordX", "coordY", "coordZ")])
    annotations = read_annotations(os.path.join(luna["truth"]["luna_dir"], "annotations.csv"))
    for item in items:
        uid = item["seriesuid"]
        if uid in annotations:
            assert np.allclose(written[uid], annotations[uid][:, :3], atol=1e-4)
        else:
            assert uid not in written
    seriesuids = os.path.join(os.path.dirname(path), "luna16_fold1_seriesuids.csv")
    result = evaluate_submission(os.path.join(luna["truth"]["luna_dir"], "annotations.csv"), tmp_path / "submission.csv",
                                 os.path.join(luna["truth"]["luna_dir"], "annotations_excluded.csv"), seriesuids,
                                 tmp_path, bootstrap_samples=20)
    assert result["cpm"] == 1.0 and result["num_scans"] == 4
    assert (tmp_path / "luna16_froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_at_most_100_candidates_per_scan_highest_first(tmp_path):
    boxes = [[float(i), 0.0, 0.0, 4.0, 4.0, 4.0] for i in range(150)]
    scores = [i / 150 for i in range(150)]
    (tmp_path / "p.json").write_text(json.dumps([{"image": "/x/4.4.mhd", "box": boxes, "label": [0] * 150,
                                                  "label_scores": scores}]))
    summary = predictions_to_submission(tmp_path / "p.json", tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary == {"scans": 1, "candidates": 100} and len(rows) == 100
    assert min(float(r["probability"]) for r in rows) == pytest.approx(50 / 150)
    assert {r["seriesuid"] for r in rows} == {"4.4"}
    assert float(rows[0]["coordX"]) == -149.0  # RAS -> LPS


# ----------------------------------------------------------------------------------------------------------
# bad input: a clear error naming the file and the row; nothing already written is lost
def test_bad_csv_rows_are_named(luna, tmp_path):
    luna_dir = luna["truth"]["luna_dir"]
    uid = next(iter(luna["truth"]["nodules"]))
    bad = tmp_path / "annotations.csv"
    bad.write_text(HEADER + f"{uid},1.0,2.0,nan,5.0\n9.9.9,1.0,2.0,3.0,5.0\n{uid},1.0,2.0,3.0,-4\n")
    before = {p: open(p).read() for p in luna["summary"]["datalists"].values()}
    with pytest.raises(Luna16Error) as error:
        build_fold_datalists(luna_dir, luna["root"] / "lists", annotations=bad)
    message = str(error.value)
    assert str(bad) in message
    assert "line 2: coordZ = 'nan' is not a finite number" in message
    assert "line 3: unknown seriesuid 9.9.9" in message
    assert "line 4: diameter_mm = -4 is not positive" in message
    assert {p: open(p).read() for p in before} == before  # the earlier datalists are untouched

    missing = tmp_path / "submission.csv"
    missing.write_text("seriesuid,coordX,coordY,probability\n")
    with pytest.raises(Luna16Error, match="lacks the column"):
        evaluate_submission(os.path.join(luna_dir, "annotations.csv"), missing)


def test_broken_scans_are_named(tmp_path):
    truth = generate_luna16_like(tmp_path / "L", subsets=(0,), scans_per_subset=3, seed=1)
    headers = sorted((tmp_path / "L" / "subset0").glob("*.mhd"))
    os.remove(str(headers[0])[:-4] + ".raw")
    text = headers[1].read_text()
    headers[1].write_text(text.replace("DimSize = ", "DimSize = 9").replace("DimSize = 9", "DimSize = 1", 1))
    with pytest.raises(Luna16Error) as error:
        build_fold_datalists(truth["luna_dir"], tmp_path / "lists")
    message = str(error.value)
    assert f"{headers[0]}: its data file" in message and "does not exist" in message
    assert f"{headers[1]}: header DimSize" in message and "bytes but" in message
    assert not (tmp_path / "lists").exists()


# ----------------------------------------------------------------------------------------------------------
# end to end with the commands of the README
def _tool(*args) -> str:
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "luna16.py"), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_luna16_end_to_end(luna, tmp_path):
    bundle = "retinaunet_resencl_scratch_detection"
    luna_dir, lists = luna["truth"]["luna_dir"], tmp_path / "lists"
    output = _tool("datalist", "--luna_dir", luna_dir, "--output_dir", str(lists))
    assert "fold 0:" in output
    configs = ["configs/smoke.json", str(lists / "luna16_overrides.json")]
    common = dict(bundle_root=str(tmp_path / "run"), dataset_dir=luna_dir,
                  data_list_file_path=str(lists / "luna16_fold0.json"))
    # training and evaluation read the preprocessed scans from a disk cache, memory-mapped
    run_bundle(bundle, ["configs/train.json", *configs], str(tmp_path / "train.log"), max_epochs=2, epoch_length=6,
               val_interval=2, cache_dir=str(tmp_path / "cache"), **common)
    cached = [name for name in os.listdir(tmp_path / "cache") if name.endswith(".pt")]
    assert len(cached) == len(luna["truth"]["subset_of"])  # 8 training + 4 validation scans
    run_bundle(bundle, ["configs/inference.json", *configs], str(tmp_path / "inference.log"),
               output_dir=str(tmp_path / "inference"), save_png=True, **common)
    # one PNG per scan, named by its seriesuid (dots and all)
    fold0 = {u for u, s in luna["truth"]["subset_of"].items() if s == 0}
    assert {p[:-4] for p in os.listdir(tmp_path / "inference" / "png")} == fold0
    _tool("submission", "--predictions", str(tmp_path / "inference" / "predictions.json"),
          "--output", str(tmp_path / "submission.csv"))
    output = _tool("evaluate", "--annotations", os.path.join(luna_dir, "annotations.csv"),
                   "--excluded", os.path.join(luna_dir, "annotations_excluded.csv"),
                   "--submission", str(tmp_path / "submission.csv"),
                   "--seriesuids", str(lists / "luna16_fold0_seriesuids.csv"), "--bootstrap_samples", "100")
    lines = output.strip().splitlines()
    assert len([line for line in lines if line.startswith("sensitivity at")]) == 7
    assert lines[-1].startswith("CPM=")
    cpm = float(lines[-1][4:])
    assert 0.0 <= cpm <= 1.0

    # the bundle's own evaluation reports the same CPM from predictions.json and the datalist
    run_bundle(bundle, ["configs/train.json", "configs/evaluate.json", *configs], str(tmp_path / "evaluate.log"),
               output_dir=str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"), **common)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["luna16_cpm"] == pytest.approx(cpm, abs=1e-4)
