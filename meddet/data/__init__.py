"""Data layer: box conversion, datalist loading/validation, nnDetection conversion, synthetic datasets."""

from meddet.data.boxes import boxes_voxel_to_world, boxes_world_to_voxel
from meddet.data.datalist import DatalistError, load_datalist, read_image_geometry, write_datalist
from meddet.data.nndet import boxes_from_instance_mask, convert_nndet_raw, monai_box_to_nndet, nndet_box_to_monai
from meddet.data.synthetic import PRESETS, generate_dataset, synthesize_case

__all__ = [
    "boxes_voxel_to_world",
    "boxes_world_to_voxel",
    "DatalistError",
    "load_datalist",
    "read_image_geometry",
    "write_datalist",
    "boxes_from_instance_mask",
    "convert_nndet_raw",
    "nndet_box_to_monai",
    "monai_box_to_nndet",
    "PRESETS",
    "generate_dataset",
    "synthesize_case",
]
