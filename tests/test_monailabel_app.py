"""`tools/monailabel_app.py` writes a MONAI Label app folder without touching the bundles it copies (no MONAI Label
needed: the server itself is driven in tests/test_monailabel_server.py, in MONAI Label's virtualenv)."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from meddet.data.boxes import boxes_voxel_to_world

from monailabel_app import detection_bundles, prepare_app, render, roi_voxel_boxes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RETINA, DETR = "retinaunet_resencl_mae_detection", "defdetr_resencl_scratch_detection"


def _config(app_dir, name: str, config: str) -> dict:
    with open(os.path.join(app_dir, "model", name, "configs", config)) as f:
        return json.load(f)


@pytest.fixture
def bundles_dir(tmp_path):
    for name in (RETINA, DETR):
        shutil.copytree(os.path.join(REPO, "bundles", name), tmp_path / "bundles" / name)
    return str(tmp_path / "bundles")


def test_serves_every_detection_bundle_by_default():
    names = detection_bundles(os.path.join(REPO, "bundles"))
    assert len(names) == 14 and all(name.endswith("_detection") for name in names)


def test_served_configs_take_the_viewer_frame_the_preset_and_the_options(tmp_path, bundles_dir):
    committed = open(os.path.join(bundles_dir, RETINA, "configs", "inference.json")).read()
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"spacing": [0.7, 0.7, 1.25], "intensity_mean": 12.5}))
    command = prepare_app(str(tmp_path / "app"), studies=str(tmp_path / "images"), bundles_dir=bundles_dir,
                          preset="smoke", plans=str(plans), score_thresh=0.02, detections_per_image=7, port=8123,
                          overrides={"weight_decay": 0.001, "save_png": True})
    assert command[:2] == ["monailabel", "start_server"] and command[command.index("--port") + 1] == "8123"
    assert command[command.index("--app") + 1] == str(tmp_path / "app")
    assert os.path.isfile(tmp_path / "app" / "main.py")
    with open(os.path.join(bundles_dir, RETINA, "configs", "smoke.json")) as f:
        smoke = json.load(f)
    for name in (RETINA, DETR):
        inference, train = (_config(tmp_path / "app", name, c) for c in ("inference.json", "train.json"))
        for content in (inference, train):
            assert content["affine_lps_to_ras"] is True
            assert content["spacing"] == [0.7, 0.7, 1.25] and content["intensity_mean"] == 12.5  # plans over preset
            assert "_meta_" not in content
        assert inference["patch_size"] == train["patch_size"] == smoke["patch_size"]
        assert inference["displayable_configs"]["display_score_thresh"] == 0.02
        assert inference["score_thresh"] == 0.02  # the candidate threshold (0.05) lowered to it
        assert inference["detections_per_image"] == 7
        # each override goes to the configs that define the key
        assert inference["save_png"] is True and "save_png" not in train
        assert train["weight_decay"] == 0.001 and "weight_decay" not in inference
    assert open(os.path.join(bundles_dir, RETINA, "configs", "inference.json")).read() == committed


def test_a_higher_display_threshold_keeps_the_candidate_threshold(tmp_path, bundles_dir):
    prepare_app(str(tmp_path / "app"), bundles=RETINA, bundles_dir=bundles_dir, score_thresh=0.5)
    inference = _config(tmp_path / "app", RETINA, "inference.json")
    assert inference["displayable_configs"]["display_score_thresh"] == 0.5 and inference["score_thresh"] == 0.05
    assert sorted(os.listdir(tmp_path / "app" / "model")) == [RETINA]


def test_preparing_again_keeps_the_weights_the_app_has_trained(tmp_path, bundles_dir, capsys):
    app = tmp_path / "app"
    prepare_app(str(app), bundles=RETINA, bundles_dir=bundles_dir)
    out = capsys.readouterr().out
    assert "no models/model.pt yet" in out and "download_large_files" in out  # pre-trained: encoder not fetched
    trained = app / "model" / RETINA / "models" / "model.pt"
    trained.parent.mkdir(exist_ok=True)
    trained.write_bytes(b"trained by MONAI Label")
    prepare_app(str(app), bundles=f"{RETINA},{DETR}", bundles_dir=bundles_dir, detections_per_image=3)
    assert trained.read_bytes() == b"trained by MONAI Label"
    assert _config(app, RETINA, "inference.json")["detections_per_image"] == 3
    assert "models/ kept" in capsys.readouterr().out


def test_bad_requests_name_the_problem(tmp_path, bundles_dir):
    with pytest.raises(ValueError, match="not a detection bundle.*retinaunet_nndet_mae_detection.*available"):
        prepare_app(str(tmp_path / "app"), bundles="retinaunet_nndet_mae_detection", bundles_dir=bundles_dir)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        prepare_app(str(tmp_path / "app"), bundles_dir=str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="missing_plans.json"):
        prepare_app(str(tmp_path / "app"), bundles_dir=bundles_dir, plans=str(tmp_path / "missing_plans.json"))
    with pytest.raises(ValueError, match="preset"):
        prepare_app(str(tmp_path / "app"), bundles_dir=bundles_dir, preset="tiny")
    with pytest.raises(ValueError, match="score_thresh"):
        prepare_app(str(tmp_path / "app"), bundles_dir=bundles_dir, score_thresh=5)
    assert not os.path.exists(tmp_path / "app")  # refused before anything was written


def _roi_json(path, boxes_lps, coordinate_system="LPS") -> str:
    markups = [{"type": "ROI", "coordinateSystem": coordinate_system, "center": list(b[:3]), "size": list(b[3:])}
               for b in boxes_lps]
    path.write_text(json.dumps({"markups": markups}))
    return str(path)


def test_render_places_the_viewers_rois_on_their_voxels(tmp_path):
    affine = np.diag([-0.8, 0.7, 2.5, 1.0])  # flipped first axis, offset origin
    affine[:3, 3] = (40.0, -75.0, 12.0)
    image = str(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(30, 28, 12)).astype(np.float32), affine), image)
    voxel_boxes = np.array([[4.0, 6.0, 2.0, 10.0, 9.0, 5.0], [20.0, 3.0, 7.0, 26.0, 12.0, 11.0]])
    boxes_lps = boxes_voxel_to_world(voxel_boxes, affine) * np.array([-1, -1, 1, 1, 1, 1])
    rois = _roi_json(tmp_path / "rois.json", boxes_lps)
    np.testing.assert_allclose(roi_voxel_boxes(rois, affine), voxel_boxes, atol=1e-6)
    out = render(image, rois, str(tmp_path / "png" / "rois.png"),
                 ground_truth=boxes_voxel_to_world(voxel_boxes[:1], affine).tolist())
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="rois_ras.json: markup 0 is not an LPS ROI"):
        roi_voxel_boxes(_roi_json(tmp_path / "rois_ras.json", boxes_lps, "RAS"), affine)
