"""nnDetection's native plain-conv encoder ("ConvBackbone") and a Retina U-Net built on it.

Layout (nnDetection `ConvBackbone` with its default `conv_kernel` pooling): stage s is `convs_per_stage[s]`
blocks of conv -> InstanceNorm3d(eps 1e-5, affine) -> activation. The first conv of a stage downsamples with
stride `strides[s]` (stage 0 keeps full resolution) and sets the stage width; the others keep it. Convs carry no
bias, because a norm follows each of them (nnDetection's default for conv+norm blocks). Widths double from 32 and
stop at 320: 32, 64, 128, 256, 320, 320 for six stages.

Activation: nnDetection v0.1 (`ConvInstanceRelu`) uses ReLU, which is the default here; nnDetection v0.2's Retina
U-Net (`RetinaUNetFocalV002`, also the module the native MultiTalent fine-tuning config of the seed paper's
release builds on) uses LeakyReLU with slope 0.01 (`activation="leaky_relu"`). Activations hold no weights, so
either choice loads the same checkpoints.

Parameter names: `stages.<s>.<b>.conv.weight`, `stages.<s>.<b>.norm.weight|bias` (block b of stage s), i.e.
nnDetection's `backbone.levels.<s>.component.<b>.…` with the prefix renamed; `meddet.pretrained.native` maps
released weights onto them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from meddet.networks.retina_unet import DEFAULT_HEAD_CONVS, RetinaUNet
from meddet.networks.strides import StrideSpec, as_triple

# The release numbers: 6 stages, 32 doubling to 320, 3x3x3 kernels, total stride 32.
NNDET_BACKBONE = {
    "in_channels": 1,
    "features_per_stage": (32, 64, 128, 256, 320, 320),
    "strides": (1, 2, 2, 2, 2, 2),
    "kernel_sizes": 3,
    "convs_per_stage": 2,
}

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=1e-2, inplace=True),
}


def conv_norm_act(
    in_channels: int, out_channels: int, kernel_size: Tuple[int, int, int], stride: Tuple[int, int, int],
    activation: str, conv_bias: bool = False,
) -> nn.Sequential:
    """conv (padding keeps the size at stride 1) -> InstanceNorm3d(eps 1e-5, affine) -> activation.

    Children are named `conv`, `norm`, `act` as in nnDetection's conv blocks.
    """
    padding = tuple((k - 1) // 2 for k in kernel_size)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=conv_bias),
            norm=nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            act=_ACTIVATIONS[activation](),
        )
    )


class NNDetEncoder(nn.Module):
    """nnDetection's plain conv encoder, returning the map of every stage (finest first).

    Args:
        in_channels: input channels (modalities).
        features_per_stage: width of each stage.
        strides: stride of each stage's first conv (int or per-axis triple); stage 0 normally 1.
        kernel_sizes: one kernel for all stages (int or per-axis triple) or one per stage (nnDetection plans may
            give anisotropic kernels such as (1, 3, 3) for the high-resolution stages). With exactly three stages,
            a list of three ints is read as one kernel per stage.
        convs_per_stage: conv blocks per stage (int or one per stage), 2 in nnDetection.
        activation: "relu" (nnDetection v0.1, default) or "leaky_relu" (slope 0.01, nnDetection v0.2).
        conv_bias: bias on the convs; off in nnDetection (a norm follows every conv).

    Forward: `[B, in_channels, X, Y, Z]` -> list over stages of `[B, features_per_stage[s], X/S_s, Y/S_s, Z/S_s]`
    with S_s the product of `strides[:s + 1]`.

    Attributes (the interface `RetinaUNet` reads, as on dynamic-network-architectures' `ResidualEncoder`):
    `output_channels` (list of ints) and `strides` (per-stage strides as given: ints or per-axis lists).
    """

    def __init__(
        self,
        in_channels: int = NNDET_BACKBONE["in_channels"],
        features_per_stage: Sequence[int] = NNDET_BACKBONE["features_per_stage"],
        strides: Sequence[StrideSpec] = NNDET_BACKBONE["strides"],
        kernel_sizes: Union[StrideSpec, Sequence[StrideSpec]] = NNDET_BACKBONE["kernel_sizes"],
        convs_per_stage: Union[int, Sequence[int]] = NNDET_BACKBONE["convs_per_stage"],
        activation: str = "relu",
        conv_bias: bool = False,
    ):
        super().__init__()
        n_stages = len(features_per_stage)
        if n_stages == 0:
            raise ValueError("NNDetEncoder: features_per_stage is empty; give one channel count per stage")
        if len(strides) != n_stages:
            raise ValueError(
                f"NNDetEncoder: strides has {len(strides)} entries but features_per_stage has {n_stages}; give one "
                "stride per stage (stage 0 normally 1)"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"NNDetEncoder: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        kernels = self._kernels_per_stage(kernel_sizes, n_stages)
        if isinstance(convs_per_stage, int):
            convs = [int(convs_per_stage)] * n_stages
        else:
            convs = [int(c) for c in convs_per_stage]
        if len(convs) != n_stages or min(convs) < 1:
            raise ValueError(
                f"NNDetEncoder: convs_per_stage must be a positive int or {n_stages} positive ints, "
                f"got {convs_per_stage!r}"
            )

        self.in_channels = int(in_channels)
        self.output_channels: List[int] = [int(f) for f in features_per_stage]
        self.strides = [list(s) if isinstance(s, (list, tuple)) else int(s) for s in strides]
        self.kernel_sizes = kernels
        self.activation = activation
        stages = []
        channels = self.in_channels
        for width, stride, kernel, n_convs in zip(self.output_channels, self.strides, kernels, convs):
            stage_stride = as_triple(stride, "NNDetEncoder: each stride entry")
            blocks = [conv_norm_act(channels, width, kernel, stage_stride, activation, conv_bias)]
            blocks += [
                conv_norm_act(width, width, kernel, (1, 1, 1), activation, conv_bias) for _ in range(n_convs - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.ModuleList(stages)

        slope = 1e-2 if activation == "leaky_relu" else 0.0
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=slope, mode="fan_out", nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def _kernels_per_stage(kernel_sizes, n_stages: int) -> List[Tuple[int, int, int]]:
        what = "NNDetEncoder: each kernel_sizes entry"
        if isinstance(kernel_sizes, int):
            return [as_triple(kernel_sizes, what)] * n_stages
        entries = list(kernel_sizes)
        if all(isinstance(k, int) for k in entries) and len(entries) == 3 and n_stages != 3:
            return [as_triple(entries, what)] * n_stages  # one per-axis kernel for every stage
        if len(entries) != n_stages:
            raise ValueError(
                f"NNDetEncoder: kernel_sizes has {len(entries)} entries but there are {n_stages} stages; give one "
                "kernel for all stages or one per stage"
            )
        return [as_triple(k, what) for k in entries]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def retina_unet_nndet(
    in_channels: int = 1,
    num_classes: int = 1,
    num_anchors: int = 27,
    features_per_stage: Sequence[int] = NNDET_BACKBONE["features_per_stage"],
    strides: Sequence[StrideSpec] = NNDET_BACKBONE["strides"],
    kernel_sizes: Union[StrideSpec, Sequence[StrideSpec]] = NNDET_BACKBONE["kernel_sizes"],
    convs_per_stage: Union[int, Sequence[int]] = NNDET_BACKBONE["convs_per_stage"],
    activation: str = "relu",
    detection_levels: Sequence[int] = (2, 3, 4, 5),
    fpn_channels: int = 128,
    min_fpn_channels: int = 8,
    head_convs: int = DEFAULT_HEAD_CONVS,
    head_channels: Optional[int] = None,
    num_seg_classes: int = 2,
    segmentation_at_inference: bool = False,
) -> RetinaUNet:
    """Retina U-Net on nnDetection's native conv encoder, from plain (JSON-friendly) values.

    Defaults give the release architecture: 6 stages 32-64-128-256-320-320, total stride 32, detection on P2-P5
    with 128 FPN channels. (The release's fine-tuning config for this backbone uses one conv in each head tower,
    `head_convs=1`; 2 is kept here as the collection-wide default.) A smaller encoder needs `detection_levels`
    that exist in it, e.g. `(2, 3)` for four stages.
    """
    encoder = NNDetEncoder(
        in_channels=in_channels,
        features_per_stage=features_per_stage,
        strides=strides,
        kernel_sizes=kernel_sizes,
        convs_per_stage=convs_per_stage,
        activation=activation,
    )
    return RetinaUNet(
        encoder,
        num_classes=num_classes,
        num_anchors=num_anchors,
        fpn_channels=fpn_channels,
        min_fpn_channels=min_fpn_channels,
        detection_levels=detection_levels,
        head_convs=head_convs,
        num_seg_classes=num_seg_classes,
        head_channels=head_channels,
        segmentation_at_inference=segmentation_at_inference,
    )
