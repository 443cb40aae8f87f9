"""Synthetic dataset generator: determinism, geometry, and boxes that match the written masks."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddet.data import PRESETS, boxes_world_to_voxel, generate_dataset, load_datalist, synthesize_case

NUM_TRAINING, NUM_VALIDATION = 6, 2


@pytest.fixture(scope="module")
def easy_datalist(tmp_path_factory) -> Path:
    return Path(generate_dataset(tmp_path_factory.mktemp("easy"), "easy", NUM_TRAINING, NUM_VALIDATION, seed=7))


def _items(datalist_path: Path) -> list[dict]:
    content = json.loads(datalist_path.read_text())
    return content["training"] + content["validation"]


def _arrays(datalist_path: Path, item: dict):
    image = nib.load(str(datalist_path.parent / item["image"]))
    mask = nib.load(str(datalist_path.parent / item["instance_mask"]))
    return np.asanyarray(image.dataobj), np.asanyarray(mask.dataobj), image.affine, mask.affine


def test_layout_and_split(easy_datalist):
    root = easy_datalist.parent
    content = json.loads(easy_datalist.read_text())
    assert len(content["training"]) == NUM_TRAINING and len(content["validation"]) == NUM_VALIDATION
    description = json.loads((root / "dataset.json").read_text())
    assert description["labels"] == {"0": "lesion"} and description["modalities"] == {"0": "CT"}
    for case in range(NUM_TRAINING + NUM_VALIDATION):
        assert (root / "imagesTr" / f"case_{case:04d}_0000.nii.gz").is_file()
        assert (root / "labelsTr" / f"case_{case:04d}.nii.gz").is_file()
        assert "instances" in json.loads((root / "labelsTr" / f"case_{case:04d}.json").read_text())


def test_same_seed_identical_different_seed_differs(easy_datalist, tmp_path):
    again = Path(generate_dataset(tmp_path / "again", "easy", NUM_TRAINING, NUM_VALIDATION, seed=7))
    assert again.read_bytes() == easy_datalist.read_bytes()
    for first, second in zip(_items(easy_datalist), _items(again)):
        image_a, mask_a, affine_a, _ = _arrays(easy_datalist, first)
        image_b, mask_b, affine_b, _ = _arrays(again, second)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_array_equal(affine_a, affine_b)

    other = Path(generate_dataset(tmp_path / "other", "easy", NUM_TRAINING, NUM_VALIDATION, seed=8))
    assert other.read_bytes() != easy_datalist.read_bytes()
    image_a = _arrays(easy_datalist, _items(easy_datalist)[0])[0]
    image_c = _arrays(other, _items(other)[0])[0]
    assert image_a.shape != image_c.shape or not np.array_equal(image_a, image_c)


def test_affines_flipped_offset_and_some_permuted(easy_datalist):
    every = PRESETS["easy"]["permute_every"]
    for index, item in enumerate(_items(easy_datalist)):
        image, _, affine, mask_affine = _arrays(easy_datalist, item)
        np.testing.assert_array_equal(affine, mask_affine)
        linear = affine[:3, :3]
        assert not np.allclose(affine, np.eye(4))
        assert (linear < 0).any(), "every case is flipped along at least one axis"
        assert np.abs(affine[:3, 3]).max() > 0
        # exactly one non-zero per row/column: flips and permutations only
        assert np.array_equal((np.abs(linear) > 0).sum(0), [1, 1, 1])
        permuted = not np.allclose(linear, np.diag(np.diag(linear)))
        assert permuted == (index % every == every - 1), f"case {index}"
        # easy has fixed spacing; with a permutation it sits on other array axes
        assert sorted(np.abs(linear).sum(0).round(4).tolist()) == [1.5, 1.5, 2.0]
        assert image.dtype == np.int16 and image.ndim == 3


def test_lesion_counts_within_preset(easy_datalist):
    config = PRESETS["easy"]
    counts = []
    for item in _items(easy_datalist):
        _, mask, _, _ = _arrays(easy_datalist, item)
        case = Path(item["image"]).name[: -len("_0000.nii.gz")]
        instances = json.loads((easy_datalist.parent / "labelsTr" / f"{case}.json").read_text())["instances"]
        ids = sorted(int(v) for v in np.unique(mask) if v > 0)
        assert ids == list(range(1, len(ids) + 1)) == sorted(int(k) for k in instances)
        assert len(item["box"]) == len(item["label"]) == len(ids) <= config["max_lesions"]
        assert set(item["label"]) <= {0}
        sizes = np.asarray(item["box"], dtype=float).reshape(-1, 6)[:, 3:]
        assert np.all(sizes >= 1.5) and np.all(sizes <= config["lesion_diameter_mm"][1] * 1.25 + 2 * 2.0)
        counts.append(len(ids))
    assert max(counts) >= 1


def test_world_boxes_enclose_exactly_the_instance_voxels(easy_datalist):
    checked = 0
    for item in _items(easy_datalist):
        _, mask, affine, _ = _arrays(easy_datalist, item)
        if not item["box"]:
            continue
        voxel_boxes = boxes_world_to_voxel(np.asarray(item["box"]), affine)
        for instance, box in enumerate(voxel_boxes, start=1):
            coordinates = np.argwhere(mask == instance)
            expected = np.concatenate([coordinates.min(0), coordinates.max(0) + 1])
            np.testing.assert_allclose(box, expected, atol=1e-3)
            checked += 1
    assert checked >= 2


def test_monai_loader_sees_the_nibabel_affine(easy_datalist):
    from monai.transforms import EnsureChannelFirst, LoadImage

    loader, channel_first = LoadImage(image_only=True), EnsureChannelFirst()
    every = PRESETS["easy"]["permute_every"]
    for item in _items(easy_datalist)[every - 2: every]:  # an unpermuted and a permuted case
        image, _, affine, _ = _arrays(easy_datalist, item)
        loaded = channel_first(loader(str(easy_datalist.parent / item["image"])))
        np.testing.assert_allclose(np.asarray(loaded.affine), affine, atol=1e-6)
        assert tuple(loaded.shape) == (1, *image.shape)
        np.testing.assert_array_equal(loaded[0].numpy(), image)


def test_generated_datalist_passes_validation(easy_datalist):
    items = load_datalist(easy_datalist, num_classes=1) + load_datalist(easy_datalist, data_list_key="validation")
    assert len(items) == NUM_TRAINING + NUM_VALIDATION
    assert all(item["box"].shape == (len(item["label"]), 6) for item in items)


def test_realistic_case_is_ct_like():
    config = PRESETS["realistic"]
    image, instances, affine, count = synthesize_case(config, np.random.default_rng((0, 3)), case_index=3)
    assert image.dtype == np.int16 and instances.dtype == np.uint8
    assert count <= config["max_lesions"] and count == instances.max()
    spacing = np.abs(affine[:3, :3]).sum(0)
    low, high = min(config["in_plane_spacing_mm"][0], config["slice_spacing_mm"][0]), config["slice_spacing_mm"][1]
    assert np.all(spacing >= low - 1e-6) and np.all(spacing <= high + 1e-6)
    assert max(image.shape) <= max(config["shape_max"]) and min(image.shape) >= min(config["shape_min"])
    corners = image[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    assert np.all(corners < -800), "air outside the body"
    assert np.any((image > -900) & (image < -700)), "lung-like density present"
    assert np.any((image > 0) & (image < 100)), "soft tissue present"


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'hard'"):
        generate_dataset(tmp_path, "hard")
