"""The box-aware training crop: MONAI's sampling distribution, drawn without whole-volume masks."""

import numpy as np
import pytest
import torch
from monai.apps.detection.transforms.box_ops import convert_box_to_mask
from monai.data import MetaTensor
from monai.transforms.utils import correct_crop_centers, map_binary_to_indices

from meddet.data.boxes import IGNORE_LABEL
from meddet.data.transforms import RandCropTargetBoxByPosNegLabeld

PATCH = (16, 16, 12)


def _sample(image_size, boxes, labels):
    image = MetaTensor(torch.arange(int(np.prod(image_size)), dtype=torch.float32).reshape(1, *image_size))
    return {"image": image, "box": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6),
            "label": torch.tensor(labels, dtype=torch.long)}


def _monai_origin_marginals(crop, image_size, boxes, pos):
    """The exact per-axis distribution of crop origins under MONAI's RandCropBoxByPosNegLabeld (its own mask,
    indices and centre correction), and the exact share of positive draws."""
    regions = (crop.generate_fg_center_boxes_np(np.asarray(boxes, dtype=np.float32), image_size) if len(boxes)
               else [])
    if len(regions):
        mask = convert_box_to_mask(regions, np.ones(len(regions)), image_size, bg_label=0).max(axis=0)[None]
    else:
        mask = np.zeros((1, *image_size))
    fg, bg = map_binary_to_indices(mask)
    pos = 0.0 if len(fg) == 0 else 1.0 if len(bg) == 0 else pos
    marginals = [np.zeros(s - p + 1) for s, p in zip(image_size, PATCH)]
    for indices, weight in ((fg, pos), (bg, 1 - pos)):
        if weight == 0:
            continue
        voxels = np.stack(np.unravel_index(np.asarray(indices), image_size), axis=1)
        for axis in range(3):
            low, high = correct_crop_centers([0] * 3, PATCH, image_size), correct_crop_centers(
                [10**6] * 3, PATCH, image_size)
            origins = np.clip(voxels[:, axis], low[axis], high[axis]) - PATCH[axis] // 2
            marginals[axis] += weight * np.bincount(origins, minlength=len(marginals[axis])) / len(origins)
    return marginals


@pytest.mark.parametrize("boxes, labels", [
    # two objects whose centre regions nearly coincide (the union counts them once), one far away, an ignore region
    ([[10, 12, 8, 16, 18, 12], [11, 12, 8, 17, 18, 12], [40, 30, 20, 44, 33, 24], [30, 5, 3, 34, 9, 7]],
     [0, 0, 0, IGNORE_LABEL]),
    ([], []),  # a scan without objects: every patch is drawn as a negative one
])
def test_crop_origins_follow_monais_distribution(boxes, labels):
    image_size = (52, 40, 30)
    crop = RandCropTargetBoxByPosNegLabeld(image_keys="image", box_keys="box", label_keys="label",
                                           spatial_size=PATCH, pos=0.4, neg=0.6, num_samples=4)
    crop.set_random_state(3)
    sample = _sample(image_size, boxes, labels)
    draws = 4000
    counts = [np.zeros(s - p + 1) for s, p in zip(image_size, PATCH)]
    for _ in range(draws // 4):
        for patch in crop(sample):
            assert tuple(patch["image"].shape[1:]) == PATCH
            first = int(patch["image"].as_tensor()[0, 0, 0, 0].item())  # the image holds each voxel's flat index
            origin = np.unravel_index(first, image_size)
            for axis in range(3):
                counts[axis][origin[axis]] += 1
    targets = [b for b, label in zip(boxes, labels) if label != IGNORE_LABEL]
    expected = _monai_origin_marginals(crop, image_size, targets, 0.4)
    for axis in range(3):
        total_variation = 0.5 * np.abs(counts[axis] / draws - expected[axis]).sum()
        assert total_variation < 0.06, (axis, total_variation)


def test_positive_share_and_boxes_follow_the_crop():
    image_size = (60, 50, 40)
    boxes = [[20, 20, 10, 26, 25, 15], [44, 8, 25, 50, 14, 31], [5, 35, 30, 9, 39, 34]]
    crop = RandCropTargetBoxByPosNegLabeld(image_keys="image", box_keys="box", label_keys="label",
                                           spatial_size=PATCH, pos=0.5, neg=0.5)
    crop.set_random_state(0)
    sample = _sample(image_size, boxes + [[30, 30, 20, 34, 34, 24]], [0, 0, 0, IGNORE_LABEL])
    whole, draws = 0, 3000
    for _ in range(draws):
        patch = crop(sample)[0]
        origin = np.array(np.unravel_index(int(patch["image"].as_tensor()[0, 0, 0, 0]), image_size))
        world = torch.as_tensor(boxes, dtype=torch.float32)
        inside = ((world[:, :3] >= torch.as_tensor(origin)) & (world[:, 3:] <= torch.as_tensor(origin + PATCH))).all(1)
        whole += bool(inside.any())
        # every box of the patch is a source box clipped to the patch and shifted by its origin
        shifted = patch["box"] + torch.as_tensor(np.concatenate([origin, origin]), dtype=torch.float32)
        source = torch.as_tensor(boxes + [[30, 30, 20, 34, 34, 24]], dtype=torch.float32)
        clipped = torch.maximum(torch.minimum(source, torch.as_tensor([*(origin + PATCH)] * 2, dtype=torch.float32)),
                                torch.as_tensor([*origin] * 2, dtype=torch.float32))
        for box, label in zip(shifted, patch["label"]):
            matches = (clipped - box).abs().amax(1) < 1e-4
            assert matches.any() and (torch.as_tensor([0, 0, 0, IGNORE_LABEL])[matches] == label).any()
    # positive draws always hold a whole object; negative centres lie outside every centre region, yet moving them
    # into the image can still catch one: the share is 0.5 plus that, as MONAI's
    expected = _monai_positive_share(crop, image_size, boxes, 0.5)
    assert abs(whole / draws - expected) < 0.03, (whole / draws, expected)


def _monai_positive_share(crop, image_size, boxes, pos):
    regions = crop.generate_fg_center_boxes_np(np.asarray(boxes, dtype=np.float32), image_size)
    mask = convert_box_to_mask(regions, np.ones(len(regions)), image_size, bg_label=0).max(axis=0)[None]
    share = 0.0
    for indices, weight in zip(map_binary_to_indices(mask), (pos, 1 - pos)):
        voxels = np.stack(np.unravel_index(np.asarray(indices), image_size), axis=1)
        low = correct_crop_centers([0] * 3, PATCH, image_size)
        high = correct_crop_centers([10**6] * 3, PATCH, image_size)
        origins = np.clip(voxels, low, high) - np.array(PATCH) // 2
        world = np.asarray(boxes)
        inside = ((world[None, :, :3] >= origins[:, None]) & (world[None, :, 3:] <= origins[:, None] + PATCH)).all(2)
        share += weight * inside.any(1).mean()
    return share


def test_regions_covering_the_image_fall_back_to_listing_the_voxels_outside():
    # a patch nearly as large as the image: the centre regions leave only a thin border outside them
    image_size = (18, 18, 14)
    crop = RandCropTargetBoxByPosNegLabeld(image_keys="image", box_keys="box", label_keys="label",
                                           spatial_size=PATCH, pos=0.0, neg=1.0, num_samples=2)
    crop.set_random_state(1)
    for patch in crop(_sample(image_size, [[7, 7, 5, 10, 10, 8]], [0])):
        assert tuple(patch["image"].shape[1:]) == PATCH and len(patch["box"]) == 1
