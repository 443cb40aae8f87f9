"""Networks: ResEnc encoder, U-Net-style FPN, dense heads and the Retina U-Net that combines them."""

from meddet.networks.fpn import UNetFPN
from meddet.networks.heads import ClassificationHead, RegressionHead, SegmentationHead, group_count
from meddet.networks.resenc import RESENC_L, build_resenc_encoder
from meddet.networks.retina_unet import RetinaUNet, fpn_channels_per_level, retina_unet_resenc

__all__ = [
    "RESENC_L",
    "build_resenc_encoder",
    "UNetFPN",
    "ClassificationHead",
    "RegressionHead",
    "SegmentationHead",
    "group_count",
    "RetinaUNet",
    "fpn_channels_per_level",
    "retina_unet_resenc",
]
