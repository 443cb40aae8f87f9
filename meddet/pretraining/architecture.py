"""Pre-training networks and the `arch_kwargs` that rebuild them (nnssl's adaptation-plan format).

A pre-training network is built *from* its `arch_kwargs`, and the same dict is written into the checkpoint's
adaptation plan, so a checkpoint always rebuilds the exact network it came from (smoke sizes included):

    arch_kwargs = resenc_unet_arch_kwargs([8, 16, 32, 32], [1, 2, 2, 2], [1, 1, 1, 1])
    unet = build_resenc_unet(arch_kwargs)                      # dynamic-network-architectures ResidualEncoderUNet
    unet.load_state_dict(checkpoint["network_weights"])        # strict

`arch_kwargs` follows nnssl's serialisation: module classes as dotted import strings (listed in
`ARCH_KWARGS_REQUIRING_IMPORT`), per-stage kernel sizes and strides as per-axis lists.
"""

from __future__ import annotations

import pydoc
from collections.abc import Mapping, Sequence

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn

__all__ = [
    "ARCH_CLASS_NAME",
    "ARCH_KWARGS_REQUIRING_IMPORT",
    "ContrastiveNetwork",
    "build_contrastive_network",
    "build_resenc_unet",
    "resenc_unet_arch_kwargs",
]

ARCH_CLASS_NAME = "ResidualEncoderUNet"
ARCH_KWARGS_REQUIRING_IMPORT = ("conv_op", "norm_op", "nonlin")


def _per_axis(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 3


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def resenc_unet_arch_kwargs(
    features_per_stage: Sequence[int],
    strides: Sequence,
    blocks_per_stage: Sequence[int],
    kernel_size: int = 3,
    decoder_convs: int = 1,
) -> dict:
    """nnssl-style `arch_kwargs` of a ResEnc U-Net with the detectors' encoder conventions (conv bias,
    InstanceNorm3d eps 1e-5 affine, LeakyReLU): the released ResEnc-L is features 32-64-128-256-320-320,
    strides 1-2-2-2-2-2, blocks 1-3-4-6-6-6, one decoder conv per stage."""
    n_stages = len(features_per_stage)
    if not n_stages or len(strides) != n_stages or len(blocks_per_stage) != n_stages:
        raise ValueError(f"resenc_unet_arch_kwargs: need one stride and one block count per stage, got "
                         f"{len(features_per_stage)} features, {len(strides)} strides, {len(blocks_per_stage)} blocks")
    return {
        "n_stages": n_stages,
        "features_per_stage": [int(f) for f in features_per_stage],
        "conv_op": _dotted(nn.Conv3d),
        "kernel_sizes": [_per_axis(kernel_size) for _ in range(n_stages)],
        "strides": [_per_axis(s) for s in strides],
        "n_blocks_per_stage": [int(b) for b in blocks_per_stage],
        "n_conv_per_stage_decoder": [int(decoder_convs)] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": _dotted(nn.InstanceNorm3d),
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": _dotted(nn.LeakyReLU),
        "nonlin_kwargs": {"inplace": True},
    }


def _resolved(arch_kwargs: Mapping) -> dict:
    kwargs = dict(arch_kwargs)
    for key in ARCH_KWARGS_REQUIRING_IMPORT + ("dropout_op",):
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(f"arch_kwargs: cannot import {key} = {kwargs[key]!r}")
            kwargs[key] = located
    return kwargs


def build_resenc_unet(arch_kwargs: Mapping, in_channels: int = 1, out_channels: int = 1) -> ResidualEncoderUNet:
    """dynamic-network-architectures' `ResidualEncoderUNet` from nnssl-style `arch_kwargs` (BasicBlockD blocks,
    no deep supervision); `out_channels` 1 for intensity reconstruction. He initialisation as nnU-Net."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0

    kwargs = _resolved(arch_kwargs)
    network = ResidualEncoderUNet(
        input_channels=int(in_channels), num_classes=int(out_channels), deep_supervision=False,
        block=BasicBlockD, **kwargs)
    network.apply(InitWeights_He(1e-2))
    network.apply(init_last_bn_before_add_to_0)
    return network


class ContrastiveNetwork(nn.Module):
    """Encoder + SimCLR projection head (nnssl's SimCLR/VoCo head): global average pooling of every encoder
    stage, concatenated, then Linear-norm-ReLU, Linear-norm-ReLU, Linear. The norm normalises each sample over
    its features without affine parameters (what nnssl's InstanceNorm1d does on a [batch, features] input).

    Forward: `[B, C, X, Y, Z]` -> `[B, projection_dim]`. `encoder` keeps dynamic-network-architectures' names so
    the checkpoint's `encoder.stem…` / `encoder.stages…` keys are the ones the detectors load.
    """

    def __init__(self, encoder: nn.Module, stage_features: Sequence[int], hidden_dim: int = 2048,
                 projection_dim: int = 2048):
        super().__init__()
        self.encoder = encoder
        total = int(sum(stage_features))
        self.projector = nn.Sequential(
            nn.Linear(total, hidden_dim), _SampleNorm(), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), _SampleNorm(), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [feature.mean(dim=(2, 3, 4)) for feature in self.encoder(x)]
        return self.projector(torch.cat(pooled, dim=1))


class _SampleNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)


def build_contrastive_network(arch_kwargs: Mapping, in_channels: int = 1, hidden_dim: int = 2048,
                              projection_dim: int = 2048) -> ContrastiveNetwork:
    """The encoder of `build_resenc_unet(arch_kwargs)` under a SimCLR projection head."""
    encoder = build_resenc_unet(arch_kwargs, in_channels).encoder
    encoder.return_skips = True
    return ContrastiveNetwork(encoder, arch_kwargs["features_per_stage"], hidden_dim, projection_dim)
