"""Prepare a MONAI Label app that serves detection bundles of this collection, ready for 3D Slicer.

    python tools/monailabel_app.py prepare --app_dir APP [--studies IMAGES] [--bundles all|NAME,NAME]
        [--preset full|smoke] [--plans plans.json] [--score_thresh 0.3] [--detections_per_image 10]
        [--bundles_dir bundles] [--host 127.0.0.1] [--port 8000] [--overrides '{"epoch_length": 50}']

Writes `APP/main.py` (an app with one inference and one training task per bundle) and `APP/model/<bundle>/`, a copy
of each bundle whose `configs/inference.json` and `configs/train.json` are what MONAI Label reads, ready to serve:
- `affine_lps_to_ras: true`: 3D Slicer sends and receives boxes in LPS; the bundles default to the datalist's
  RAS frame.
- `--preset smoke` folds each bundle's `configs/smoke.json` in (MONAI Label reads those two files only).
- `--plans`: the `tools/plan.py` output the bundles were fine-tuned with (spacing, intensities, anchors), folded
  in after the preset: a model served with other preprocessing than it was trained with finds other boxes.
- `--score_thresh`: the lowest score a box needs to be sent to the viewer (MONAI Label drops the scores, so it
  decides what the user sees). It is the default of `display_score_thresh`, which the viewer's options panel
  can change per request. The detector's candidate threshold is lowered to it when it is higher.
- `--detections_per_image`: the most boxes per image.
- `--overrides`: any other top-level keys, applied to each of the two configs that defines them.
A bundle's `models/` folder (its fine-tuned `model.pt`, downloaded encoder weights) is copied along. Running the
tool again on the same app rewrites the configs and keeps the app's `models/` folders, which MONAI Label's training
has written to. Prints the `monailabel start_server` command to run in MONAI Label's environment.

    python tools/monailabel_app.py render --image SCAN --rois ROIS.json --out rois.png [--ground_truth BOXES]

draws a 3D Slicer ROI JSON (what `/infer` returns) on its scan, to look at a result without the viewer.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil

import fire
import numpy as np
from monai.bundle import ConfigParser
from package import large_files

from meddet.data.boxes import boxes_world_to_voxel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monailabel_app_main.py")
SERVED_CONFIGS = ("inference.json", "train.json")
PRESETS = ("full", "smoke")


def detection_bundles(bundles_dir: str) -> list[str]:
    """The bundles in `bundles_dir` MONAI Label can serve: folders named `*_detection` with both configs."""
    if not os.path.isdir(bundles_dir):
        raise FileNotFoundError(f"{bundles_dir}: no such folder of bundles")
    return sorted(name for name in os.listdir(bundles_dir) if name.endswith("_detection")
                  and all(os.path.isfile(os.path.join(bundles_dir, name, "configs", c)) for c in SERVED_CONFIGS))


def _chosen(bundles, bundles_dir: str) -> list[str]:
    available = detection_bundles(bundles_dir)
    if bundles in (None, "all"):
        names = available
    else:
        names = [bundles] if isinstance(bundles, str) else list(bundles)
        names = [part.strip() for name in names for part in name.split(",") if part.strip()]
        unknown = [name for name in names if name not in available]
        if unknown:
            # MONAI Label reads box labels only for models whose name contains "detection"
            raise ValueError(f"not a detection bundle in {bundles_dir}: {', '.join(unknown)}; "
                             f"available: {', '.join(available)}")
    if not names:
        raise ValueError(f"{bundles_dir}: no detection bundles to serve")
    return names


def served_overrides(content: dict, score_thresh: float | None, detections_per_image: int | None,
                     overrides: dict) -> dict:
    """The keys to set in one served config (`content`: that config with any preset already folded in)."""
    values = {"affine_lps_to_ras": True}
    values.update({key: value for key, value in overrides.items() if key.split("#")[0] in content})
    if detections_per_image is not None and "detections_per_image" in content:
        values["detections_per_image"] = int(detections_per_image)
    if score_thresh is not None and "displayable_configs" in content:
        values["displayable_configs#display_score_thresh"] = float(score_thresh)
        candidate = content.get("score_thresh")
        if isinstance(candidate, (int, float)) and candidate > score_thresh:
            values["score_thresh"] = float(score_thresh)
    return values


def _serve_config(bundle_root: str, config: str, preset: str, plans: str | None, score_thresh,
                  detections_per_image, overrides: dict) -> None:
    path = os.path.join(bundle_root, "configs", config)
    files = [path] + ([os.path.join(bundle_root, "configs", "smoke.json")] if preset == "smoke" else [])
    files += [plans] if plans else []
    parser = ConfigParser()
    parser.read_config(files)
    for key, value in served_overrides(parser.get(), score_thresh, detections_per_image, overrides).items():
        parser[key] = value
    content = parser.get()
    content.pop("_meta_", None)
    tmp = path + ".tmp"
    ConfigParser.export_config_file(content, tmp, indent=2)
    os.replace(tmp, path)


def _copy_bundle(source: str, target: str) -> bool:
    """Copy a bundle, keeping `target/models/` when the app already has one; True when it was kept."""
    kept = os.path.isdir(os.path.join(target, "models"))
    if kept:
        for entry in os.listdir(target):
            if entry != "models":
                path = os.path.join(target, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        ignore = shutil.ignore_patterns("models", "eval", "__pycache__")
    else:
        ignore = shutil.ignore_patterns("eval", "__pycache__")
    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    return kept


def _missing_weights(bundle_root: str) -> list[str]:
    weights = os.path.join(bundle_root, "models", "model.pt")
    if os.path.isfile(weights):
        return []
    problems = [f"no models/model.pt yet: inference answers 'Model Path ... does not exist' until it is there "
                f"(copy the fine-tuned model.pt to {weights}, or train from the viewer)"]
    if any(not os.path.isfile(os.path.join(bundle_root, path)) for path in large_files(bundle_root)):
        problems.append("training from the viewer starts from the released encoder: fetch it first with "
                        f"python -m monai.bundle download_large_files --bundle_path {bundle_root}")
    return problems


def prepare_app(app_dir: str, studies: str = "images", bundles="all", preset: str = "full",
                plans: str | None = None, score_thresh: float | None = None, detections_per_image: int | None = None,
                bundles_dir: str = os.path.join(REPO_ROOT, "bundles"), host: str = "127.0.0.1", port: int = 8000,
                overrides: dict | None = None) -> list[str]:
    """Write the app (see the module docstring); returns the `monailabel start_server` command."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a JSON object of top-level keys, got {overrides!r}")
    if score_thresh is not None and not 0.0 <= float(score_thresh) <= 1.0:
        raise ValueError(f"score_thresh must lie in [0, 1], got {score_thresh}")
    if plans is not None and not os.path.isfile(plans):
        raise FileNotFoundError(f"{plans}: no such plans file (tools/plan.py writes one)")
    names = _chosen(bundles, bundles_dir)
    model_dir = os.path.join(app_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    shutil.copyfile(APP_MAIN, os.path.join(app_dir, "main.py"))
    for name in names:
        target = os.path.join(model_dir, name)
        kept = _copy_bundle(os.path.join(bundles_dir, name), target)
        for config in SERVED_CONFIGS:
            _serve_config(target, config, preset, plans, score_thresh, detections_per_image, overrides or {})
        if kept:
            print(f"{name}: configs rewritten, the app's models/ kept")
        for problem in _missing_weights(target):
            print(f"{name}: {problem}")
    return ["monailabel", "start_server", "--app", os.path.abspath(app_dir), "--studies", os.path.abspath(studies),
            "--host", host, "--port", str(port)]


def roi_boxes_lps(rois: str) -> np.ndarray:
    """The boxes of a 3D Slicer ROI JSON (what `/infer` returns and `/datastore/label` takes): LPS `cccwhd` mm."""
    with open(rois, encoding="utf-8") as f:
        markups = json.load(f).get("markups", [])
    boxes = []
    for index, roi in enumerate(markups):
        if roi.get("type") != "ROI" or roi.get("coordinateSystem", "LPS") != "LPS":
            raise ValueError(f"{rois}: markup {index} is not an LPS ROI (type {roi.get('type')!r}, "
                             f"coordinateSystem {roi.get('coordinateSystem')!r})")
        boxes.append(list(roi["center"]) + list(roi["size"]))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 6)


def roi_voxel_boxes(rois: str, affine) -> np.ndarray:
    """A ROI JSON's boxes as voxel `xyzxyz` boxes of the scan with this (RAS, as MONAI loads it) affine."""
    return np.asarray(boxes_world_to_voxel(roi_boxes_lps(rois) * np.array([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]), affine))


def render(image: str, rois: str, out: str, ground_truth=None, panels: int = 3) -> str:
    """Draw a ROI JSON on its scan as the viewer places it: axial slices through the first `panels` boxes.

    `ground_truth`: optional world boxes (RAS `cccwhd`, as in a datalist) drawn dashed. Returns the PNG path.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from monai.transforms import LoadImage

    volume = LoadImage(image_only=True)(image)
    affine = volume.affine.numpy()
    data = volume.numpy().reshape(volume.shape[:3] + (-1,))[..., 0]
    boxes = roi_voxel_boxes(rois, affine)
    truth = np.zeros((0, 6)) if ground_truth is None else np.asarray(
        boxes_world_to_voxel(np.asarray(ground_truth, dtype=np.float64).reshape(-1, 6), affine))
    slices = [int(np.clip((box[2] + box[5]) / 2, 0, data.shape[2] - 1)) for box in boxes[:panels]]
    slices = slices or [data.shape[2] // 2]
    low, high = np.percentile(data, [0.5, 99.5])
    figure = Figure(figsize=(3.2 * len(slices), 3.6), dpi=100)
    for panel, z in enumerate(slices):
        axes = figure.add_subplot(1, len(slices), panel + 1)
        axes.imshow(data[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest",
                    extent=(0, data.shape[0], 0, data.shape[1]))
        for drawn, colour, style in ((truth, "#2ca02c", "--"), (boxes, "#d62728", "-")):
            for box in drawn:
                if box[2] <= z + 0.5 < box[5]:
                    axes.add_patch(Rectangle((box[0], box[1]), box[3] - box[0], box[4] - box[1], fill=False,
                                             edgecolor=colour, linestyle=style, linewidth=1.2))
        axes.set_title(f"z={z}", fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    legend = f"{len(boxes)} ROI(s) from MONAI Label (red)" + (", ground truth dashed green" if len(truth) else "")
    figure.suptitle(f"{os.path.basename(image)}: {legend}", fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, format="png")
    return out


def main(app_dir: str, **kwargs) -> None:
    command = prepare_app(app_dir, **kwargs)
    print(f"MONAI Label app ready in {app_dir}; start it in MONAI Label's environment with:")
    print("  " + " ".join(shlex.quote(part) for part in command))


if __name__ == "__main__":
    fire.Fire({"prepare": main, "render": render})
