"""Encoder levels (channels and strides) as the detection networks need them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Tuple, Union

#: a stride or kernel size as the configs write it: one int for all three axes, or one int per axis
StrideSpec = Union[int, Sequence[int]]


def as_triple(value: StrideSpec, what: str) -> Tuple[int, int, int]:
    """One int per axis from an int or three ints; anything else is a ValueError that starts with `what`."""
    values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * 3
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{what} must be a positive int or three positive ints, got {value!r}")
    return values


def cumulative_strides(stage_strides: Sequence[StrideSpec], owner: str) -> List[int]:
    """Per-stage strides (ints or per-axis lists) -> isotropic stride of every level relative to the input.

    Detection strides are single integers (anchors and normalised boxes assume the same stride on every
    axis), so an anisotropic stage stride is refused with a ValueError naming `owner`.
    """
    cumulative, total = [], 1
    for stage, stride in enumerate(stage_strides):
        axes = as_triple(stride, f"{owner}: encoder stage {stage}'s stride")
        if len(set(axes)) != 1:
            raise ValueError(
                f"{owner}: encoder stage {stage} has anisotropic stride {axes}; only isotropic strides are "
                "supported (detection strides are single integers)"
            )
        total *= axes[0]
        cumulative.append(total)
    return cumulative


def total_stride(stage_strides: Sequence[StrideSpec]) -> int:
    """The stride of the deepest level (bundle configs give it to the sliding window as `size_divisible`)."""
    return cumulative_strides(stage_strides, "total_stride")[-1]


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


def check_input_size(spatial: Sequence[int], total_stride: int, owner: str) -> None:
    """Refuse an input the network cannot take: every spatial axis must be a positive multiple of the total stride,
    and the deepest stage's map must hold more than one voxel, which instance normalisation needs in training
    (so 32^3 is too small for the release networks' stride 32: one axis of 64 at least)."""
    stride = int(total_stride)
    spatial = tuple(int(s) for s in spatial)
    if any(size % stride or size < stride for size in spatial):
        raise ValueError(
            f"{owner}: input spatial size {spatial} is not divisible by the network's total stride {stride}; pad or "
            f"crop every spatial axis to a multiple of {stride}"
        )
    if all(size == stride for size in spatial):
        raise ValueError(
            f"{owner}: input spatial size {spatial} is too small: the deepest stage (stride {stride}) would hold one "
            f"voxel, and its instance normalisation needs more; the smallest input is {stride} per axis with at "
            f"least one axis of {2 * stride}, e.g. {(2 * stride,) * 3}"
        )
