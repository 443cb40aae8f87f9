"""Quick-look PNG of detections: one axial slice per detection with its box, ground truth alongside.

Drawn with matplotlib's object API (a `Figure` rendered by the Agg canvas), so it never opens a window
and never changes pyplot's global backend.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["save_detection_png"]

_PANEL_INCHES = 3.2
_PREDICTION_COLOUR = "red"
_TRUTH_COLOUR = "lime"


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """0.5th and 99.5th percentiles (a subsample of at most ~1M voxels keeps this fast)."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // 1_000_000)
    low, high = np.percentile(flat[::step], [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def _boxes_crossing(boxes: np.ndarray, z: int) -> np.ndarray:
    """Boxes [N, 6] that contain the centre (z + 0.5) of slice z."""
    if boxes.size == 0:
        return boxes.reshape(0, 6)
    return boxes[(boxes[:, 2] <= z + 0.5) & (boxes[:, 5] > z + 0.5)]


def _draw_box(axes, box, colour, style="-"):
    from matplotlib.patches import Rectangle

    axes.add_patch(Rectangle((box[0], box[1]), box[3] - box[0], box[4] - box[1], fill=False,
                             edgecolor=colour, linewidth=1.5, linestyle=style))


def save_detection_png(image, detections: dict, path, ground_truth: dict | None = None, max_panels: int = 6,
                       score_min: float = 0.1) -> str:
    """Write a PNG with one panel per detection (highest score first) and return its path.

    Args:
        image: [C, X, Y, Z] (the first channel is shown) or [X, Y, Z], tensor or array.
        detections: dict with "box" [N, 6] voxel `xyzxyz` and "label_scores" [N] (optional "label" [N]).
        path: output file; missing folders are created.
        ground_truth: optional dict with "box" [M, 6] voxel `xyzxyz`; boxes crossing a panel's slice are
            drawn dashed in green.
        max_panels: at most this many detections are shown.
        score_min: detections scoring below this are not shown.

    Each panel is the axial slice through the box centre (array axis 0 horizontal, axis 1 vertical, voxel i
    spanning [i, i + 1) so boxes sit on the voxels they cover), intensity clipped to the 0.5-99.5
    percentile window; without any detection to show, the middle slice is drawn with "no detections".
    """
    from matplotlib.figure import Figure

    volume = _numpy(image)
    if volume.ndim == 4:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"save_detection_png: image must be [C, X, Y, Z] or [X, Y, Z], got shape {volume.shape}")
    if not isinstance(detections, dict) or "box" not in detections:
        raise ValueError("save_detection_png: detections must be a dict with 'box' and 'label_scores'")
    boxes = _numpy(detections["box"]).reshape(-1, 6).astype(np.float64)
    scores = _numpy(detections.get("label_scores", np.ones(len(boxes)))).reshape(-1).astype(np.float64)
    labels = _numpy(detections.get("label", np.zeros(len(boxes), dtype=np.int64))).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"save_detection_png: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    truth = np.zeros((0, 6)) if ground_truth is None else _numpy(ground_truth["box"]).reshape(-1, 6).astype(np.float64)

    shown = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_min][:max(0, int(max_panels))]
    depth = volume.shape[2]
    panels = [(int(np.clip(math.floor((boxes[i, 2] + boxes[i, 5]) / 2), 0, depth - 1)), i) for i in shown]
    if not panels:
        panels = [(depth // 2, None)]

    low, high = _intensity_window(volume)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(_PANEL_INCHES * columns, _PANEL_INCHES * rows), dpi=100)
    extent = (0, volume.shape[0], 0, volume.shape[1])
    for panel, (z, index) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, panel + 1)
        axes.imshow(volume[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                    interpolation="nearest")
        for box in _boxes_crossing(truth, z):
            _draw_box(axes, box, _TRUTH_COLOUR, "--")
        if index is None:
            axes.set_title(f"no detections (z={z})", fontsize=9)
        else:
            _draw_box(axes, boxes[index], _PREDICTION_COLOUR)
            axes.set_title(f"score {scores[index]:.2f}  label {int(labels[index])}  z={z}", fontsize=9)
        axes.set_xlim(0, volume.shape[0])
        axes.set_ylim(0, volume.shape[1])
        axes.set_xticks([])
        axes.set_yticks([])
    figure.tight_layout()
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")
    return path
