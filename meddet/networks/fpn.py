"""U-Net-style feature pyramid over every encoder level (the Retina U-Net decoder)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from meddet.networks.strides import StrideSpec, as_triple


class UNetFPN(nn.Module):
    """Top-down feature pyramid with a lateral connection at every level, finest level first.

    For levels i = L-1 .. 0 (coarsest first):

    1. `lateral_i = Conv1x1(features[i])` maps `in_channels[i]` to `out_channels[i]`;
    2. `merged_i = lateral_i + Up_i(merged_{i+1})` (the coarsest level has no top-down term); `Up_i` is a
       transposed conv from `out_channels[i+1]` to `out_channels[i]` whose kernel and stride equal the stride
       ratio between levels i+1 and i (1x1x1 where two levels share a resolution);
    3. `P_i = Conv3x3(merged_i)`.

    No normalisation and no activation anywhere, as in nnDetection's U-FPN. Only the levels in
    `output_levels` get an output conv and a map; the others hold None in the returned list (their merged
    features still feed the finer levels), so no parameter goes unused and no compute is spent on maps nobody
    reads.

    Args:
        in_channels: channels of each encoder map, finest first.
        out_channels: channels of each pyramid map P_i.
        strides: stride of each level relative to the network input (int or one int per axis), finest first;
            each must divide the next one.
        output_levels: levels whose P_i is computed and returned; None = all levels.

    Forward: list of L maps `[B, in_channels[i], *S_i]` -> list of L entries, `[B, out_channels[i], *S_i]`
    for the output levels and None for the others.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        strides: Sequence[StrideSpec],
        output_levels: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if not (len(in_channels) == len(out_channels) == len(strides)) or len(in_channels) == 0:
            raise ValueError(
                "UNetFPN: in_channels, out_channels and strides need one entry per level each, got "
                f"{len(in_channels)}, {len(out_channels)} and {len(strides)}"
            )
        level_strides = [as_triple(s, "UNetFPN: a stride") for s in strides]
        ratios = []
        for level in range(1, len(level_strides)):
            fine, coarse = level_strides[level - 1], level_strides[level]
            if any(c % f for f, c in zip(fine, coarse)):
                raise ValueError(
                    f"UNetFPN: stride {coarse} of level {level} is not a multiple of stride {fine} of level "
                    f"{level - 1}; level strides must grow by integer factors"
                )
            ratios.append(tuple(c // f for f, c in zip(fine, coarse)))

        num_levels = len(in_channels)
        output_levels = list(range(num_levels)) if output_levels is None else [int(lv) for lv in output_levels]
        if not output_levels or any(not 0 <= level < num_levels for level in output_levels):
            raise ValueError(
                f"UNetFPN: output_levels {output_levels} must be non-empty level indices in 0..{num_levels - 1}"
            )
        self.output_levels = tuple(sorted(set(output_levels)))
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = [int(c) for c in out_channels]
        self.strides = level_strides
        self.lateral = nn.ModuleList(
            nn.Conv3d(c_in, c_out, kernel_size=1) for c_in, c_out in zip(self.in_channels, self.out_channels)
        )
        # up[i] brings merged level i+1 to level i
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(
                self.out_channels[level + 1], self.out_channels[level], kernel_size=ratio, stride=ratio, bias=False
            )
            for level, ratio in enumerate(ratios)
        )
        # keyed by level index as a string (ModuleDict keys must be strings)
        self.output = nn.ModuleDict(
            {
                str(level): nn.Conv3d(self.out_channels[level], self.out_channels[level], 3, padding=1)
                for level in self.output_levels
            }
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=1e-2, mode="fan_out", nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor], levels: Optional[Sequence[int]] = None
                ) -> List[Optional[torch.Tensor]]:
        """`levels`: the output levels to compute (default: all of `output_levels`). The top-down pass stops at
        the finest of them, so the full-resolution work of a level nobody asked for is not done."""
        if len(features) != len(self.lateral):
            raise ValueError(f"UNetFPN: expected {len(self.lateral)} feature maps, got {len(features)}")
        wanted = self.output_levels if levels is None else tuple(int(level) for level in levels)
        if not wanted or any(level not in self.output_levels for level in wanted):
            raise ValueError(f"UNetFPN: levels {wanted} must be a non-empty subset of output_levels "
                             f"{self.output_levels}")
        pyramid: List[Optional[torch.Tensor]] = [None] * len(features)
        merged = None
        for level in range(len(features) - 1, min(wanted) - 1, -1):
            lateral = self.lateral[level](features[level])
            merged = lateral if merged is None else lateral + self.up[level](merged)
            if level in wanted:
                pyramid[level] = self.output[str(level)](merged)
        return pyramid
