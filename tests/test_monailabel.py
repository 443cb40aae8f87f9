"""MONAI Label 0.8.5 (`monaibundle` app) drives a detection bundle: BundleInferTask and BundleTrainTask.

MONAI Label needs numpy < 2 (pydicom-seg), so it is installed in its own virtualenv
(`bash tools/monailabel_test.sh` creates it and runs this file there); where it is not importable the module
is skipped. What MONAI Label 0.8.5 does with a bundle (read in `monailabel/tasks/infer/bundle.py`,
`tasks/infer/basic_infer.py`, `tasks/train/bundle.py`, `transform/writer.py`):

- inference reads `configs/inference.json`: `network_def` (instantiated, `models/model.pt` loaded non-strict),
  `preprocessing` (a Compose is unpacked into its transforms), `detector` + `detector_ops`, `postprocessing`;
  it calls `detector.network = <loaded network>` and `detector(image[None], use_inferer=True)`, puts the
  first image's dict (`box`, `label`, `label_scores`) into the data, applies the postprocessing and writes
  `box` (taken as world `cccwhd`) and `label` (scores are dropped) to a 3D Slicer Markups ROI JSON whose
  coordinate system is declared LPS;
- training reads `configs/train.json` and overrides `bundle_root`, `device`, `train#trainer#max_epochs`,
  `train#dataset#data` and `validate#dataset#data` (items `{"image", "box" (Slicer ROI centre + size), "label"}`)
  and `train#handlers` (a non-strict CheckpointLoader of `models/model.pt` into `@network` is inserted).

Each bundle here is served as `tools/monailabel_app.py` prepares it: its smoke preset folded into both configs (MONAI
Label reads only those two files), `affine_lps_to_ras: true` (Slicer's boxes are LPS) and, for a random-init
network, a score threshold of 0.0 so that boxes come out.

MONAI Label puts the image's file name under `image_path` in the data; MONAI >= 1.5's `Spacingd` calls
`.update()` on every `image_*` entry of NIfTI data and so fails on that string ("'str' object has no attribute
'update'"): the preprocessing must resample with the array transform (`Lambdad(keys="image", func=Spacing(...))`).
"""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is not installed here: it needs numpy<2 and runs in its own virtualenv "
    "(bash tools/monailabel_test.sh)",
)

from monai.bundle import ConfigParser
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.detection import create_slicer_detection_json

from meddet.data.boxes import boxes_voxel_to_world
from monailabel_app import prepare_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# training: one bundle per detector family (the pre-trained variants share their family's configs and need their
# encoder checkpoint to start); inference: every detection bundle
BUNDLES = ["retinaunet_resencl_scratch_detection", "retinaunet_nndet_scratch_detection",
           "defdetr_resencl_scratch_detection"]
DETECTION_BUNDLES = sorted(name for name in os.listdir(os.path.join(REPO, "bundles")) if name.endswith("_detection"))
# a random-init network scores every box near its prior (0.01): a threshold of 0 lets boxes out
APP_OPTIONS = {"preset": "smoke", "score_thresh": 0.0, "detections_per_image": 5,
               "overrides": {"epoch_length": 2, "val_interval": 1, "batch_size": 1, "num_workers": 0}}
SHAPE = (40, 36, 20)
SPACING = (1.5, 1.5, 2.0)


def copy_with_random_weights(name: str, bundles_dir) -> str:
    """A copy of a committed bundle with a seeded random-init smoke network as `models/model.pt`."""
    bundle_root = os.path.join(bundles_dir, name)
    shutil.copytree(os.path.join(REPO, "bundles", name), bundle_root, ignore=shutil.ignore_patterns("models", "eval"))
    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_root, "configs", c) for c in ("inference.json", "smoke.json")])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def", lazy=False)
    os.makedirs(os.path.join(bundle_root, "models"))
    torch.save(network.state_dict(), os.path.join(bundle_root, "models", "model.pt"))
    return bundle_root


def _prepare_bundle(root, name: str) -> str:
    """The bundle served as `tools/monailabel_app.py` prepares it, with random-init weights: its root in the app."""
    source = root / "source"
    copy_with_random_weights(name, str(source))
    prepare_app(str(root / "app"), bundles=name, bundles_dir=str(source), **APP_OPTIONS)
    return str(root / "app" / "model" / name)


def _affine(offset) -> np.ndarray:
    """Flipped first axis and a far-off origin: voxel indices, RAS and LPS boxes all land in different places."""
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = offset
    return affine


def _synthetic_image(path, lesion_voxels, offset, seed: int) -> np.ndarray:
    """CT-like volume (lung -800 HU + noise) with one +40 HU ellipsoid; returns its LPS world box (cccwhd)."""
    rng = np.random.default_rng(seed)
    volume = -800.0 + 30.0 * rng.standard_normal(SHAPE)
    (x0, y0, z0), (x1, y1, z1) = lesion_voxels  # inclusive voxel ranges
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2])
    radius = np.array([(x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2, (z1 - z0 + 1) / 2])
    volume[(((grid - centre) / radius) ** 2).sum(-1) <= 1.0] = 40.0
    affine = _affine(offset)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(path))
    box_ras = boxes_voxel_to_world(np.array([[x0, y0, z0, x1 + 1, y1 + 1, z1 + 1]], dtype=float), affine)[0]
    return box_ras * np.array([-1, -1, 1, 1, 1, 1])


def _world_extent_ras(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k] for i in (-0.5, SHAPE[0] - 0.5) for j in (-0.5, SHAPE[1] - 0.5)
                        for k in (-0.5, SHAPE[2] - 0.5)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(0), world.max(0)


def _reference_detections(bundle_root: str, image_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's own components, without MONAI Label: LPS world cccwhd boxes and labels."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "inference.json"))
    parser["bundle_root"] = bundle_root
    parser["device"] = "cpu"
    data = parser.get_parsed_content("preprocessing")({"image": image_path})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(os.path.join(bundle_root, "models", "model.pt"), weights_only=True))
    detector = parser.get_parsed_content("detector")
    detector.network = network.eval()
    with torch.no_grad():
        detections = detector.eval()(data["image"][None], use_inferer=True)[0]
    boxes = boxes_voxel_to_world(detections["box"].numpy(), data["image"].affine)
    return boxes * np.array([-1, -1, 1, 1, 1, 1]), detections["label"].numpy()


class _ListDatastore:
    """The one datastore call BundleTrainTask makes: `datalist()` -> [{"image": path, "label": ROI JSON path}]."""

    def __init__(self, items: list[dict]):
        self.items = items

    def datalist(self) -> list[dict]:
        return list(self.items)


def test_every_detection_bundle_is_served():
    assert len(DETECTION_BUNDLES) == 14 and set(BUNDLES) <= set(DETECTION_BUNDLES)


@pytest.mark.parametrize("name", DETECTION_BUNDLES)
def test_bundle_infer_task_returns_world_boxes_and_writes_slicer_json(tmp_path, name):
    torch.set_num_threads(1)
    bundle_root = _prepare_bundle(tmp_path, name)
    offset = (60.0, -120.0, 40.0)
    image_path = str(tmp_path / "case.nii.gz")
    _synthetic_image(image_path, ((10, 12, 6), (17, 19, 11)), offset, seed=0)

    task = BundleInferTask(bundle_root, conf={})
    assert task.is_valid()
    assert task.type == "detection"  # from the folder name
    assert task.labels == {"lesion": 0}  # from metadata's output channel_def
    label_file, result = task({"image": image_path, "device": "cpu"})

    boxes, labels = np.asarray(result["box"], dtype=float), np.asarray(result["label"])
    assert boxes.shape[1:] == (6,) and 1 <= len(boxes) <= APP_OPTIONS["detections_per_image"]
    assert labels.shape == (len(boxes),) and set(labels.tolist()) <= {0}
    assert (boxes[:, 3:] > 0).all()
    # world frame: RAS centres (LPS with x, y negated) lie inside the image's world extent (1 voxel slack);
    # voxel-index boxes or an LPS/RAS mix-up fall outside it for this affine
    low, high = _world_extent_ras(_affine(offset))
    centres_ras = boxes[:, :3] * np.array([-1, -1, 1])
    assert ((centres_ras >= low - max(SPACING)) & (centres_ras <= high + max(SPACING))).all(), centres_ras

    expected_boxes, expected_labels = _reference_detections(bundle_root, image_path)
    np.testing.assert_allclose(boxes, expected_boxes, atol=1e-3)
    np.testing.assert_array_equal(labels, expected_labels)

    with open(label_file) as f:
        markups = json.load(f)["markups"]
    assert len(markups) == len(boxes)
    for roi, box, label in zip(markups, boxes, labels):
        assert roi["type"] == "ROI" and roi["coordinateSystem"] == "LPS"
        np.testing.assert_allclose(roi["center"], box[:3], atol=1e-4)
        np.testing.assert_allclose(roi["size"], box[3:], atol=1e-4)
        assert roi["label"]["value"] == label
    os.remove(label_file)


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_train_task_trains_and_saves_the_model(tmp_path, name):
    torch.set_num_threads(1)
    bundle_root = _prepare_bundle(tmp_path, name)
    items = []
    for index, (lesion, offset) in enumerate([(((8, 10, 5), (15, 17, 10)), (60.0, -120.0, 40.0)),
                                              (((20, 14, 8), (27, 21, 13)), (-20.0, 35.0, -90.0))]):
        image_path = str(tmp_path / f"case{index}.nii.gz")
        box_lps = _synthetic_image(image_path, lesion, offset, seed=index)
        roi_file, _ = create_slicer_detection_json({"box": [box_lps.tolist()], "label": [0], "image": image_path})
        label_path = str(tmp_path / f"case{index}.json")
        shutil.move(roi_file, label_path)
        items.append({"image": image_path, "label": label_path})

    task = BundleTrainTask(bundle_root, conf={})
    assert task.is_valid()
    model_path = os.path.join(bundle_root, "models", "model.pt")
    before = torch.load(model_path, weights_only=True)
    os.utime(model_path, (0, 0))
    request = {"model": name, "device": "cpu", "max_epochs": 1, "val_split": 0.5, "multi_gpu": False,
               "pretrained": True}
    assert task(request, _ListDatastore(items)) == {}

    # one epoch of 2 iterations, then validation on the other case saved the best model over model.pt
    assert os.path.getmtime(model_path) > 0
    after = torch.load(model_path, weights_only=True)
    after = after.get("model", after)
    assert set(after) == set(before)
    assert any(not torch.equal(after[key], before[key]) for key in before)


def test_display_score_threshold_from_the_request_filters_the_boxes(tmp_path):
    torch.set_num_threads(1)
    bundle_root = _prepare_bundle(tmp_path, BUNDLES[0])
    image_path = str(tmp_path / "case.nii.gz")
    _synthetic_image(image_path, ((10, 12, 6), (17, 19, 11)), (60.0, -120.0, 40.0), seed=0)

    task = BundleInferTask(bundle_root, conf={})
    assert task.config()["display_score_thresh"] == 0.0  # offered to the user with its default
    all_file, all_boxes = task({"image": image_path, "device": "cpu"})
    # a random-init network scores every box near its prior (0.01): any threshold above that drops them all
    none_file, no_boxes = task({"image": image_path, "device": "cpu", "display_score_thresh": 0.5})
    assert len(all_boxes["box"]) >= 1 and len(no_boxes["box"]) == 0 and len(no_boxes["label"]) == 0
    with open(none_file) as f:
        assert json.load(f)["markups"] == []
    for path in (all_file, none_file):
        os.remove(path)


def test_bundle_infer_task_reads_dicom_series_and_metaimage_like_nifti(tmp_path):
    from test_image_formats import _ct_volume, write_dicom_series, write_itk, write_nifti

    torch.set_num_threads(1)
    bundle_root = _prepare_bundle(tmp_path, BUNDLES[0])
    data = _ct_volume()
    task = BundleInferTask(bundle_root, conf={})
    results = {}
    for name, path in (("nifti", write_nifti(tmp_path / "case.nii.gz", data)),
                       ("mhd", write_itk(tmp_path / "case.mhd", data)),
                       ("dicom", write_dicom_series(tmp_path / "series", data))):
        label_file, result = task({"image": path, "device": "cpu"})
        os.remove(label_file)
        results[name] = np.asarray(result["box"], dtype=float).reshape(-1, 6)
    assert len(results["nifti"]) > 0
    for name in ("mhd", "dicom"):
        np.testing.assert_allclose(results[name], results["nifti"], atol=0.5, err_msg=name)
