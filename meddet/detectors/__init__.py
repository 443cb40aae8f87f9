"""Detectors: anchor planning, Retina U-Net losses and decoding, class-wise NMS."""

from meddet.detectors.anchors import anchor_coverage, build_anchor_generator, plan_anchor_shapes
from meddet.detectors.losses import ellipsoid_segmentation_target, sigmoid_focal_loss
from meddet.detectors.nms import batched_nms
from meddet.detectors.retina_unet import RetinaUNetDetector

__all__ = [
    "RetinaUNetDetector",
    "anchor_coverage",
    "batched_nms",
    "build_anchor_generator",
    "ellipsoid_segmentation_target",
    "plan_anchor_shapes",
    "sigmoid_focal_loss",
]
