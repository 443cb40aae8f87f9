"""Retina U-Net: encoder + U-Net-style FPN + shared dense detection heads + full-resolution segmentation head."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from meddet.networks.fpn import UNetFPN
from meddet.networks.heads import ClassificationHead, RegressionHead, SegmentationHead
from meddet.networks.resenc import RESENC_L, build_resenc_encoder
from meddet.networks.strides import check_input_size, encoder_levels

DEFAULT_HEAD_CONVS = 2


def fpn_channels_per_level(
    num_levels: int, first_detection_level: int, fpn_channels: int, min_fpn_channels: int
) -> List[int]:
    """FPN width per level: `fpn_channels` from the first detection level on, halved for every level below it,
    never below `min_fpn_channels`. ResEnc-L with detection on P2-P5: [32, 64, 128, 128, 128, 128]."""
    return [
        fpn_channels if level >= first_detection_level
        else max(fpn_channels // 2 ** (first_detection_level - level), min_fpn_channels)
        for level in range(num_levels)
    ]


class RetinaUNet(nn.Module):
    """Retina U-Net over any encoder that returns one feature map per stage.

    1. `encoder(x)` -> list of L maps, finest first; the encoder exposes `output_channels` (L ints) and
       `strides` (L per-stage strides), like dynamic-network-architectures' `ResidualEncoder`.
    2. `UNetFPN` over all L levels -> P_0..P_{L-1} (level strides = cumulative stage strides, P_0 must be
       at full resolution); width `fpn_channels` on the detection levels and above, halving below.
    3. `ClassificationHead` / `RegressionHead` shared over the detection levels; `SegmentationHead` on P_0.

    Forward: `x [B, C, X, Y, Z]` with X, Y, Z divisible by the total stride -> dict
    `"classification"`: list over detection levels of `[B, A*K, x_l, y_l, z_l]` logits,
    `"box_regression"`: list of `[B, A*6, x_l, y_l, z_l]`,
    `"segmentation"`: `[B, num_seg_classes, X, Y, Z]` logits. Channels are anchor-major
    (view as `[B, A, K, ...]` / `[B, A, 6, ...]`).
    The segmentation branch only trains the network (its loss); detection never reads it. In eval mode it is
    skipped, and with it the top-down pyramid below the first detection level (13 % of a ResEnc-L forward),
    unless `segmentation_at_inference` is True; the dict then has no "segmentation" entry.

    Attributes: `encoder` (kept under this name so pre-trained `encoder.stem...` / `encoder.stages...` keys
    load), `fpn`, `classification_head`, `regression_head`, `segmentation_head`, `level_strides` (all levels),
    `detection_strides` (detection levels), `total_stride`, `fpn_out_channels`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int = 1,
        num_anchors: int = 27,
        fpn_channels: int = 128,
        min_fpn_channels: int = 8,
        detection_levels: Sequence[int] = (2, 3, 4, 5),
        head_convs: int = DEFAULT_HEAD_CONVS,
        num_seg_classes: int = 2,
        head_channels: Optional[int] = None,
        segmentation_at_inference: bool = False,
    ):
        super().__init__()
        encoder_channels, level_strides = encoder_levels(encoder, "RetinaUNet")
        num_levels = len(encoder_channels)
        if len(level_strides) != num_levels:
            raise ValueError(
                f"RetinaUNet: encoder has {num_levels} output_channels entries but {len(level_strides)} strides"
            )
        if level_strides[0] != 1:
            raise ValueError(
                f"RetinaUNet: the first encoder level has stride {level_strides[0]}; the segmentation head needs a "
                "full-resolution level (first stage stride 1)"
            )
        detection_levels = tuple(int(level) for level in detection_levels)
        if (
            not detection_levels
            or list(detection_levels) != sorted(set(detection_levels))
            or detection_levels[0] < 0
            or detection_levels[-1] >= num_levels
        ):
            raise ValueError(
                f"RetinaUNet: detection_levels {detection_levels} must be strictly increasing level indices within "
                f"0..{num_levels - 1} (the encoder has {num_levels} levels)"
            )
        if min_fpn_channels < 1 or fpn_channels < min_fpn_channels:
            raise ValueError(
                f"RetinaUNet: need 1 <= min_fpn_channels <= fpn_channels, got {min_fpn_channels} and {fpn_channels}"
            )

        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.detection_levels = detection_levels
        self.level_strides = tuple(level_strides)
        self.detection_strides = tuple(level_strides[level] for level in detection_levels)
        self.total_stride = level_strides[-1]
        self.fpn_out_channels = fpn_channels_per_level(num_levels, detection_levels[0], fpn_channels, min_fpn_channels)

        self.fpn = UNetFPN(
            encoder_channels, self.fpn_out_channels, level_strides, output_levels=(0,) + detection_levels
        )
        self.classification_head = ClassificationHead(
            fpn_channels, num_anchors, num_classes, num_convs=head_convs, channels=head_channels
        )
        self.regression_head = RegressionHead(
            fpn_channels, num_anchors, len(detection_levels), num_convs=head_convs, channels=head_channels
        )
        self.segmentation_head = SegmentationHead(self.fpn_out_channels[0], num_seg_classes)
        self.segmentation_at_inference = bool(segmentation_at_inference)

    def forward(self, x: torch.Tensor) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        if x.ndim != 5:
            raise ValueError(f"RetinaUNet: expected input [B, C, X, Y, Z], got shape {tuple(x.shape)}")
        check_input_size(x.shape[2:], self.total_stride, "RetinaUNet")
        features = self.encoder(x)
        if not isinstance(features, (list, tuple)):
            raise TypeError("RetinaUNet: the encoder must return a list of per-stage maps (return_skips=True)")
        with_segmentation = self.training or self.segmentation_at_inference
        pyramid = self.fpn(features, ((0,) if with_segmentation else ()) + self.detection_levels)
        detection_maps = [pyramid[level] for level in self.detection_levels]
        outputs = {
            "classification": self.classification_head(detection_maps),
            "box_regression": self.regression_head(detection_maps),
        }
        if with_segmentation:
            outputs["segmentation"] = self.segmentation_head(pyramid[0])
        return outputs


def retina_unet_resenc(
    in_channels: int = 1,
    num_classes: int = 1,
    num_anchors: int = 27,
    features_per_stage: Sequence[int] = RESENC_L["features_per_stage"],
    strides: Sequence[Union[int, Sequence[int]]] = RESENC_L["strides"],
    blocks_per_stage: Sequence[int] = RESENC_L["blocks_per_stage"],
    kernel_size: int = 3,
    fpn_channels: int = 128,
    min_fpn_channels: int = 8,
    detection_levels: Sequence[int] = (2, 3, 4, 5),
    head_convs: int = DEFAULT_HEAD_CONVS,
    head_channels: Optional[int] = None,
    num_seg_classes: int = 2,
    segmentation_at_inference: bool = False,
) -> RetinaUNet:
    """Retina U-Net on a ResEnc encoder from plain (JSON-friendly) values; defaults give the paper's ResEnc-L.

    A smaller encoder needs `detection_levels` that exist in it, e.g. `(2, 3)` for four stages.
    """
    encoder = build_resenc_encoder(
        in_channels=in_channels,
        features_per_stage=features_per_stage,
        strides=strides,
        blocks_per_stage=blocks_per_stage,
        kernel_size=kernel_size,
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
