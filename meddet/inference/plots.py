"""Quick-look PNG of one case: ground truth and detections in different colours on the slice through each object,
hits, misses and false positives counted at an operating threshold.

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


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)))
    from monai.data.box_utils import box_iou

    return np.asarray(box_iou(boxes, others), dtype=np.float64)


def _match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by descending score: (detection -> object index or -1, object -> detection or -1)."""
    iou = _iou(boxes, truth)
    detection_hit = np.full(len(boxes), -1)
    object_found = np.full(len(truth), -1)
    for index in np.argsort(-scores, kind="stable"):
        candidates = np.where((iou[index] >= iou_thresh) & (object_found < 0), iou[index], -1.0)
        if len(candidates) and candidates.max() >= iou_thresh:
            target = int(np.argmax(candidates))
            detection_hit[index], object_found[target] = target, index
    return detection_hit, object_found


def _centre_slice(box: np.ndarray, depth: int) -> int:
    return int(np.clip(math.floor((box[2] + box[5]) / 2), 0, depth - 1))


def _panels(boxes, scores, truth, operating, depth, max_panels, iou_thresh):
    """(slice, title) per panel: every object (hit or missed) at its centre slice, then the false positives at the
    operating threshold; without ground truth, the highest-scoring detections."""
    panels = []
    if len(truth):
        hit, found = _match(boxes[operating], scores[operating], truth, iou_thresh)
        kept = np.flatnonzero(operating)
        for index, box in enumerate(truth):
            title = (f"object {index + 1}: hit, score {scores[kept[found[index]]]:.2f}" if found[index] >= 0
                     else f"object {index + 1}: missed")
            panels.append((_centre_slice(box, depth), title))
        for local in np.argsort(-scores[operating], kind="stable"):
            if hit[local] < 0:
                panels.append((_centre_slice(boxes[kept[local]], depth), f"false positive, score {scores[kept[local]]:.2f}"))
        summary = (int((found >= 0).sum()), int((found < 0).sum()), int((hit < 0).sum()))
    else:
        for index in np.argsort(-scores, kind="stable")[:max_panels]:
            panels.append((_centre_slice(boxes[index], depth), f"detection, score {scores[index]:.2f}"))
        summary = None
    return panels[:max(1, int(max_panels))], summary


def save_detection_png(image, detections: dict, path, ground_truth: dict | None = None, max_panels: int = 6,
                       score_min: float = 0.1, score_thresh: float = 0.5, iou_thresh: float = 0.1,
                       name: str | None = None) -> str:
    """Write a PNG of one case's detections and return its path.

    Args:
        image: [C, X, Y, Z] (the first channel is shown) or [X, Y, Z], tensor or array.
        detections: dict with "box" [N, 6] voxel `xyzxyz` and "label_scores" [N] (optional "label" [N]).
        path: output file; missing folders are created.
        ground_truth: optional dict with "box" [M, 6] voxel `xyzxyz` (dashed green).
        max_panels: at most this many panels.
        score_min: detections scoring below this are not drawn.
        score_thresh: the operating threshold of the summary: detections at or above it count as hits (IoU >=
            `iou_thresh` with an object not found yet, by descending score) or false positives.
        name: the case's name in the summary line (default: the file name).

    With ground truth, one panel per object (the axial slice through its centre, titled hit with the matching
    score, or missed), then one per false positive at the operating threshold; the figure's title counts hits,
    misses and false positives. Without it, one panel per detection, highest score first. Every panel draws the
    objects (dashed green) and detections (red, score written at the box) crossing its slice, with a legend (array
    axis 0 horizontal, axis 1 vertical, voxel i spanning [i, i + 1) so boxes sit on the voxels they cover),
    intensity clipped to the 0.5-99.5 percentile window; a case with nothing to show gets its middle slice.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

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
    drawn = scores >= score_min
    depth = volume.shape[2]
    panels, summary = _panels(boxes[drawn], scores[drawn], truth, scores[drawn] >= score_thresh, depth, max_panels,
                              iou_thresh)
    if not panels:
        panels = [(depth // 2, "no detections")]

    low, high = _intensity_window(volume)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(_PANEL_INCHES * columns, _PANEL_INCHES * rows + 0.7), dpi=100)
    extent = (0, volume.shape[0], 0, volume.shape[1])
    for panel, (z, title) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, panel + 1)
        axes.imshow(volume[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                    interpolation="nearest")
        for box in _boxes_crossing(truth, z):
            _draw_box(axes, box, _TRUTH_COLOUR, "--")
        crossing = [i for i in np.flatnonzero(drawn) if boxes[i, 2] <= z + 0.5 < boxes[i, 5]]
        for index in crossing:
            _draw_box(axes, boxes[index], _PREDICTION_COLOUR)
            axes.text(boxes[index, 0], boxes[index, 4] + 0.5, f"{scores[index]:.2f}", color=_PREDICTION_COLOUR,
                      fontsize=7, va="bottom")
        axes.set_title(f"{title} (z={z})", fontsize=8)
        axes.set_xlim(0, volume.shape[0])
        axes.set_ylim(0, volume.shape[1])
        axes.set_xticks([])
        axes.set_yticks([])
    case = name or os.path.basename(os.fspath(path))
    if summary is not None:
        heading = (f"{case}: {summary[0]} hit(s), {summary[1]} missed, {summary[2]} false positive(s) at score >= "
                   f"{score_thresh:g} (IoU >= {iou_thresh:g})")
    else:
        heading = f"{case}: {int((scores >= score_thresh).sum())} detection(s) at score >= {score_thresh:g}"
    figure.suptitle(heading, fontsize=9)
    handles = [Line2D([], [], color=_PREDICTION_COLOUR, label=f"prediction (score >= {score_min:g}, score at box)")]
    if ground_truth is not None:
        handles.insert(0, Line2D([], [], color=_TRUTH_COLOUR, linestyle="--", label="ground truth"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")
    return path
