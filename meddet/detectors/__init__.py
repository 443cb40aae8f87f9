"""Detectors: anchor planning, Retina U-Net losses and decoding, class-wise NMS; Deformable DETR set losses,
Hungarian matching and query planning."""

from meddet.detectors.anchors import anchor_coverage, build_anchor_generator, plan_anchor_shapes
from meddet.detectors.deformable_detr import DeformableDETRDetector, plan_num_queries
from meddet.detectors.losses import ellipsoid_segmentation_target, sigmoid_focal_loss
from meddet.detectors.matching import hungarian_match, match_cost
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
    "DeformableDETRDetector",
    "hungarian_match",
    "match_cost",
    "plan_num_queries",
]
