"""Tests of meddet.inference.sliding_window: tile placement, tile-border weights, and whole-volume stitching
with a fake predictor that finds a bright cube (tile offsets, mirror flip-back, padding, list input)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data.box_utils import box_iou

from meddet.inference import SlidingWindowBoxInferer, box_tile_weights, tile_origins

torch.set_num_threads(1)
ROI = (32, 32, 32)


def _covered(image_size, roi_size, origins):
    covered = torch.zeros(tuple(max(s, r) for s, r in zip(image_size, roi_size)), dtype=torch.int32)
    for origin in origins:
        covered[tuple(slice(o, o + r) for o, r in zip(origin, roi_size))] += 1
    return covered


@pytest.mark.parametrize("image_size", [(70, 50, 40), (32, 33, 64), (100, 32, 47)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_the_volume_exactly_with_the_overlap(image_size, overlap):
    origins = tile_origins(image_size, ROI, overlap)
    covered = _covered(image_size, ROI, origins)
    assert covered.shape == image_size  # no tile reaches past the volume
    assert (covered > 0).all()
    step = int(32 * (1 - overlap))
    for axis, size in enumerate(image_size):
        starts = sorted({o[axis] for o in origins})
        assert starts[0] == 0 and starts[-1] == size - 32  # last tile aligned to the end
        assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))
        assert len(starts) == max(1, math.ceil((size - 32) / step) + 1)
    assert len(origins) == len(set(origins))


def test_tiles_for_a_volume_smaller_than_the_window():
    origins = tile_origins((20, 50, 10), ROI, 0.5)
    assert {o[0] for o in origins} == {0} and {o[2] for o in origins} == {0}
    assert sorted({o[1] for o in origins}) == [0, 16, 18]
    covered = _covered((20, 50, 10), ROI, origins)
    assert (covered[:20, :, :10] > 0).all()


def test_tile_origins_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tile_origins((40, 40, 40), ROI, 1.0)


def test_box_tile_weights_low_at_inner_borders_one_at_volume_borders():
    centred = torch.tensor([[12.0, 12, 12, 20, 20, 20]])
    at_low_border = torch.tensor([[-4.0, 12, 12, 4, 20, 20]])  # centre x = 0
    inner_tile = dict(tile_size=ROI, origin=(16, 16, 16), image_size=(100, 100, 100))
    assert torch.allclose(box_tile_weights(centred, **inner_tile), torch.tensor([1.0]))
    border = box_tile_weights(at_low_border, **inner_tile)
    assert torch.allclose(border, torch.tensor([(math.exp(-1 / (2 * 0.8**2)) + 2) / 3]))
    first_tile = dict(tile_size=ROI, origin=(0, 16, 16), image_size=(100, 100, 100))
    assert torch.allclose(box_tile_weights(at_low_border, **first_tile), torch.tensor([1.0]))
    assert torch.allclose(box_tile_weights(at_low_border, sigma_scale=None, **inner_tile), torch.tensor([1.0]))


class CubeFinder:
    """Fake detector: the bounding box of voxels > 0.5 in the patch, score 0.9, unless they touch the patch
    border (an object cut by the tile, which a real detector would not report with confidence)."""

    def __init__(self, roi_size=ROI):
        self.roi_size = tuple(roi_size)
        self.patches_seen = 0

    def __call__(self, patches):
        self.patches_seen += len(patches)
        self.shapes_seen = getattr(self, "shapes_seen", set()) | {tuple(patches.shape[2:])}
        detections = []
        for patch in patches:
            assert tuple(patch.shape[1:]) == self.roi_size
            voxels = torch.nonzero(patch[0] > 0.5)
            found = len(voxels) > 0
            if found:
                lo, hi = voxels.min(0).values, voxels.max(0).values + 1
                found = bool((lo > 0).all() and (hi < torch.tensor(self.roi_size)).all())
            if found:
                detections.append({"box": torch.cat([lo, hi]).float()[None], "label": torch.zeros(1, dtype=torch.long),
                                   "label_scores": torch.tensor([0.9])})
            else:
                detections.append({"box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long),
                                   "label_scores": torch.zeros(0)})
        return detections


def _volume_with_cube(size, lo, hi):
    image = torch.zeros((1,) + tuple(size))
    image[(0,) + tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0
    return image, torch.tensor([list(lo) + list(hi)], dtype=torch.float32)


@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_stitched_top_box_is_the_cube(mirror_axes):
    # the cube spans x 28..37, across the border at 32 of the first tile; y 10..19 crosses tiles at 16 and 18
    image, truth = _volume_with_cube((70, 50, 40), (28, 10, 15), (38, 20, 25))
    finder = CubeFinder()
    inferer = SlidingWindowBoxInferer(ROI, overlap=0.5, sw_batch_size=5, mirror_axes=mirror_axes)
    detections = inferer(image[None], finder)
    assert len(detections) == 1
    result = detections[0]
    assert set(result) == {"box", "label", "label_scores"}
    assert result["box"].device.type == "cpu" and result["box"].dtype == torch.float32
    assert box_iou(result["box"][:1], truth).item() > 0.9
    assert result["label"][0].item() == 0 and 0 < result["label_scores"][0].item() <= 0.9
    assert finder.patches_seen == len(tile_origins((70, 50, 40), ROI, 0.5)) * 2 ** len(mirror_axes)


def test_mirror_flip_back_on_an_asymmetric_object():
    # an elongated box away from the tile centre: a wrong flip-back would move it to the mirrored place
    image, truth = _volume_with_cube((40, 40, 40), (3, 20, 9), (12, 24, 30))
    inferer = SlidingWindowBoxInferer((40, 40, 40), overlap=0.5, mirror_axes=(0, 1, 2))
    result = inferer([image], CubeFinder((40, 40, 40)))[0]
    assert len(result["box"]) == 1
    assert torch.allclose(result["box"], truth)
    assert torch.allclose(result["label_scores"], torch.tensor([0.9]))  # 8 of 8 passes found it


def test_list_of_different_sizes_with_padding():
    first, first_truth = _volume_with_cube((70, 50, 40), (40, 30, 5), (50, 38, 12))
    second, second_truth = _volume_with_cube((20, 45, 12), (5, 20, 2), (14, 30, 9))  # smaller than the window
    inferer = SlidingWindowBoxInferer(ROI, overlap=0.5, sw_batch_size=3, mirror_axes=(1,), detections_per_image=5)
    results = inferer([first, second], CubeFinder())
    assert len(results) == 2
    assert box_iou(results[0]["box"][:1], first_truth).item() > 0.9
    assert box_iou(results[1]["box"][:1], second_truth).item() > 0.9
    assert (results[1]["box"][:, 3:] <= torch.tensor([20.0, 45, 12])).all()  # cropped back to the volume


def test_tiles_shrink_to_short_axes_rounded_to_the_stride():
    # 12 slices under a 32-voxel window: with size_divisible 8 the tile is 16 deep instead of 32; x and y are
    # longer than the window and keep it. The asymmetric box must come back in place through every mirror.
    image, truth = _volume_with_cube((50, 40, 12), (3, 20, 2), (12, 24, 9))
    inferer = SlidingWindowBoxInferer(ROI, overlap=0.5, mirror_axes=(0, 1, 2), size_divisible=8)
    assert inferer.tile_size((50, 40, 12)) == (32, 32, 16)
    assert inferer.tile_size((50, 40, 40)) == ROI and inferer.tile_size((7, 33, 32)) == (16, 32, 32)
    assert inferer.tile_size((17, 33, 32)) == (24, 32, 32)
    finder = CubeFinder((32, 32, 16))
    result = inferer([image], finder)[0]
    assert finder.shapes_seen == {(32, 32, 16)}
    assert torch.allclose(result["box"][:1], truth)
    padded = SlidingWindowBoxInferer(ROI, overlap=0.5, mirror_axes=(0, 1, 2))([image], CubeFinder())[0]
    torch.testing.assert_close(result["box"][:1], padded["box"][:1])
    torch.testing.assert_close(result["label_scores"][:1], padded["label_scores"][:1])
    with pytest.raises(ValueError, match="size_divisible"):
        SlidingWindowBoxInferer(ROI, size_divisible=(8, 8))


def test_no_detections_and_bad_predictor_output():
    inferer = SlidingWindowBoxInferer(ROI, overlap=0.25)
    empty = inferer(torch.zeros(1, 1, 40, 40, 40), CubeFinder())[0]
    assert empty["box"].shape == (0, 6) and empty["label"].shape == (0,) and empty["label_scores"].shape == (0,)
    with pytest.raises(ValueError, match="list of 1 detection dicts"):
        inferer(torch.zeros(1, 1, 40, 40, 40), lambda patches: {"box": torch.zeros(0, 6)})
    with pytest.raises(ValueError, match="mirror_axes"):
        SlidingWindowBoxInferer(ROI, mirror_axes=(3,))
