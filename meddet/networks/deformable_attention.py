"""3D multi-scale deformable attention (Zhu et al. 2021, Deformable DETR) in plain PyTorch.

Each query attends to `num_points` sampled positions per level and head; values at those positions are read by
trilinear interpolation (`torch.nn.functional.grid_sample`, `align_corners=False`, zero padding), so the same
code runs on CPU and GPU without a compiled kernel.

Coordinate convention: sampling locations are normalised to [0, 1] per level and ordered (x, y, z) like the
array axes [X, Y, Z] of a feature map; 0 is the outer face of the first voxel and 1 that of the last, so the
centre of voxel i of an axis of size N sits at (i + 0.5) / N. Positions outside [0, 1] read zeros.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

ShapesLike = Union[torch.Tensor, Sequence[Sequence[int]]]


def _as_int_shapes(spatial_shapes: ShapesLike) -> List[Tuple[int, int, int]]:
    rows = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    shapes = [tuple(int(v) for v in row) for row in rows]
    if any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"spatial_shapes must hold one (X, Y, Z) triple per level, got {rows}")
    return shapes


def deformable_attention_3d(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: Union[torch.Tensor, Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of trilinearly sampled values over levels and points.

    Args:
        value: [B, S, H, Dh] per-head values of all levels flattened (level after level, each in
            C order over (X, Y, Z)); S = sum over levels of X_l * Y_l * Z_l.
        spatial_shapes: [L, 3] (X_l, Y_l, Z_l) per level (tensor or nested sequence).
        level_start_index: [L] offset of each level's first row in S.
        sampling_locations: [B, Q, H, L, P, 3] normalised (x, y, z) in [0, 1] (see the module docstring).
        attention_weights: [B, Q, H, L, P] (normally softmax-normalised over L * P).

    Returns:
        [B, Q, H * Dh].
    """
    batch, num_values, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _as_int_shapes(spatial_shapes)
    starts = level_start_index.tolist() if isinstance(level_start_index, torch.Tensor) else list(level_start_index)
    if len(shapes) != levels or len(starts) != levels:
        raise ValueError(
            f"deformable_attention_3d: sampling_locations have {levels} levels but spatial_shapes has {len(shapes)} "
            f"and level_start_index {len(starts)} entries"
        )
    if sum(x * y * z for x, y, z in shapes) != num_values:
        raise ValueError(
            f"deformable_attention_3d: value has {num_values} positions but spatial_shapes {shapes} hold "
            f"{sum(x * y * z for x, y, z in shapes)}"
        )
    # grid_sample wants coordinates in [-1, 1] ordered (W, H, D) = (last array axis, ..., first), i.e. (z, y, x)
    # mixed precision: sample in the wider of the two dtypes (coordinates lose sub-voxel accuracy in float16)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value = value.to(dtype)
    grids = (2.0 * sampling_locations - 1.0).flip(-1).to(dtype)
    # [B, Q, H, L, P, 3] -> [B * H, L, Q, P, 1, 3]: one grid_sample call per level, heads folded into the batch
    grids = grids.permute(0, 2, 3, 1, 4, 5).reshape(batch * heads, levels, queries, points, 1, 3)
    sampled = []
    for level, ((size_x, size_y, size_z), start) in enumerate(zip(shapes, starts)):
        level_value = value[:, int(start):int(start) + size_x * size_y * size_z]
        # [B, S_l, H, Dh] -> [B * H, Dh, X_l, Y_l, Z_l]
        level_value = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, size_x, size_y, size_z)
        # -> [B * H, Dh, Q, P, 1]
        sampled.append(
            F.grid_sample(level_value, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [B * H, Dh, Q, L * P] weighted by [B * H, 1, Q, L * P]
    sampled = torch.stack(sampled, dim=3).reshape(batch * heads, head_dim, queries, levels * points)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(batch * heads, 1, queries, levels * points)
    output = (sampled * weights.to(sampled.dtype)).sum(-1)  # [B * H, Dh, Q]
    return output.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()


def sphere_directions(count: int) -> torch.Tensor:
    """`count` roughly even unit directions on the sphere (Fibonacci lattice), [count, 3] in (x, y, z)."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * index / count
    radius = torch.sqrt((1.0 - z * z).clamp(min=0.0))
    angle = math.pi * (3.0 - math.sqrt(5.0)) * index
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), z], dim=-1).float()


class MultiScaleDeformableAttention3D(nn.Module):
    """Multi-scale deformable attention over 3D feature maps.

    Per query, head, level and point a linear layer predicts a 3D sampling offset and an attention logit
    (softmax over levels x points per head). Offsets are added to the query's reference:
    - reference points [B, Q, L, 3] (normalised centres): offsets are in voxels of each level;
    - reference boxes [B, Q, L, 6] (normalised `cccwhd`): offsets are in half box sizes, divided by
      `num_points` (points spread within the box).

    Init (as Deformable DETR): offset weights zero and biases pointing head h along its own direction on
    the sphere (largest component 1), point p at distance p + 1; attention weights zero (uniform attention);
    value and output projections Xavier-uniform with zero bias.

    Forward: `query [B, Q, d]`, `reference [B, Q, L, 3 or 6]`, `value_input [B, S, d]`,
    `spatial_shapes [L, 3]`, `level_start_index [L]` -> `[B, Q, d]`.
    """

    def __init__(self, d_model: int = 128, n_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"MultiScaleDeformableAttention3D: d_model {d_model} is not divisible by num_heads {num_heads}"
            )
        self.d_model, self.n_levels, self.num_heads, self.num_points = d_model, n_levels, num_heads, num_points
        self.head_dim = d_model // num_heads
        self.sampling_offsets = nn.Linear(d_model, num_heads * n_levels * num_points * 3)
        self.attention_weights = nn.Linear(d_model, num_heads * n_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        directions = sphere_directions(self.num_heads)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        bias = directions[:, None, None, :].repeat(1, self.n_levels, self.num_points, 1)
        bias = bias * torch.arange(1, self.num_points + 1, dtype=bias.dtype)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: ShapesLike,
        level_start_index: Union[torch.Tensor, Sequence[int]],
    ) -> torch.Tensor:
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.n_levels, self.num_points
        value = self.value_proj(value_input).view(batch, value_input.shape[1], heads, self.head_dim)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 3)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)
        if reference.shape[-1] == 3:
            sizes = torch.as_tensor(_as_int_shapes(spatial_shapes), dtype=offsets.dtype, device=offsets.device)
            locations = reference[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
        elif reference.shape[-1] == 6:
            centres, box_sizes = reference[:, :, None, :, None, :3], reference[:, :, None, :, None, 3:]
            locations = centres + offsets / points * box_sizes * 0.5
        else:
            raise ValueError(
                f"MultiScaleDeformableAttention3D: reference must end in 3 (points) or 6 (boxes), "
                f"got shape {tuple(reference.shape)}"
            )
        output = deformable_attention_3d(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
