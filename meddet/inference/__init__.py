"""Whole-volume inference: tiling with mirror test-time augmentation, weighted box clustering, quick-look plots."""

from meddet.inference.plots import save_detection_png
from meddet.inference.sliding_window import SlidingWindowBoxInferer, box_tile_weights, tile_origins
from meddet.inference.wbc import weighted_box_clustering

__all__ = [
    "SlidingWindowBoxInferer",
    "box_tile_weights",
    "save_detection_png",
    "tile_origins",
    "weighted_box_clustering",
]
