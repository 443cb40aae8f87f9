"""Sine positional embeddings for 3D feature maps and for normalised boxes (DETR family).

Both embed a coordinate c in [0, 1] as sin / cos of `c * 2 pi / temperature ** (2 k / F)` for k = 0 .. F/2 - 1
(F features per coordinate, sin and cos interleaved), temperature 10000.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


def split_features(d_model: int) -> Tuple[int, int, int]:
    """Features per axis (x, y, z) for a d_model-wide 3D embedding: x and y get the largest even number
    <= d_model / 3, z the rest (128 -> 42, 42, 44; 32 -> 10, 10, 12). d_model must be even and >= 6."""
    if d_model < 6 or d_model % 2:
        raise ValueError(f"3D sine embedding: d_model must be even and at least 6, got {d_model}")
    per_axis = (d_model // 3) // 2 * 2
    return per_axis, per_axis, d_model - 2 * per_axis


def sine_embedding(coordinates: torch.Tensor, num_features: int, temperature: float = 10000.0,
                   scale: float = 2 * math.pi) -> torch.Tensor:
    """[..., C] coordinates (normalised to [0, 1]) -> [..., C * num_features] (per coordinate: sin, cos
    interleaved over num_features / 2 frequencies). num_features must be even."""
    if num_features % 2:
        raise ValueError(f"sine_embedding: num_features must be even, got {num_features}")
    exponent = 2 * (torch.arange(num_features, dtype=torch.float32, device=coordinates.device) // 2) / num_features
    frequencies = temperature ** exponent
    angles = coordinates.float()[..., None] * scale / frequencies  # [..., C, F]
    embedding = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
    return embedding.flatten(-2)


class PositionEmbeddingSine3D(nn.Module):
    """Normalised 3D sine embedding of a feature map's voxel grid.

    Voxel i of an axis of size N sits at (i + 0.5) / N (scaled by 2 pi); the features are split over the
    axes as `split_features(d_model)` gives, concatenated in the order x, y, z.

    Forward: feature map `[B, C, X, Y, Z]` (only its shape, device are read) -> `[B, d_model, X, Y, Z]`.
    """

    def __init__(self, d_model: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.d_model = int(d_model)
        self.axis_features = split_features(self.d_model)
        self.temperature = float(temperature)
        self.scale = float(scale)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        batch, _, *spatial = feature_map.shape
        parts = []
        for axis, (size, features) in enumerate(zip(spatial, self.axis_features)):
            centres = (torch.arange(size, dtype=torch.float32, device=feature_map.device) + 0.5) / size
            embedding = sine_embedding(centres[:, None], features, self.temperature, self.scale)  # [N, F]
            view = [1, 1, 1, features]
            view[axis] = size
            parts.append(embedding.view(*view).expand(*spatial, features))
        embedding = torch.cat(parts, dim=-1).permute(3, 0, 1, 2)
        return embedding[None].expand(batch, -1, -1, -1, -1).to(feature_map.dtype)
