"""Encoder levels (channels and strides) as the detection networks need them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Union


def cumulative_strides(stage_strides: Sequence[Union[int, Sequence[int]]], owner: str) -> List[int]:
    """Per-stage strides (ints or per-axis lists) -> isotropic stride of every level relative to the input.

    Detection strides are single integers (anchors and normalised boxes assume the same stride on every
    axis), so an anisotropic stage stride is refused with a ValueError naming `owner`.
    """
    cumulative, total = [], 1
    for stage, stride in enumerate(stage_strides):
        axes = [int(s) for s in stride] if isinstance(stride, (list, tuple)) else [int(stride)] * 3
        if len(set(axes)) != 1:
            raise ValueError(
                f"{owner}: encoder stage {stage} has anisotropic stride {axes}; only isotropic strides are "
                "supported (detection strides are single integers)"
            )
        total *= axes[0]
        cumulative.append(total)
    return cumulative


def encoder_levels(encoder, owner: str) -> tuple[List[int], List[int]]:
    """(channels, cumulative isotropic stride) of every level of an encoder that returns one map per stage and
    exposes `output_channels` and `strides` (like dynamic-network-architectures' ResidualEncoder)."""
    for attribute in ("output_channels", "strides"):
        if not hasattr(encoder, attribute):
            raise TypeError(
                f"{owner}: the encoder ({type(encoder).__name__}) has no attribute '{attribute}'; it needs "
                "'output_channels' and 'strides' per stage, like dynamic_network_architectures' ResidualEncoder"
            )
    if getattr(encoder, "return_skips", True) is False:
        raise ValueError(f"{owner}: the encoder returns only its last map; build it with return_skips=True")
    return [int(c) for c in encoder.output_channels], cumulative_strides(encoder.strides, owner)
