"""Load and validate a MONAI detection datalist before any training starts.

Datalist format (MONAI detection)::

    {"training": [{"image": "imagesTr/a_0000.nii.gz", "box": [[cx, cy, cz, w, h, d], ...], "label": [0, ...]},
                  {"image": ["b_0000.nii.gz", "b_0001.nii.gz"]},        # two channels, a negative case
                  ...],
     "validation": [...]}

Boxes are world `cccwhd` in mm, in the world frame of the image file as MONAI's `LoadImage` reads it
(nibabel's ``affine`` for NIfTI, RAS; for ITK formats the LPS geometry converted to RAS like MONAI's
`ITKReader`). An image is a DICOM series folder (one series per folder), a ``.mhd`` (MetaImage),
``.nrrd`` or ``.nii``/``.nii.gz`` file; every format yields boxes in this same RAS world frame. Labels are
0-based class ids. An item without ``box`` (or with an empty list) is a negative case. Optional per item:
``ignore_box`` (world `cccwhd` regions that are neither objects nor background, e.g. LUNA16's excluded
findings: training takes no loss there, and detections there are neither true nor false positives in
evaluation) and ``diameter_mm`` (one per box; the evaluation then also reports the LUNA16 CPM, which counts
a hit within half the diameter of the box centre).

Every problem found in the file is collected and reported in one `DatalistError`, so a broken dataset
is fixed in one pass instead of one crash per training start.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from meddet.data.boxes import boxes_world_to_voxel
from meddet.data.image_io import ImageFormatError, has_non_finite, image_exists, read_header, read_image_geometry

__all__ = ["DatalistError", "load_datalist", "read_image_geometry", "write_datalist"]

#: path-valued item keys made absolute on load (``instance_mask``: optional instance segmentation)
PATH_KEYS = ("image", "instance_mask")
_MAX_REPORTED = 20
_BOX_TOLERANCE_VOXELS = 1.0
_AFFINE_TOLERANCE = 1e-3


class DatalistError(ValueError):
    """A datalist that cannot be trained on; the message lists every problem found."""


def _repeat_uncaught_datalist_errors_last() -> None:
    """Have an uncaught `DatalistError` repeated after its traceback. Raised inside a bundle's config expression, it
    reaches the user in the middle of MONAI's long "Failed to evaluate ConfigExpression" traceback; the list of
    problems to fix should be the last thing on the screen. A caught error prints nothing."""
    if getattr(sys.excepthook, "repeats_datalist_errors", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        seen, error = set(), value
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            if isinstance(error, DatalistError):
                print(f"\n{type(error).__name__}: {error}", file=sys.stderr)
                return
            error = error.__cause__ or error.__context__

    hook.repeats_datalist_errors = True
    sys.excepthook = hook


def _check_image(paths: list[Path]) -> tuple[list[str], tuple | None, np.ndarray | None]:
    """Problems of the image file(s) of one item, plus the spatial shape and affine when readable."""
    problems, geometries = [], []
    for path in paths:
        if not image_exists(path):
            problems.append(f"image file not found: {path}")
            continue
        try:
            shape, affine = read_header(path)
        except ImageFormatError as error:  # already names the path and says what to fix
            problems.append(str(error))
            continue
        except Exception as error:  # any reader failure means the file is unusable
            problems.append(f"cannot read image {path}: {error}")
            continue
        if len(shape) < 3:
            problems.append(f"image {path} is {len(shape)}D with shape {shape}; a 3D volume is required")
            continue
        if len(shape) > 4:
            problems.append(f"image {path} has shape {shape}: more than one non-spatial dimension "
                            "(expected X, Y, Z or X, Y, Z, C)")
            continue
        if min(shape[:3]) < 2:
            problems.append(f"image {path} has spatial shape {shape[:3]}: a 2D slice, not a 3D volume")
            continue
        try:
            if has_non_finite(path):
                problems.append(f"image {path} contains NaN or Inf values")
        except Exception as error:
            problems.append(f"cannot read the voxel data of image {path}: {error}")
        geometries.append((path, shape[:3], affine))
    if not geometries or problems:
        return problems, None, None
    first_path, shape, affine = geometries[0]
    for path, other_shape, other_affine in geometries[1:]:
        if other_shape != shape or not np.allclose(other_affine, affine, atol=_AFFINE_TOLERANCE):
            problems.append(f"channel files disagree on geometry: {first_path} has shape {shape}, "
                            f"{path} has shape {other_shape} (or a different affine)")
    return problems, shape, affine


def _parse_boxes(item: dict) -> tuple[list[str], np.ndarray | None]:
    raw = item.get("box")
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        return [], np.zeros((0, 6), dtype=np.float32)
    if not isinstance(raw, (list, tuple)):
        return [f"'box' must be a list of [cx, cy, cz, w, h, d] lists, got {type(raw).__name__}"], None
    if all(isinstance(v, (int, float)) for v in raw):
        return [f"'box' must be a list of boxes [[cx, cy, cz, w, h, d], ...], "
                f"got a flat list of {len(raw)} numbers"], None
    problems = []
    for index, box in enumerate(raw):
        if not isinstance(box, (list, tuple)) or len(box) != 6:
            length = len(box) if isinstance(box, (list, tuple)) else type(box).__name__
            problems.append(f"box {index} has length {length}; expected 6 values (cx, cy, cz, w, h, d)")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            problems.append(f"box {index} has non-numeric or non-finite values {box}")
        elif min(box[3:]) <= 0:
            problems.append(f"box {index} has non-positive size (w, h, d) = {tuple(box[3:])}")
    if problems:
        return problems, None
    return [], np.asarray(raw, dtype=np.float32).reshape(-1, 6)


def _parse_labels(item: dict, num_classes: int | None) -> tuple[list[str], np.ndarray | None]:
    raw = item.get("label", [])
    raw = [] if raw is None else raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        return [f"'label' must be a list of class ids, got {type(raw).__name__}"], None
    problems = []
    for index, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            problems.append(f"label {index} = {value!r} is not an integer class id")
        elif value < 0 or (num_classes is not None and value >= num_classes):
            allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            problems.append(f"label {index} = {value} is outside {allowed}")
    if problems:
        return problems, None
    return [], np.asarray(raw, dtype=np.int64).reshape(-1)


def _diameter_problems(raw, num_boxes: int) -> list[str]:
    if not isinstance(raw, (list, tuple)) or len(raw) != num_boxes:
        return [f"'diameter_mm' must be a list with one diameter per box ({num_boxes}), got {raw!r:.80}"]
    bad = [v for v in raw if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
    return [f"'diameter_mm' holds values that are not positive numbers: {bad}"] if bad else []


def _inside(voxel_box: np.ndarray, upper: np.ndarray) -> bool:
    return not (np.any(voxel_box[:3] < -_BOX_TOLERANCE_VOXELS) or np.any(voxel_box[3:] > upper + _BOX_TOLERANCE_VOXELS))


def _boxes_outside(boxes: np.ndarray, shape, affine) -> list[str]:
    voxel = np.asarray(boxes_world_to_voxel(boxes.astype(np.float64), affine))
    as_indices = np.concatenate([boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2], axis=1)
    upper = np.asarray(shape, dtype=np.float64)
    problems = []
    for index, box in enumerate(voxel):
        if not _inside(box, upper):
            # the usual cause: boxes written in voxel indices instead of world millimetres
            hint = ("; read as voxel indices it would lie inside: datalist boxes are world millimetres (cx, cy, cz, "
                    "w, h, d), not voxels" if _inside(as_indices[index], upper) else "")
            problems.append(f"box {index} lies outside the image: voxel box {np.round(box, 2).tolist()} "
                            f"for spatial shape {tuple(shape)} (tolerance {_BOX_TOLERANCE_VOXELS:g} voxel){hint}")
    return problems


def write_datalist(datalist: dict, path) -> str:
    """Write a datalist as JSON with one item per line (readable diffs, byte-identical for equal input)."""
    lines = ["{"]
    for key_index, (key, items) in enumerate(datalist.items()):
        body = ",\n".join(f"    {json.dumps(item)}" for item in items)
        lines.append(f"  {json.dumps(key)}: [" + (f"\n{body}\n  ]" if items else "]")
                     + ("," if key_index < len(datalist) - 1 else ""))
    lines.append("}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _absolute(value, base: Path):
    if isinstance(value, (list, tuple)):
        return [_absolute(v, base) for v in value]
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_datalist(data_list_file_path, dataset_dir=None, data_list_key: str = "training",
                  num_classes: int | None = None, check_images: bool = True, labels: bool = True) -> list[dict]:
    """Read one list of a detection datalist, validated, with absolute paths and array boxes.

    Args:
        data_list_file_path: the datalist JSON.
        dataset_dir: base of relative paths; default the datalist's folder.
        data_list_key: which list to load ("training", "validation", "test", ...).
        num_classes: when given, labels must lie in [0, num_classes).
        check_images: open every image: it must exist and be readable, be 3D (``X, Y, Z`` or channel-last
            ``X, Y, Z, C``; a list of files is one channel each, all with the same geometry), hold no
            NaN/Inf, and contain every box (world -> voxel with the file's affine, 1 voxel tolerance).
            With False no file is opened; box and label structure is still checked.
        labels: False reads an unlabeled list (pre-training): ``box`` / ``label`` entries, if present, are
            ignored and left out of the returned items; the images are checked as above.

    Returns:
        The items, each a copy with ``image`` (and ``instance_mask``, if present) made absolute
        (str, or list of str for multi-file channels), ``box`` float32 array (N, 6) world ``cccwhd``
        (N = 0 for a negative case), ``label`` int64 array (N,) and, when the item has ignore regions,
        ``ignore_box`` float32 array (I, 6) world ``cccwhd``.

    Raises:
        DatalistError: naming the datalist file and, per problem, the item index and image path
            (at most 20 lines; the total count is given).
    """
    file_path = Path(data_list_file_path)
    base = Path(dataset_dir) if dataset_dir is not None else file_path.parent
    try:
        with open(file_path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise DatalistError(f"datalist {file_path}: cannot be read as JSON ({error})") from error
    if not isinstance(content, dict) or data_list_key not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatalistError(f"datalist {file_path}: no list {data_list_key!r} (found {keys})")
    items = content[data_list_key]
    if not isinstance(items, list):
        raise DatalistError(f"datalist {file_path}: {data_list_key!r} must be a list, got {type(items).__name__}")

    problems: list[str] = []
    loaded = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item:
            problems.append(f"item {index}: expected a dict with an 'image' entry, got {item!r:.80}")
            continue
        record = dict(item)
        for key in PATH_KEYS:
            if key in record:
                record[key] = _absolute(record[key], base)
        image_paths = [Path(p) for p in (record["image"] if isinstance(record["image"], list) else [record["image"]])]
        where = f"item {index} (image {record['image']})"
        if labels:
            item_problems, boxes = _parse_boxes(item)
            label_problems, classes = _parse_labels(item, num_classes)
            item_problems += label_problems
            if boxes is not None and classes is not None and len(boxes) != len(classes):
                item_problems.append(f"{len(boxes)} boxes but {len(classes)} labels")
            ignore_problems, ignore_boxes = _parse_boxes({"box": item.get("ignore_box")})
            item_problems += [f"ignore_{p}" for p in ignore_problems]
            if boxes is not None and "diameter_mm" in item:
                item_problems += _diameter_problems(item["diameter_mm"], len(boxes))
        else:
            item_problems, boxes, classes = [], None, None
            record.pop("box", None)
            record.pop("label", None)
        if check_images:
            image_problems, shape, affine = _check_image(image_paths)
            item_problems += image_problems
            if shape is not None and boxes is not None and len(boxes):
                item_problems += _boxes_outside(boxes, shape, affine)
        problems += [f"{where}: {p}" for p in item_problems]
        if not item_problems:
            if labels:
                record["box"], record["label"] = boxes, classes
                if len(ignore_boxes):
                    record["ignore_box"] = ignore_boxes
                else:
                    record.pop("ignore_box", None)
            loaded.append(record)

    if problems:
        shown = problems[:_MAX_REPORTED]
        if len(problems) > _MAX_REPORTED:
            shown.append(f"... and {len(problems) - _MAX_REPORTED} more")
        _repeat_uncaught_datalist_errors_last()
        raise DatalistError(f"datalist {file_path} ({data_list_key!r}): {len(problems)} problem(s):\n  "
                            + "\n  ".join(shown))
    return loaded
