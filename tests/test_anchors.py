import numpy as np
import pytest
import torch

from meddet.detectors.anchors import anchor_coverage, build_anchor_generator, plan_anchor_shapes


def _synthetic_box_sizes(n=400, seed=0):
    """Anisotropic lesion sizes: in-plane around 10 voxels, through-plane around 4 (log-normal)."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.exp(rng.normal(np.log(10), 0.5, n)),
            np.exp(rng.normal(np.log(12), 0.5, n)),
            np.exp(rng.normal(np.log(4), 0.4, n)),
        ],
        axis=1,
    )


def test_planned_shapes_are_27_distinct_even_integers():
    shapes = plan_anchor_shapes(_synthetic_box_sizes())
    assert len(shapes) == 27
    assert len({tuple(s) for s in shapes}) == 27
    for shape in shapes:
        assert len(shape) == 3
        for value in shape:
            assert isinstance(value, int) and value >= 2 and value % 2 == 0
    # 3 widths x 3 heights x 3 depths
    assert all(len({s[axis] for s in shapes}) == 3 for axis in range(3))


def test_planned_coverage_is_high_and_beats_a_naive_set():
    sizes = _synthetic_box_sizes()
    planned = anchor_coverage(sizes, plan_anchor_shapes(sizes), (1, 2, 4, 8))
    naive = anchor_coverage(sizes, [[a, b, c] for a in (8, 16, 32) for b in (8, 16, 32) for c in (8, 16, 32)])
    assert planned > 0.6
    assert planned > naive + 0.05


def test_plan_handles_other_grid_sizes_and_nears_the_even_optimum_for_one_box():
    box = np.array([[5.0, 7.0, 3.0]])
    shapes = plan_anchor_shapes(box, level_scales=(1, 2), num_per_axis=2)
    assert len(shapes) == 8
    assert all(v % 2 == 0 and v >= 2 for s in shapes for v in s)
    single = plan_anchor_shapes(box, level_scales=(1,), num_per_axis=1)
    evens = range(2, 12, 2)
    brute_force = max(anchor_coverage(box, [[w, h, d]], (1,)) for w in evens for h in evens for d in evens)
    # coordinate descent may stop in a local optimum, but close to the best even shape
    assert brute_force * 0.98 <= anchor_coverage(box, single, (1,)) <= brute_force + 1e-12


def test_anchor_coverage_values():
    # identical size -> IoU 1, also through a level scale; half the volume along one axis -> IoU 0.5
    assert anchor_coverage(np.array([[6.0, 4.0, 2.0]]), [[6, 4, 2]], (1,)) == pytest.approx(1.0)
    assert anchor_coverage(np.array([[12.0, 8.0, 4.0]]), [[6, 4, 2]], (1, 2)) == pytest.approx(1.0)
    assert anchor_coverage(np.array([[3.0, 4.0, 2.0]]), [[6, 4, 2]], (1,)) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.ones((4, 2)), np.array([[1.0, -2.0, 3.0]])])
def test_bad_box_sizes_raise(bad):
    with pytest.raises(ValueError):
        plan_anchor_shapes(bad)
    with pytest.raises(ValueError):
        anchor_coverage(bad, [[2, 2, 2]])


def test_generator_produces_planned_sizes_at_ij_centres():
    shapes = [[6, 4, 2], [2, 8, 4], [10, 6, 8]]
    scales = (1, 2)
    strides = (4, 8)
    generator = build_anchor_generator(shapes, scales)
    image = torch.zeros(2, 1, 32, 16, 8)  # anisotropic: an x/y swap would be visible
    grids = [(8, 4, 2), (4, 2, 1)]
    anchors = generator(image, [torch.zeros(2, 3, *g) for g in grids])
    assert len(anchors) == 2 and torch.equal(anchors[0], anchors[1])
    per_level = anchors[0].split([len(shapes) * int(np.prod(g)) for g in grids])
    for level_anchors, grid, scale, stride in zip(per_level, grids, scales, strides):
        boxes = level_anchors.reshape(*grid, len(shapes), 6)
        sizes = boxes[..., 3:] - boxes[..., :3]
        expected_sizes = torch.tensor(shapes, dtype=torch.float32) * scale
        assert torch.equal(sizes, expected_sizes.expand_as(sizes))
        centres = (boxes[..., 3:] + boxes[..., :3]) / 2
        index = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), dim=-1)
        expected_centres = (index * stride + stride / 2).float()[..., None, :]
        assert torch.equal(centres, expected_centres.expand_as(centres))


def test_monai_rounds_odd_anchor_sizes_which_is_why_plans_are_even():
    generator = build_anchor_generator([[7, 8, 5]], (1,))
    anchors = generator(torch.zeros(1, 1, 8, 8, 8), [torch.zeros(1, 1, 2, 2, 2)])[0]
    sizes = anchors[:, 3:] - anchors[:, :3]
    assert not torch.equal(sizes[0], torch.tensor([7.0, 8.0, 5.0]))


def test_build_anchor_generator_rejects_bad_shapes():
    with pytest.raises(ValueError):
        build_anchor_generator([], (1, 2))
    with pytest.raises(ValueError):
        build_anchor_generator([[4, 4]], (1, 2))
