"""World <-> voxel box handling through the bundles' transform chains, on a flipped, permuted, anisotropic grid."""

import nibabel as nib
import numpy as np
import pytest
import torch

from meddet.data.boxes import boxes_voxel_to_world, boxes_world_to_voxel
from meddet.data.transforms import postprocessing, training_transforms, validation_transforms

NORMALISATION = dict(intensity_clip=(-1000.0, 1000.0), intensity_mean=0.0, intensity_std=500.0)

# array axis 0 -> world -y (flipped), axis 1 -> world x, axis 2 -> world z (flipped); anisotropic spacing
AFFINE = np.array([
    [0.0, 0.7, 0.0, -20.0],
    [-0.9, 0.0, 0.0, 35.0],
    [0.0, 0.0, -2.5, 60.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _write_case(path, lesion_voxels):
    data = np.full((40, 36, 20), -800, dtype=np.int16)
    (i0, i1), (j0, j1), (k0, k1) = lesion_voxels
    data[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = 400
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    voxel_box = np.array([[i0, j0, k0, i1 + 1, j1 + 1, k1 + 1]], dtype=np.float64)
    return boxes_voxel_to_world(voxel_box, AFFINE)


def test_box_conversion_is_exact_for_flips_and_permutations():
    box = np.array([[3.0, 4.0, 5.0, 9.0, 12.0, 8.0]])
    np.testing.assert_allclose(boxes_world_to_voxel(boxes_voxel_to_world(box, AFFINE), AFFINE), box, atol=1e-9)
    world = boxes_voxel_to_world(box, AFFINE)
    np.testing.assert_allclose(world[0, 3:], [8 * 0.7, 6 * 0.9, 3 * 2.5])


def test_voxel_box_encloses_the_lesion_voxels_centres():
    # voxels 2..4 span box coordinates [2, 5); their centres are world points of indices 2, 3, 4
    world = boxes_voxel_to_world(np.array([[2.0, 0, 0, 5.0, 1, 1]]), np.eye(4))
    np.testing.assert_allclose(world[0, :3], [3.0, 0.0, 0.0])
    np.testing.assert_allclose(world[0, 3:], [3.0, 1.0, 1.0])


@pytest.mark.parametrize("spacing", [(0.7, 0.9, 2.5), (1.0, 1.0, 1.5)])
def test_world_voxel_world_round_trip_through_resampling(tmp_path, spacing):
    world_box = _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    item = {"image": str(tmp_path / "case.nii.gz"), "box": world_box.astype(np.float32), "label": np.array([0])}
    out = validation_transforms(spacing=spacing, **NORMALISATION)(item)
    image, voxel_box = out["image"], out["box"]
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), spacing, rtol=1e-5)
    # the lesion is where the voxel box says it is in the resampled, reoriented image
    lesion = torch.nonzero(image[0] > 0.5).float()
    lesion_box = torch.cat([lesion.min(0).values, lesion.max(0).values + 1])
    np.testing.assert_allclose(voxel_box[0].numpy(), lesion_box.numpy(), atol=1.01)
    back = postprocessing()({"image": image, "box": voxel_box})["box"].numpy()
    voxel_size = np.array([0.9, 0.7, 2.5])
    assert np.all(np.abs(back - world_box) <= np.concatenate([voxel_size, 2 * voxel_size]) + 1e-4)


def test_lps_switch_flips_the_first_two_world_axes(tmp_path):
    world_box = _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    lps_box = world_box.copy()
    lps_box[:, :2] *= -1
    item = {"image": str(tmp_path / "case.nii.gz"), "box": lps_box.astype(np.float32), "label": np.array([0])}
    out = validation_transforms(spacing=(0.9, 0.7, 2.5), affine_lps_to_ras=True, **NORMALISATION)(item)
    ras = validation_transforms(spacing=(0.9, 0.7, 2.5), **NORMALISATION)(
        {**item, "box": world_box.astype(np.float32)})
    np.testing.assert_allclose(out["box"].numpy(), ras["box"].numpy(), atol=1e-4)
    back = postprocessing(affine_lps_to_ras=True)({"image": out["image"], "box": out["box"]})["box"].numpy()
    np.testing.assert_allclose(back, lps_box, atol=1e-3)


def test_training_patches_hold_the_object_at_a_random_offset(tmp_path):
    world_box = _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    item = {"image": str(tmp_path / "case.nii.gz"), "box": world_box.astype(np.float32), "label": np.array([0])}
    chain = training_transforms(patch_size=(24, 24, 16), spacing=(0.9, 0.7, 2.5), num_samples=8,
                                foreground_ratio=1.0, augment=False, **NORMALISATION)
    chain.set_random_state(0)
    patches = chain(item)
    offsets = set()
    for patch in patches:
        assert tuple(patch["image"].shape) == (1, 24, 24, 16)
        assert patch["box"].shape == (1, 6) and patch["label"].tolist() == [0]
        box = patch["box"][0]
        lesion = torch.nonzero(patch["image"][0] > 0.5).float()
        np.testing.assert_allclose(box[:3].numpy(), lesion.min(0).values.numpy(), atol=1.01)
        offsets.add(tuple(box[:3].round().tolist()))
    assert len(offsets) > 1  # not always centred the same way


def test_small_volumes_are_padded_and_boxes_follow(tmp_path):
    world_box = _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    item = {"image": str(tmp_path / "case.nii.gz"), "box": world_box.astype(np.float32), "label": np.array([0])}
    chain = training_transforms(patch_size=(48, 48, 32), spacing=(0.9, 0.7, 2.5), num_samples=2,
                                foreground_ratio=1.0, augment=True, **NORMALISATION)
    chain.set_random_state(1)
    for patch in chain(item):
        assert tuple(patch["image"].shape) == (1, 48, 48, 32)
        assert patch["box"].shape[1] == 6 and patch["box"].shape[0] == patch["label"].shape[0]


def test_negative_cases_still_give_patches(tmp_path):
    _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    item = {"image": str(tmp_path / "case.nii.gz"), "box": np.zeros((0, 6), np.float32),
            "label": np.zeros((0,), np.int64)}
    chain = training_transforms(patch_size=(24, 24, 16), spacing=(0.9, 0.7, 2.5), num_samples=2, augment=True,
                                **NORMALISATION)
    for patch in chain(item):
        assert tuple(patch["image"].shape) == (1, 24, 24, 16)
        assert patch["box"].shape == (0, 6) and patch["label"].shape == (0,)


@pytest.mark.parametrize("angle", [0.4, -0.5])
def test_rotation_moves_boxes_with_the_ellipsoid(angle):
    from meddet.data.transforms import RandRotateBoxd

    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) + 0.5 for n in (64, 64, 16)],
                                      indexing="ij"))
    box = torch.tensor([[14.0, 22.0, 4.0, 34.0, 32.0, 12.0]])  # off-centre, elongated in x
    centre, half = (box[0, :3] + box[0, 3:]) / 2, (box[0, 3:] - box[0, :3]) / 2
    inside = (((grid - centre[:, None, None, None]) / half[:, None, None, None]) ** 2).sum(0) <= 1
    image = inside[None].float()
    rotate = RandRotateBoxd(prob=1.0, max_angle=abs(angle))
    rotate.randomize = lambda data=None: (setattr(rotate, "_do_transform", True), setattr(rotate, "angle", angle))
    out = rotate({"image": image, "box": box})
    voxels = torch.nonzero(out["image"][0] > 0.5).float()
    expected = torch.cat([voxels.min(0).values, voxels.max(0).values + 1])
    np.testing.assert_allclose(out["box"][0].numpy(), expected.numpy(), atol=1.0)
    assert not torch.allclose(out["box"], box)


def test_rotation_leaves_unrotated_boxes_exactly_alone():
    from meddet.data.transforms import RandRotateBoxd

    box = torch.tensor([[3.2, 4.7, 5.1, 12.8, 11.3, 9.9]])
    out = RandRotateBoxd(prob=0.0)({"image": torch.zeros(1, 16, 16, 16), "box": box})
    assert torch.equal(out["box"], box)


def test_ignore_regions_travel_with_the_patch_but_are_never_its_object(tmp_path):
    # the object in one corner, an ignore region (an excluded finding) in the opposite one
    world_box = _write_case(tmp_path / "case.nii.gz", ((2, 7), (2, 7), (1, 4)))
    ignore = boxes_voxel_to_world(np.array([[30.0, 26.0, 14.0, 38.0, 34.0, 19.0]]), AFFINE)
    item = {"image": str(tmp_path / "case.nii.gz"), "box": world_box.astype(np.float32), "label": np.array([0]),
            "ignore_box": ignore.astype(np.float32), "diameter_mm": [6.0]}
    chain = training_transforms(patch_size=(16, 16, 8), spacing=(0.9, 0.7, 2.5), num_samples=12,
                                foreground_ratio=1.0, augment=True, **NORMALISATION)
    chain.set_random_state(0)
    for patch in chain(item):
        labels = patch["label"].tolist()
        assert 0 in labels  # every positive patch holds the object, never only the ignore region
        assert set(labels) <= {0, -1} and patch["box"].shape == (len(labels), 6)
        assert "ignore_box" not in patch and "diameter_mm" not in patch
    # negative patches may hold the ignore region, which keeps its label -1 and its place
    chain = training_transforms(patch_size=(16, 16, 8), spacing=(0.9, 0.7, 2.5), num_samples=24,
                                foreground_ratio=0.0, augment=False, **NORMALISATION)
    chain.set_random_state(1)
    seen = [patch for patch in chain(item) if -1 in patch["label"].tolist()]
    assert seen and all(0 not in patch["label"].tolist() for patch in chain(item))


def test_oblique_grids_are_reported_once_per_image(tmp_path, caplog):
    import logging
    import math

    from meddet.data.transforms import oblique_angle_deg

    angle = math.radians(20)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation * np.array([0.9, 0.9, 2.5])
    assert oblique_angle_deg(oblique) == pytest.approx(20.0)
    assert oblique_angle_deg(AFFINE) == pytest.approx(0.0, abs=1e-9)
    data = np.full((24, 24, 12), -800, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, oblique), str(tmp_path / "oblique.nii.gz"))
    item = {"image": str(tmp_path / "oblique.nii.gz"), "box": np.zeros((0, 6), np.float32),
            "label": np.zeros(0, np.int64)}
    chain = validation_transforms(spacing=(0.9, 0.9, 2.5), **NORMALISATION)
    with caplog.at_level(logging.WARNING, logger="meddet.data.transforms"):
        chain(dict(item))
        chain(dict(item))
    warnings = [r for r in caplog.records if "oblique grid" in r.getMessage()]
    assert len(warnings) == 1 and "oblique.nii.gz" in warnings[0].getMessage()
    assert "20.0 deg" in warnings[0].getMessage() and "28 % larger" in warnings[0].getMessage()


def test_inference_keeps_ground_truth_as_voxel_boxes_for_the_pictures_only(tmp_path):
    from meddet.data.transforms import inference_transforms

    world_box = _write_case(tmp_path / "case.nii.gz", ((10, 17), (5, 14), (4, 8)))
    item = {"image": str(tmp_path / "case.nii.gz"), "box": world_box.astype(np.float32), "label": np.array([0])}
    args = dict(spacing=(0.9, 0.7, 2.5), **NORMALISATION)
    inferred = inference_transforms(**args)(dict(item))
    validated = validation_transforms(**args)(dict(item))
    np.testing.assert_allclose(inferred["box"].numpy(), validated["box"].numpy(), atol=1e-5)
    assert inferred["label"].tolist() == [0]
    bare = inference_transforms(**args)({"image": item["image"]})  # a datalist without boxes, MONAI Label
    assert "box" not in bare and "label" not in bare
