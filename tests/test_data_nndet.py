"""nnDetection raw -> datalist conversion on a tiny hand-made dataset, and nnDetection box converters."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddet.data import (
    boxes_from_instance_mask,
    convert_nndet_raw,
    load_datalist,
    monai_box_to_nndet,
    nndet_box_to_monai,
)

# case "a": diagonal affine, spacing (2, 3, 4), origin (10, 20, 30)
AFFINE_A = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
# case "b": permuted axes with a flip: world x = -1.5 k + 5, y = 2 i - 7, z = 0.5 j + 1
AFFINE_B = np.array([[0, 0, -1.5, 5], [2.0, 0, 0, -7], [0, 0.5, 0, 1], [0, 0, 0, 1]])


def _save(array, affine, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _make_raw(root: Path, channels: int = 2, description: str = "json") -> Path:
    """Two cases; instance 1 of "a" on voxels x 1..2, y 0, z 3; instance 2 of "b" on i 2..3, j 1..4, k 0..1."""
    mask_a = np.zeros((6, 5, 4), np.uint8)
    mask_a[1:3, 0, 3] = 1
    mask_b = np.zeros((5, 6, 3), np.uint8)
    mask_b[2:4, 1:5, 0:2] = 2
    for case, mask, affine, instances in (("a", mask_a, AFFINE_A, {"1": 0}), ("b", mask_b, AFFINE_B, {"2": 1})):
        for channel in range(channels):
            _save(np.random.default_rng(channel).normal(size=mask.shape).astype(np.float32), affine,
                  root / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        _save(mask, affine, root / "labelsTr" / f"{case}.nii.gz")
        (root / "labelsTr" / f"{case}.json").write_text(json.dumps({"instances": instances}))
    meta = {"name": "Tiny", "labels": {"0": "small", "1": "large"},
            "modalities": {str(c): f"mod{c}" for c in range(channels)}, "dim": 3}
    if description == "json":
        (root / "dataset.json").write_text(json.dumps(meta))
    else:
        import yaml

        (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    return root


def _by_case(datalist: dict) -> dict:
    items = datalist["training"] + datalist["validation"]
    return {Path(item["instance_mask"]).name.split(".")[0]: item for item in items}


def test_boxes_equal_hand_computed_values(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    datalist = convert_nndet_raw(raw, validation_fraction=0.5)
    cases = _by_case(datalist)
    assert len(datalist["training"]) == len(datalist["validation"]) == 1
    # a: voxel box [1, 0, 3, 3, 1, 4]; centres (2, 0.5, 3.5) - 0.5 -> (1.5, 0, 3) voxel -> world
    np.testing.assert_allclose(cases["a"]["box"], [[1.5 * 2 + 10, 0 * 3 + 20, 3 * 4 + 30, 2 * 2, 1 * 3, 1 * 4]])
    assert cases["a"]["label"] == [0]
    # b: voxel box [2, 1, 0, 4, 5, 2]; continuous centre (2.5, 2.5, 0.5); sizes (2, 4, 2) voxels
    np.testing.assert_allclose(cases["b"]["box"],
                               [[-1.5 * 0.5 + 5, 2 * 2.5 - 7, 0.5 * 2.5 + 1, 1.5 * 2, 2 * 2, 0.5 * 4]])
    assert cases["b"]["label"] == [1]
    # two channels -> a list of channel paths in channel order, relative to raw_dir
    assert cases["b"]["image"] == ["imagesTr/b_0000.nii.gz", "imagesTr/b_0001.nii.gz"]


def test_single_channel_yaml_and_written_datalist_loads(tmp_path):
    raw = _make_raw(tmp_path / "raw", channels=1, description="yaml")
    output = tmp_path / "lists" / "datalist.json"
    datalist = convert_nndet_raw(raw, output, validation_fraction=0.5, seed=1)
    assert json.loads(output.read_text()) == datalist
    for item in datalist["training"] + datalist["validation"]:
        assert isinstance(item["image"], str) and item["image"].startswith("../raw/imagesTr/")
    loaded = load_datalist(output, num_classes=2) + load_datalist(output, data_list_key="validation")
    assert sorted(len(item["box"]) for item in loaded) == [1, 1]
    assert all(Path(item["image"]).is_absolute() and Path(item["image"]).is_file() for item in loaded)


def test_split_is_deterministic_and_complete(tmp_path):
    raw = _make_raw(tmp_path / "raw", channels=1)
    for extra in "cdef":
        for suffix in ("_0000.nii.gz", ".nii.gz", ".json"):
            source = raw / ("imagesTr" if suffix == "_0000.nii.gz" else "labelsTr") / f"a{suffix}"
            source.parent.joinpath(f"{extra}{suffix}").write_bytes(source.read_bytes())
    first = convert_nndet_raw(raw, validation_fraction=0.4, seed=3)
    assert first == convert_nndet_raw(raw, validation_fraction=0.4, seed=3)
    names = [sorted(_by_case({"training": first[k], "validation": []})) for k in ("training", "validation")]
    assert len(names[1]) == 2 and sorted(names[0] + names[1]) == list("abcdef")
    splits = {tuple(sorted(_by_case({"training": [], "validation": convert_nndet_raw(raw, seed=s)["validation"]})))
              for s in range(6)}
    assert len(splits) > 1, "the seed changes the split"


def test_task_folder_layout_and_test_images(tmp_path):
    task = tmp_path / "Task001_Tiny"
    _make_raw(task / "raw_splitted", channels=1)
    (task / "raw_splitted" / "dataset.json").rename(task / "dataset.json")
    _save(np.zeros((4, 4, 4), np.int16), np.eye(4), task / "raw_splitted" / "imagesTs" / "t_0000.nii.gz")
    datalist = convert_nndet_raw(task)
    assert datalist["test"] == [{"image": "raw_splitted/imagesTs/t_0000.nii.gz"}]


def test_missing_labels_json(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    (raw / "labelsTr" / "b.json").unlink()
    with pytest.raises(ValueError, match=r"labelsTr/b\.json: labels json missing for case 'b'"):
        convert_nndet_raw(raw)


def test_instance_in_mask_missing_from_json(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    (raw / "labelsTr" / "b.json").write_text(json.dumps({"instances": {"1": 0}}))
    expected = r"labelsTr/b\.json: instances \[2\] are in the mask b\.nii\.gz but not in the json"
    with pytest.raises(ValueError, match=expected):
        convert_nndet_raw(raw)


def test_json_instance_absent_from_mask_warns_and_is_skipped(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    (raw / "labelsTr" / "a.json").write_text(json.dumps({"instances": {"1": 0, "7": 1}}))
    with pytest.warns(UserWarning, match=r"a\.json: instances \[7\] are listed but absent"):
        datalist = convert_nndet_raw(raw)
    assert _by_case(datalist)["a"]["label"] == [0]


def test_missing_channel_file(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    (raw / "imagesTr" / "a_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"imagesTr/a_0001\.nii\.gz: channel file missing \(case 'a', 2 channels"):
        convert_nndet_raw(raw)


def test_class_not_in_dataset_labels(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    (raw / "labelsTr" / "a.json").write_text(json.dumps({"instances": {"1": 5}}))
    with pytest.raises(ValueError, match=r"a\.json: classes \[5\] are not in the dataset labels \[0, 1\]"):
        convert_nndet_raw(raw)


def test_boxes_from_instance_mask_matches_nonzero():
    rng = np.random.default_rng(0)
    mask = np.zeros((9, 8, 7), np.int32)
    for instance in (1, 2, 5):
        lo = rng.integers(0, 4, 3)
        hi = lo + rng.integers(1, 4, 3)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = instance
    boxes = boxes_from_instance_mask(mask)
    assert sorted(boxes) == sorted(int(v) for v in np.unique(mask) if v)
    for instance, box in boxes.items():
        coordinates = np.argwhere(mask == instance)
        np.testing.assert_array_equal(box, np.concatenate([coordinates.min(0), coordinates.max(0) + 1]))
    with pytest.raises(TypeError, match="integer"):
        boxes_from_instance_mask(mask.astype(np.float32))


def test_nndet_box_convention_round_trip():
    # nnDetection's box of voxels x 1..2, y 0..0, z 3..3: (min - 1, ..., max + 1) in order x1, y1, x2, y2, z1, z2
    nndet = np.array([0.0, -1.0, 3.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(nndet_box_to_monai(nndet), [1, 0, 3, 3, 1, 4])
    np.testing.assert_array_equal(monai_box_to_nndet([1, 0, 3, 3, 1, 4]), nndet)
    boxes = np.random.default_rng(1).uniform(0, 50, (5, 6))
    np.testing.assert_allclose(monai_box_to_nndet(nndet_box_to_monai(boxes)), boxes)
    np.testing.assert_allclose(nndet_box_to_monai(monai_box_to_nndet(boxes)), boxes)
