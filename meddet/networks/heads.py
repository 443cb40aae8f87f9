"""Dense detection heads shared across pyramid levels, and the full-resolution segmentation head.

Numbers follow nnDetection's Retina U-Net (ResEnc variant): a tower of 2 conv3x3 + GroupNorm (16 channels per
group, affine) + LeakyReLU layers, then a conv3x3 output layer; tower and output weights drawn from N(0, 0.01)
with zero bias; the classification bias starts at the focal-loss prior -log((1 - p) / p) with p = 0.01;
regression outputs are multiplied by a learnable scalar per level, initialised to 1.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

CHANNELS_PER_GROUP = 16


def group_count(channels: int, channels_per_group: int = CHANNELS_PER_GROUP) -> int:
    """GroupNorm groups for `channels`: channels // channels_per_group, at least 1, and a divisor of channels."""
    groups = max(1, channels // channels_per_group)
    while channels % groups:
        groups -= 1
    return groups


def _conv_tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for index in range(num_convs):
        layers += [
            nn.Conv3d(in_channels if index == 0 else channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(group_count(channels), channels, affine=True),
            nn.LeakyReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _init_normal(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv3d):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class ClassificationHead(nn.Module):
    """Per-anchor class logits, the same weights applied to every pyramid level.

    Forward: list of maps `[B, in_channels, x_l, y_l, z_l]` -> list of `[B, A*K, x_l, y_l, z_l]` logits
    (A = num_anchors, K = num_classes), anchor-major: view as `[B, A, K, x_l, y_l, z_l]`.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 2,
        channels: Optional[int] = None,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"ClassificationHead: prior_prob must lie in (0, 1), got {prior_prob}")
        channels = in_channels if channels is None else channels
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.tower = _conv_tower(in_channels, channels, num_convs)
        self.logits = nn.Conv3d(channels if num_convs else in_channels, num_anchors * num_classes, 3, padding=1)
        _init_normal(self)
        # every anchor starts out predicting foreground with probability prior_prob, so the (mostly
        # background) anchors do not swamp the loss in the first iterations
        nn.init.constant_(self.logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [self.logits(self.tower(feature)) for feature in features]


class RegressionHead(nn.Module):
    """Per-anchor box deltas (6 per anchor), shared weights, one learnable output scale per level.

    Forward: list of `num_levels` maps `[B, in_channels, x_l, y_l, z_l]` -> list of `[B, A*6, x_l, y_l, z_l]`,
    anchor-major: view as `[B, A, 6, x_l, y_l, z_l]`. Level l's output is multiplied by `scales[l]`.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_levels: int,
        num_convs: int = 2,
        channels: Optional[int] = None,
    ):
        super().__init__()
        channels = in_channels if channels is None else channels
        self.num_anchors = num_anchors
        self.num_levels = num_levels
        self.tower = _conv_tower(in_channels, channels, num_convs)
        self.deltas = nn.Conv3d(channels if num_convs else in_channels, num_anchors * 6, 3, padding=1)
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in range(num_levels))
        _init_normal(self)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"RegressionHead: built for {self.num_levels} levels, got {len(features)} maps")
        return [self.deltas(self.tower(feature)) * scale for feature, scale in zip(features, self.scales)]


class SegmentationHead(nn.Module):
    """1x1x1 conv from the full-resolution pyramid map to segmentation logits.

    Forward: `[B, in_channels, X, Y, Z]` -> `[B, num_classes, X, Y, Z]` (num_classes = 2: background, foreground).
    """

    def __init__(self, in_channels: int, num_classes: int = 2):
        super().__init__()
        self.logits = nn.Conv3d(in_channels, num_classes, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.logits(feature)
