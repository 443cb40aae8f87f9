"""Detection metrics: COCO (MONAI), box-based FROC (nnDetection / LUNA16), report files, an ignite metric."""

from meddet.metrics.bootstrap import bootstrap_mean_ci
from meddet.metrics.coco import coco_metrics, detections_to_numpy
from meddet.metrics.froc import FROC_FP_RATES, froc, froc_curve, match_detections
from meddet.metrics.ignite_metric import DetectionMAP, detection_output_transform
from meddet.metrics.report import evaluate_detections, evaluate_files

__all__ = [
    "bootstrap_mean_ci",
    "FROC_FP_RATES",
    "DetectionMAP",
    "coco_metrics",
    "detection_output_transform",
    "detections_to_numpy",
    "evaluate_detections",
    "evaluate_files",
    "froc",
    "froc_curve",
    "match_detections",
]
