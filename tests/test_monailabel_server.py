"""The real MONAI Label server, driven over HTTP the way 3D Slicer's MONAI Label module drives it.

An app prepared by `tools/monailabel_app.py` (smoke preset, every detection bundle) is started with the command the
tool prints (`monailabel start_server`, on 127.0.0.1 and a free port) over a studies folder of synthetic NIfTI
scans with a flipped, offset affine. Over REST: `/info/` lists the models, `/infer/<model>?image=<id>` returns
Slicer's ROI JSON, whose LPS boxes must lie within one voxel of the boxes the bundle's own `inference.json`
writes for the same scan (its RAS `predictions.json`, converted to LPS); corrected boxes go to
`/datastore/label` as Slicer's "Submit Label" sends them; `/train/<model>` trains, and inference afterwards
serves the new `model.pt`. The server is stopped at the end whatever happens; every call has a timeout.

Runs in MONAI Label's virtualenv (`bash tools/monailabel_test.sh`); skipped where MONAI Label is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is not installed here: it needs numpy<2 and runs in its own virtualenv "
    "(bash tools/monailabel_test.sh)",
)
import requests  # a MONAI Label dependency
from monai.bundle import run as bundle_run

from test_monailabel import DETECTION_BUNDLES, SPACING, _synthetic_image, copy_with_random_weights
from monailabel_app import prepare_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINED = "retinaunet_resencl_scratch_detection"
DETECTIONS = 5
# a random-init network scores every box near its prior (0.01): a threshold of 0 lets boxes out
APP_OPTIONS = {"preset": "smoke", "score_thresh": 0.0, "detections_per_image": DETECTIONS,
               "overrides": {"epoch_length": 2, "val_interval": 1, "batch_size": 1, "num_workers": 0}}
CASES = {"case0": (((10, 12, 6), (17, 19, 11)), (60.0, -120.0, 40.0)),
         "case1": (((20, 14, 8), (27, 21, 13)), (-20.0, 35.0, -90.0))}
STARTUP_S, CALL_S, TRAIN_S = 180, 120, 600
LPS = np.array([-1.0, -1.0, 1.0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Server:
    def __init__(self, url: str, app_dir: str, bundles_dir: str, studies: str, log_path: str):
        self.url, self.app_dir, self.bundles_dir, self.studies, self.log_path = (
            url, app_dir, bundles_dir, studies, log_path)

    def log_tail(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def get(self, path: str, **params) -> requests.Response:
        response = requests.get(self.url + path, params=params, timeout=CALL_S)
        assert response.ok, f"GET {path}: {response.status_code} {response.text[:500]}\n{self.log_tail()}"
        return response

    def infer(self, model: str, image: str) -> list[dict]:
        """`/infer/<model>?image=<id>` as Slicer asks it (the label file back): the ROI markups."""
        response = requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": "image"},
                                 data={"params": "{}"}, timeout=CALL_S)
        assert response.ok, f"infer {model}: {response.status_code} {response.text[:500]}\n{self.log_tail()}"
        return response.json()["markups"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    bundles_dir, studies, app_dir = root / "bundles", root / "studies", root / "app"
    for name in DETECTION_BUNDLES:
        copy_with_random_weights(name, str(bundles_dir))
    studies.mkdir()
    for index, (case, (lesion, offset)) in enumerate(CASES.items()):
        _synthetic_image(str(studies / f"{case}.nii.gz"), lesion, offset, seed=index)

    port = _free_port()
    command = prepare_app(str(app_dir), studies=str(studies), bundles_dir=str(bundles_dir), port=port,
                          **APP_OPTIONS)
    # the `monailabel` script runs the `python` found first on PATH: this virtualenv's, as when it is activated
    venv_bin = os.path.dirname(sys.executable)
    command[0] = os.path.join(venv_bin, "monailabel")
    log_path = str(root / "server.log")
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", str(app_dir), str(bundles_dir), str(studies), log_path)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{server.log_tail()}"
            try:
                if requests.get(server.url + "/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"no answer within {STARTUP_S} s:\n{server.log_tail()}"
            time.sleep(1.0)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _own_predictions(bundle_root: str, image: str, work_dir) -> np.ndarray:
    """The bundle's own `inference.json` (RAS frame, as committed) on one scan: its boxes in LPS (cccwhd)."""
    datalist = work_dir / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": image}]}))
    configs = [os.path.join(bundle_root, "configs", c) for c in ("inference.json", "smoke.json")]
    bundle_run(config_file=configs, bundle_root=bundle_root, dataset_dir=os.path.dirname(image),
               data_list_file_path=str(datalist), output_dir=str(work_dir), device="cpu", num_workers=0,
               score_thresh=0.0, detections_per_image=DETECTIONS)
    with open(work_dir / "predictions.json") as f:
        (record,) = json.load(f)
    boxes = np.asarray(record["box"], dtype=float).reshape(-1, 6)
    return np.concatenate([boxes[:, :3] * LPS, boxes[:, 3:]], axis=1)


def _assert_same_boxes_within_a_voxel(rois: list[dict], expected: np.ndarray) -> None:
    """One ROI per expected box, each matched to its own box with centre and size within one voxel per axis."""
    assert len(rois) == len(expected) > 0
    spacing = np.asarray(SPACING)
    unmatched = list(range(len(expected)))
    for roi in rois:
        assert roi["type"] == "ROI" and roi["coordinateSystem"] == "LPS"
        box = np.asarray(roi["center"] + roi["size"], dtype=float)
        errors = [np.abs(box - expected[i]) / np.tile(spacing, 2) for i in unmatched]
        best = int(np.argmin([e.max() for e in errors]))
        assert errors[best].max() <= 1.0, f"ROI {box} is more than a voxel from every box {expected[unmatched]}"
        unmatched.pop(best)


def _slicer_label(boxes_lps: list[np.ndarray]) -> str:
    """What Slicer's "Submit Label" sends for a detection model: every ROI node's markups, as it saves them."""
    markups = [{
        "type": "ROI", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": False, "labelFormat": "%N-%d",
        "roiType": "Box", "insideOut": False, "center": box[:3].tolist(), "size": box[3:].tolist(),
        "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
        "controlPoints": [{"id": "1", "label": f"R-{i}", "position": box[:3].tolist(), "selected": True,
                           "locked": False, "visibility": True, "positionStatus": "defined"}],
        "measurements": [],
    } for i, box in enumerate(boxes_lps)]
    return json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                                  "Resources/Schema/markups-schema-v1.0.3.json#", "markups": markups})


def test_info_lists_every_detection_bundle_for_inference_and_training(server):
    info = server.get("/info/").json()
    assert sorted(info["models"]) == DETECTION_BUNDLES
    assert {model["type"] for model in info["models"].values()} == {"detection"}
    assert all(model["labels"] == {"lesion": 0} for model in info["models"].values())
    assert sorted(info["trainers"]) == DETECTION_BUNDLES
    images = server.get("/datastore/", output="all").json()["objects"]
    assert sorted(images) == sorted(CASES)


@pytest.mark.parametrize("name", DETECTION_BUNDLES)
def test_rois_match_the_bundles_own_predictions_in_lps(server, name, tmp_path):
    torch.set_num_threads(1)
    rois = server.infer(name, "case0")
    assert len(rois) == DETECTIONS
    expected = _own_predictions(os.path.join(server.bundles_dir, name), os.path.join(server.studies, "case0.nii.gz"),
                                tmp_path)
    _assert_same_boxes_within_a_voxel(rois, expected)


def test_submitted_boxes_train_the_model_and_inference_serves_it(server, tmp_path):
    torch.set_num_threads(1)
    before = server.infer(TRAINED, "case0")
    for index, (case, (lesion, offset)) in enumerate(CASES.items()):
        # the corrected boxes: the true lesions, in the LPS frame Slicer uses
        box_lps = _synthetic_image(str(tmp_path / f"{case}.nii.gz"), lesion, offset, seed=index)
        label = _slicer_label([box_lps])
        response = requests.put(f"{server.url}/datastore/label", params={"image": case, "tag": "final"},
                                files={"label": (f"{case}.json", label, "application/json")},
                                data={"params": json.dumps({"label_info": [], "model": TRAINED})}, timeout=CALL_S)
        assert response.ok, f"{response.status_code} {response.text[:500]}\n{server.log_tail()}"
    objects = server.get("/datastore/", output="all").json()["objects"]
    assert all("final" in objects[case]["labels"] for case in CASES)

    model_path = os.path.join(server.app_dir, "model", TRAINED, "models", "model.pt")
    digest = _digest(model_path)
    request = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    response = requests.post(f"{server.url}/train/{TRAINED}", json=request, timeout=CALL_S)
    assert response.ok, f"{response.status_code} {response.text[:500]}\n{server.log_tail()}"
    deadline = time.time() + TRAIN_S
    while (status := server.get("/train/").json().get("status")) not in ("DONE", "ERROR"):
        assert time.time() < deadline, f"training still {status} after {TRAIN_S} s\n{server.log_tail()}"
        time.sleep(2.0)
    assert status == "DONE", server.get("/train/").json().get("details", [])[-40:]
    assert _digest(model_path) != digest, "training did not write a new model.pt"

    after = server.infer(TRAINED, "case0")
    reference_root = tmp_path / "trained"
    shutil.copytree(os.path.join(server.bundles_dir, TRAINED), reference_root)
    trained = torch.load(model_path, weights_only=True)
    torch.save(trained.get("model", trained), reference_root / "models" / "model.pt")
    expected = _own_predictions(str(reference_root), os.path.join(server.studies, "case0.nii.gz"), tmp_path)
    _assert_same_boxes_within_a_voxel(after, expected)
    old = np.asarray([roi["center"] + roi["size"] for roi in before])
    new = np.asarray([roi["center"] + roi["size"] for roi in after])
    assert old.shape != new.shape or not np.allclose(old, new), "inference still serves the old model"
