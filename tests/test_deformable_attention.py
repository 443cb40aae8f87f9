"""Tests for meddet.networks.deformable_attention: 3D multi-scale deformable attention."""

import math

import pytest
import torch

from meddet.networks import MultiScaleDeformableAttention3D, deformable_attention_3d

torch.set_num_threads(1)

SHAPES = [(4, 3, 5), (2, 3, 2)]  # two levels of different, non-cubic sizes (X, Y, Z)


def level_starts(shapes):
    starts, total = [], 0
    for x, y, z in shapes:
        starts.append(total)
        total += x * y * z
    return starts, total


def reference_attention(value, shapes, starts, locations, weights):
    """Explicit per-point trilinear interpolation with zero padding.

    A normalised coordinate c of an axis with N voxels lies at continuous index c * N - 0.5 (voxel centres
    at integers); the 8 surrounding voxels get the usual trilinear weights and voxels outside the grid read 0.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    output = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                accumulated = torch.zeros(head_dim, dtype=value.dtype)
                for lvl in range(levels):
                    size_x, size_y, size_z = shapes[lvl]
                    for p in range(points):
                        position = [locations[b, q, h, lvl, p, axis] * n - 0.5
                                    for axis, n in enumerate((size_x, size_y, size_z))]
                        low = [int(math.floor(float(c.detach()))) for c in position]
                        fraction = [c - lo for c, lo in zip(position, low)]
                        sample = torch.zeros(head_dim, dtype=value.dtype)
                        for dx in (0, 1):
                            for dy in (0, 1):
                                for dz in (0, 1):
                                    i, j, k = low[0] + dx, low[1] + dy, low[2] + dz
                                    if not (0 <= i < size_x and 0 <= j < size_y and 0 <= k < size_z):
                                        continue
                                    weight = ((fraction[0] if dx else 1 - fraction[0])
                                              * (fraction[1] if dy else 1 - fraction[1])
                                              * (fraction[2] if dz else 1 - fraction[2]))
                                    row = starts[lvl] + (i * size_y + j) * size_z + k
                                    sample = sample + weight * value[b, row, h]
                        accumulated = accumulated + weights[b, q, h, lvl, p] * sample
                output[b, q, h] = accumulated
    return output.reshape(batch, queries, heads * head_dim)


def random_case(seed=0, batch=2, heads=2, head_dim=3, queries=3, points=2):
    generator = torch.Generator().manual_seed(seed)
    starts, total = level_starts(SHAPES)
    value = torch.randn(batch, total, heads, head_dim, generator=generator)
    # partly outside [0, 1] so that zero padding is exercised
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 3, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator)
    return value, starts, locations, weights


def test_matches_explicit_trilinear_interpolation_and_gradients_are_finite():
    value, starts, locations, weights = random_case()
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    output = deformable_attention_3d(inputs[0], torch.tensor(SHAPES), torch.tensor(starts), inputs[1], inputs[2])
    expected = reference_attention(value, SHAPES, starts, locations, weights)
    assert output.shape == expected.shape == (2, 3, 2 * 3)
    assert torch.allclose(output, expected, atol=1e-5)

    (output * torch.randn_like(output)).sum().backward()
    for name, tensor in zip(("value", "sampling_locations", "attention_weights"), inputs):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_gradients_match_the_explicit_interpolation():
    value, starts, locations, weights = random_case(seed=1, batch=1, queries=2)
    ours = [t.clone().double().requires_grad_(True) for t in (value, locations, weights)]
    theirs = [t.clone().double().requires_grad_(True) for t in (value, locations, weights)]
    upstream = torch.randn(1, 2, 6, dtype=torch.float64)
    (deformable_attention_3d(ours[0], SHAPES, starts, ours[1], ours[2]) * upstream).sum().backward()
    (reference_attention(theirs[0], SHAPES, starts, theirs[1], theirs[2]) * upstream).sum().backward()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-8)


def test_axis_order_follows_the_array_axes():
    # a single level whose values equal the X index: sampling at x = (i + 0.5) / X reads i whatever y, z are
    shape = (5, 2, 3)
    grid = torch.arange(5, dtype=torch.float32)[:, None, None].expand(shape)
    value = grid.reshape(1, -1, 1, 1)
    x = (torch.arange(5, dtype=torch.float32) + 0.5) / 5
    locations = torch.stack([x, torch.full_like(x, 0.3), torch.full_like(x, 0.7)], dim=-1)
    locations = locations.view(1, 5, 1, 1, 1, 3)
    output = deformable_attention_3d(value, [shape], [0], locations, torch.ones(1, 5, 1, 1, 1))
    assert torch.allclose(output.view(-1), torch.arange(5, dtype=torch.float32), atol=1e-6)


def test_mismatched_shapes_raise():
    value, starts, locations, weights = random_case()
    with pytest.raises(ValueError, match="positions"):
        deformable_attention_3d(value, [(4, 3, 5), (2, 3, 3)], starts, locations, weights)
    with pytest.raises(ValueError, match="levels"):
        deformable_attention_3d(value, SHAPES[:1], starts[:1], locations, weights)


def test_module_initialisation():
    attention = MultiScaleDeformableAttention3D(d_model=32, n_levels=3, num_heads=8, num_points=4)
    assert torch.count_nonzero(attention.attention_weights.weight) == 0
    assert torch.count_nonzero(attention.attention_weights.bias) == 0  # uniform attention at start
    assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
    bias = attention.sampling_offsets.bias.view(8, 3, 4, 3)
    # point p of every head and level sits at (p + 1) x a head direction whose largest component is 1
    first_point = bias[:, :, 0]
    assert torch.allclose(first_point.abs().amax(-1), torch.ones(8, 3))
    assert torch.allclose(bias, first_point[:, :, None] * torch.arange(1, 5.0)[None, None, :, None])
    assert torch.allclose(first_point, first_point[:, :1].expand_as(first_point))  # same for every level
    directions = first_point[:, 0] / first_point[:, 0].norm(dim=-1, keepdim=True)
    cosines = directions @ directions.T - 2 * torch.eye(8)
    assert cosines.max() < 0.99  # heads look in different directions
    for projection in (attention.value_proj, attention.output_proj):
        assert torch.count_nonzero(projection.bias) == 0
        bound = math.sqrt(6 / (32 + 32))
        assert projection.weight.abs().max() <= bound and projection.weight.std() > 0.1 * bound


def test_module_reads_the_reference_voxel_when_offsets_are_zero():
    torch.manual_seed(0)
    shapes = [(4, 2, 3), (2, 1, 3)]
    starts, total = level_starts(shapes)
    attention = MultiScaleDeformableAttention3D(d_model=8, n_levels=2, num_heads=2, num_points=3)
    with torch.no_grad():
        attention.sampling_offsets.bias.zero_()
    tokens = torch.randn(1, total, 8)
    # reference: centre of voxel (3, 1, 0) of level 0 = voxel (1, 0, 0) of level 1
    centre = torch.tensor([3.5 / 4, 1.5 / 2, 0.5 / 3])
    level1_centre = torch.tensor([1.5 / 2, 0.5 / 1, 0.5 / 3])
    rows = [starts[0] + (3 * 2 + 1) * 3 + 0, starts[1] + (1 * 1 + 0) * 3 + 0]
    points = torch.stack([centre, level1_centre])[None, None]  # [1, 1, L, 3], one point per level
    output = attention(torch.randn(1, 1, 8), points, tokens, shapes, starts)
    expected = attention.output_proj(attention.value_proj(tokens[0, rows]).mean(0))
    assert torch.allclose(output.view(-1), expected, atol=1e-5)

    # box references: zero offsets sample the box centre, whatever the box size
    boxes = torch.cat([centre, torch.tensor([0.3, 0.4, 0.2])])[None, None, None]  # [1, 1, 1, 6]
    level0 = tokens[:, :starts[1]]
    output_box = attention(torch.randn(1, 1, 8), boxes, torch.cat([level0, level0], 1), shapes[:1] * 2,
                           [0, starts[1]])
    expected_box = attention.output_proj(attention.value_proj(tokens[0, rows[0]]))
    assert torch.allclose(output_box.view(-1), expected_box, atol=1e-5)

    with pytest.raises(ValueError, match="3 \\(points\\) or 6 \\(boxes\\)"):
        attention(torch.randn(1, 1, 8), torch.rand(1, 1, 2, 4), tokens, shapes, starts)
