"""Plan a bundle's data-dependent settings from a training datalist and write them as a config override.

    python tools/plan.py --data_list_file_path L [--dataset_dir D] --output_path plans.json \
        [--level_scales "[1,2,4,8]"] [--anchors_per_axis 3]

Writes top-level keys that merge over train.json / evaluate.json / inference.json:
`spacing` (median voxel spacing, RAS axes), `intensity_clip` / `intensity_mean` / `intensity_std`
(0.5-99.5 percentiles, mean and std of the voxels inside the ground-truth boxes, nnU-Net's CT scheme),
`anchor_shapes` (base anchors of the first detection level, `meddet.detectors.plan_anchor_shapes`) and
`num_queries` (Deformable DETR: max(12, 3 x the 95th percentile of objects per training patch of `patch_size`)).
Pass the file as an extra config: `--config_file "['configs/train.json','plans.json']"`.
`level_scales` are the detection strides over the first one: (1, 2, 4, 8) for ResEnc-L on P2-P5,
(1, 2) for the smoke preset's P2-P3.
"""

from __future__ import annotations

import json
import os

import fire
import numpy as np
from monai.transforms import LoadImage

from meddet.data import load_datalist, read_image_geometry
from meddet.data.boxes import boxes_world_to_voxel
from meddet.detectors.anchors import anchor_coverage, plan_anchor_shapes
from meddet.detectors.deformable_detr import plan_num_queries


def _first_file(image) -> str:
    return image[0] if isinstance(image, (list, tuple)) else image


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along the R, A, S world axes (what Orientationd('RAS') + Spacingd see)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.zeros(3)
    for j in range(3):
        spacing[int(np.argmax(np.abs(columns[:, j])))] = np.linalg.norm(columns[:, j])
    return spacing


def _foreground_sample(path: str, boxes_cccwhd: np.ndarray, rng, per_case: int) -> np.ndarray:
    if not len(boxes_cccwhd):
        return np.zeros(0)
    # MONAI's reader gives the same array/affine pair the bundles see, for NIfTI and ITK formats alike
    image = LoadImage(image_only=True)(path)
    affine = image.affine.numpy()
    data = image.numpy().astype(np.float32)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    voxels = []
    for box in np.asarray(boxes_world_to_voxel(boxes_cccwhd, affine)):
        lo = np.clip(np.floor(box[:3]).astype(int), 0, data.shape)
        hi = np.clip(np.ceil(box[3:]).astype(int), 0, data.shape)
        voxels.append(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].ravel())
    voxels = np.concatenate(voxels)
    return rng.choice(voxels, size=min(per_case, voxels.size), replace=False) if voxels.size else voxels


def objects_per_patch(boxes_voxel: np.ndarray, patch_size, rng, samples: int = 20) -> list[int]:
    """Objects whose centre lies in a training-like patch: each sample puts the patch around a random object
    at a random offset (the object-balanced sampling), counting every object centre inside it."""
    if not len(boxes_voxel):
        return [0]
    centres = (boxes_voxel[:, :3] + boxes_voxel[:, 3:]) / 2
    patch = np.asarray(patch_size, dtype=np.float64)
    counts = []
    for _ in range(samples):
        anchor = centres[rng.integers(len(centres))]
        start = anchor - rng.uniform(0, patch)
        counts.append(int(np.all((centres >= start) & (centres < start + patch), axis=1).sum()))
    return counts


def plan(data_list_file_path: str, dataset_dir: str | None = None, output_path: str = "plans.json",
         data_list_key: str = "training", level_scales=(1, 2, 4, 8), anchors_per_axis: int = 3,
         patch_size=(128, 128, 128), spacing=None, affine_lps_to_ras: bool = False, voxels_per_case: int = 20000,
         seed: int = 0) -> dict:
    """Plan spacing, intensity normalisation and anchors; write them to `output_path`; return them."""
    items = load_datalist(data_list_file_path, dataset_dir, data_list_key, check_images=False)
    if not items:
        raise ValueError(f"{data_list_file_path}: the '{data_list_key}' list is empty; nothing to plan from")
    rng = np.random.default_rng(seed)
    spacings, sizes_mm, foreground = [], [], []
    for item in items:
        path = _first_file(item["image"])
        _, affine = read_image_geometry(path)
        spacings.append(ras_spacing(affine))
        boxes = np.asarray(item["box"], dtype=np.float64).reshape(-1, 6)
        # LPS and RAS boxes have the same sizes; only centres change sign, which the sample below handles
        sizes_mm.append(boxes[:, 3:])
        centre_frame = boxes.copy()
        if affine_lps_to_ras:
            centre_frame[:, :2] *= -1
        foreground.append(_foreground_sample(path, centre_frame, rng, voxels_per_case))
    target = np.asarray(spacing, dtype=np.float64) if spacing is not None else np.median(np.stack(spacings), axis=0)
    sizes_mm = np.concatenate(sizes_mm)
    if not len(sizes_mm):
        raise ValueError(f"{data_list_file_path}: no boxes in '{data_list_key}'; anchors need object sizes")
    sizes_voxel = sizes_mm / target
    counts = []
    for item in items:
        boxes = np.asarray(item["box"], dtype=np.float64).reshape(-1, 6)
        voxel_boxes = np.concatenate([boxes[:, :3] / target - boxes[:, 3:] / target / 2,
                                      boxes[:, :3] / target + boxes[:, 3:] / target / 2], axis=1)
        counts += objects_per_patch(voxel_boxes, patch_size, rng)
    anchors = plan_anchor_shapes(sizes_voxel, level_scales=tuple(level_scales), num_per_axis=anchors_per_axis)
    values = np.concatenate(foreground)
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    plans = {
        "spacing": [round(float(s), 4) for s in target],
        "intensity_clip": [round(float(low), 2), round(float(high), 2)],
        "intensity_mean": round(float(clipped.mean()), 2),
        "intensity_std": round(max(float(clipped.std()), 1e-3), 2),
        "anchor_shapes": anchors,
        "num_queries": plan_num_queries(counts),
    }
    summary = {
        "cases": len(items),
        "boxes": int(len(sizes_mm)),
        "anchor_coverage_mean_best_iou": round(anchor_coverage(sizes_voxel, anchors, tuple(level_scales)), 4),
        "box_size_voxels_median": [round(float(v), 2) for v in np.median(sizes_voxel, axis=0)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w") as f:
        json.dump(plans, f, indent=2)
    print(json.dumps({"written": output_path, **summary}))
    return plans


if __name__ == "__main__":
    fire.Fire(plan, serialize=lambda result: None)
