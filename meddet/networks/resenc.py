"""Residual encoder (ResEnc) of nnU-Net, built from dynamic-network-architectures.

The module returned by `build_resenc_encoder` is dynamic-network-architectures' own `ResidualEncoder`, so its
parameter names (`stem...`, `stages...`) are those of `ResidualEncoderUNet.encoder`. Stored as `encoder` inside
a detector, its state-dict keys read `encoder.stem...` / `encoder.stages...`, exactly the prefixes that released
nnssl pre-training checkpoints use (`key_to_stem`, `key_to_encoder`).
"""

from __future__ import annotations

from typing import Sequence

from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from meddet.networks.strides import StrideSpec

# ResEnc-L as released with the pre-trained checkpoints: 90.30 M encoder parameters, output strides 1..32.
RESENC_L = {
    "in_channels": 1,
    "features_per_stage": (32, 64, 128, 256, 320, 320),
    "strides": (1, 2, 2, 2, 2, 2),
    "blocks_per_stage": (1, 3, 4, 6, 6, 6),
    "kernel_size": 3,
}


def build_resenc_encoder(
    in_channels: int = 1,
    features_per_stage: Sequence[int] = RESENC_L["features_per_stage"],
    strides: Sequence[StrideSpec] = RESENC_L["strides"],
    blocks_per_stage: Sequence[int] = RESENC_L["blocks_per_stage"],
    kernel_size: int = 3,
) -> ResidualEncoder:
    """Build a 3D residual encoder that returns the feature map of every stage.

    Stage s downsamples by `strides[s]` (an int, or one int per axis) with its first block's strided conv and
    has `blocks_per_stage[s]` BasicBlockD residual blocks with `features_per_stage[s]` channels; a 3x3x3
    stem conv without stride runs first. Conv bias on, InstanceNorm3d(eps=1e-5, affine=True), LeakyReLU.

    Forward: `[B, in_channels, X, Y, Z]` -> list over stages of `[B, features_per_stage[s], X/S_s, Y/S_s, Z/S_s]`
    with S_s the product of `strides[:s + 1]`. The module exposes `output_channels` and `strides`
    (per-stage, per-axis lists) for the decoder.

    Weights are initialised as nnU-Net does (He normal, last norm of each residual branch zeroed); loading a
    pre-trained state dict replaces them.
    """
    n_stages = len(features_per_stage)
    if n_stages == 0:
        raise ValueError("build_resenc_encoder: features_per_stage is empty; give one channel count per stage")
    for name, values in (("strides", strides), ("blocks_per_stage", blocks_per_stage)):
        if len(values) != n_stages:
            raise ValueError(
                f"build_resenc_encoder: {name} has {len(values)} entries but features_per_stage has {n_stages}; "
                "give one entry per stage"
            )
    strides = [list(s) if isinstance(s, (list, tuple)) else int(s) for s in strides]
    encoder = ResidualEncoder(
        input_channels=int(in_channels),
        n_stages=n_stages,
        features_per_stage=[int(f) for f in features_per_stage],
        conv_op=nn.Conv3d,
        kernel_sizes=int(kernel_size),
        strides=strides,
        n_blocks_per_stage=[int(b) for b in blocks_per_stage],
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        block=BasicBlockD,
        return_skips=True,
    )
    encoder.apply(InitWeights_He(1e-2))
    encoder.apply(init_last_bn_before_add_to_0)
    return encoder
