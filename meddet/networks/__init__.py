"""Networks: ResEnc encoder, U-Net-style FPN, dense heads, the Retina U-Net that combines them, and the 3D
two-stage Deformable DETR (deformable attention, sine position embeddings)."""

from meddet.networks.deformable_attention import MultiScaleDeformableAttention3D, deformable_attention_3d
from meddet.networks.deformable_detr import DeformableDETR, deformable_detr_resenc
from meddet.networks.fpn import UNetFPN
from meddet.networks.heads import ClassificationHead, RegressionHead, SegmentationHead, group_count
from meddet.networks.nndet_backbone import NNDET_BACKBONE, NNDetEncoder, retina_unet_nndet
from meddet.networks.position_encoding import PositionEmbeddingSine3D, sine_embedding
from meddet.networks.resenc import RESENC_L, build_resenc_encoder
from meddet.networks.retina_unet import RetinaUNet, fpn_channels_per_level, retina_unet_resenc
from meddet.networks.strides import total_stride

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
    "MultiScaleDeformableAttention3D",
    "deformable_attention_3d",
    "PositionEmbeddingSine3D",
    "sine_embedding",
    "DeformableDETR",
    "deformable_detr_resenc",
    "NNDET_BACKBONE",
    "NNDetEncoder",
    "retina_unet_nndet",
    "total_stride",
]
