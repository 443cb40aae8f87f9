"""nnDetection raw datasets -> MONAI detection datalist, and nnDetection's box convention.

nnDetection raw layout (a task folder, or its ``raw_splitted`` sub-folder)::

    dataset.json | dataset.yaml          {"labels": {"0": "lesion"}, "modalities": {"0": "CT"}, ...}
    imagesTr/<case>_<CCCC>.nii.gz        one file per channel CCCC = 0000, 0001, ...
    labelsTr/<case>.nii.gz               instance mask, background 0, instances 1..N
    labelsTr/<case>.json                 {"instances": {"1": class_id, ...}}
    imagesTs/<case>_<CCCC>.nii.gz        optional, unlabelled

Boxes in the datalist are derived from the instance masks: voxel box [min, max + 1) per instance
(`boxes_from_instance_mask`), converted to world `cccwhd` mm with the mask file's affine
(`meddet.data.boxes.boxes_voxel_to_world`).

An instance listed in a case's json but absent from its mask (e.g. removed by cropping) is skipped
with a warning; an instance present in the mask but missing from the json is an error, because its
class is unknown.

nnDetection itself stores voxel boxes as ``(x1, y1, x2, y2, z1, z2)`` with corners ``[min - 1, max + 1]``;
`nndet_box_to_monai` / `monai_box_to_nndet` convert between that and MONAI's ``xyzxyz`` ``[min, max + 1)``
so that numbers can be compared with nnDetection's outputs. They are not used for training.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from meddet.data.boxes import boxes_voxel_to_world
from meddet.data.datalist import read_image_geometry, write_datalist

__all__ = ["boxes_from_instance_mask", "convert_nndet_raw", "nndet_box_to_monai", "monai_box_to_nndet"]

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
_AFFINE_TOLERANCE = 1e-3  # mm; image and mask headers are float32


def boxes_from_instance_mask(mask: np.ndarray) -> dict[int, np.ndarray]:
    """Voxel boxes of every instance in an integer instance mask.

    Args:
        mask: integer array (X, Y, Z) (any number of dims D), 0 = background, instances 1..N
            (ids need not be contiguous).

    Returns:
        {instance_id: float64 array (2 * D,)} with MONAI ``xyzxyz`` corners ``[min, max + 1)``, e.g. an
        instance on voxels x = 3..5 has x1 = 3, x2 = 6. Ids absent from the mask are absent here.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "iu":
        raise TypeError(f"instance mask must be an integer array, got dtype {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise ValueError(f"instance mask has negative values (min {mask.min()})")
    boxes = {}
    for index, slices in enumerate(ndimage.find_objects(mask)):
        if slices is not None:
            boxes[index + 1] = np.array([s.start for s in slices] + [s.stop for s in slices], dtype=np.float64)
    return boxes


def nndet_box_to_monai(boxes) -> np.ndarray:
    """nnDetection ``(x1, y1, x2, y2, z1, z2)`` with ``[min - 1, max + 1]`` -> MONAI ``xyzxyz`` ``[min, max + 1)``.

    Accepts shape (6,) or (N, 6); returns float64 of the same shape.
    """
    b = np.asarray(boxes, dtype=np.float64)
    flat = b.reshape(-1, 6)
    out = np.stack([flat[:, 0] + 1, flat[:, 1] + 1, flat[:, 4] + 1, flat[:, 2], flat[:, 3], flat[:, 5]], axis=1)
    return out.reshape(b.shape)


def monai_box_to_nndet(boxes) -> np.ndarray:
    """MONAI ``xyzxyz`` ``[min, max + 1)`` -> nnDetection ``(x1, y1, x2, y2, z1, z2)`` ``[min - 1, max + 1]``."""
    b = np.asarray(boxes, dtype=np.float64)
    flat = b.reshape(-1, 6)
    out = np.stack([flat[:, 0] - 1, flat[:, 1] - 1, flat[:, 3], flat[:, 4], flat[:, 2] - 1, flat[:, 5]], axis=1)
    return out.reshape(b.shape)


def _find_layout(raw_dir: Path) -> tuple[Path, Path]:
    """(folder holding imagesTr/labelsTr, dataset description file)."""
    for data_dir in (raw_dir, raw_dir / "raw_splitted"):
        if (data_dir / "imagesTr").is_dir():
            break
    else:
        raise FileNotFoundError(f"{raw_dir}: no imagesTr folder (looked in {raw_dir} and {raw_dir / 'raw_splitted'})")
    for folder in dict.fromkeys((raw_dir, data_dir, data_dir.parent)):
        for name in ("dataset.json", "dataset.yaml", "dataset.yml"):
            if (folder / name).is_file():
                return data_dir, folder / name
    raise FileNotFoundError(f"{raw_dir}: no dataset.json or dataset.yaml next to {data_dir / 'imagesTr'}")


def _read_description(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            description = json.load(f)
        else:
            import yaml

            description = yaml.safe_load(f)
    if not isinstance(description, dict) or "labels" not in description:
        raise ValueError(f"{path}: expected a mapping with a 'labels' entry, e.g. {{'labels': {{'0': 'lesion'}}}}")
    return description


def _channel_files(folder: Path) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            match = _CHANNEL_FILE.match(path.name)
            if match:
                cases.setdefault(match["case"], {})[int(match["channel"])] = path
    return cases


def _image_entry(case: str, channels: dict[int, Path], num_channels: int, folder: Path, problems: list[str]):
    """A single path (one channel) or a list of paths in channel order; records missing channel files."""
    missing = [c for c in range(num_channels) if c not in channels]
    for c in missing:
        problems.append(f"{folder / f'{case}_{c:04d}.nii.gz'}: channel file missing (case {case!r}, "
                        f"{num_channels} channels expected)")
    extra = sorted(c for c in channels if c >= num_channels)
    for c in extra:
        problems.append(f"{channels[c]}: unexpected channel {c} (the dataset description lists {num_channels})")
    if missing or extra:
        return None
    paths = [channels[c] for c in range(num_channels)]
    return paths[0] if num_channels == 1 else paths


def _case_annotation(case: str, image_path: Path, labels_dir: Path, class_ids: set[int], problems: list[str]):
    """(voxel boxes xyzxyz (N, 6), labels (N,), mask path) from the case's mask and json, or None on error."""
    mask_path = labels_dir / f"{case}.nii.gz"
    json_path = labels_dir / f"{case}.json"
    if not mask_path.is_file():
        mask_path = labels_dir / f"{case}.nii"
    ok = True
    if not mask_path.is_file():
        problems.append(f"{labels_dir / (case + '.nii.gz')}: instance mask missing for case {case!r}")
        ok = False
    if not json_path.is_file():
        problems.append(f"{json_path}: labels json missing for case {case!r}")
        ok = False
    if not ok:
        return None
    try:
        with open(json_path, encoding="utf-8") as f:
            instances = json.load(f)["instances"]
        instance_classes = {int(k): int(v) for k, v in instances.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        problems.append(f"{json_path}: expected {{'instances': {{'1': class_id, ...}}}} ({error!r})")
        return None

    mask_image = nib.load(str(mask_path))
    mask = np.asanyarray(mask_image.dataobj)
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.round(mask)):
            problems.append(f"{mask_path}: instance mask has non-integer values")
            return None
    mask = mask.astype(np.int64)
    mask = mask.reshape(mask.shape[:3]) if mask.ndim > 3 and all(s == 1 for s in mask.shape[3:]) else mask
    if mask.ndim != 3:
        problems.append(f"{mask_path}: instance mask must be 3D, got shape {mask.shape}")
        return None

    image_shape, image_affine = read_image_geometry(image_path)
    if tuple(image_shape) != mask.shape:
        problems.append(f"{mask_path}: mask shape {mask.shape} differs from image {image_path} "
                        f"shape {tuple(image_shape)}")
        return None
    if not np.allclose(image_affine, mask_image.affine, atol=_AFFINE_TOLERANCE):
        problems.append(f"{mask_path}: mask affine differs from the affine of image {image_path}")
        return None

    voxel_boxes = boxes_from_instance_mask(mask)
    unknown = sorted(set(voxel_boxes) - set(instance_classes))
    if unknown:
        problems.append(f"{json_path}: instances {unknown} are in the mask {mask_path.name} but not in the json")
        return None
    bad_classes = sorted({c for c in instance_classes.values() if c not in class_ids})
    if bad_classes:
        problems.append(f"{json_path}: classes {bad_classes} are not in the dataset labels {sorted(class_ids)}")
        return None
    absent = sorted(set(instance_classes) - set(voxel_boxes))
    if absent:
        warnings.warn(f"{json_path}: instances {absent} are listed but absent from {mask_path.name}; skipped",
                      stacklevel=3)
    ids = sorted(voxel_boxes)
    boxes = np.stack([voxel_boxes[i] for i in ids]) if ids else np.zeros((0, 6))
    world = boxes_voxel_to_world(boxes, mask_image.affine)
    return world, np.array([instance_classes[i] for i in ids], dtype=np.int64), mask_path


def _relative(path, base: Path):
    if isinstance(path, list):
        return [_relative(p, base) for p in path]
    import os

    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def convert_nndet_raw(raw_dir, output_path=None, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Convert an nnDetection raw dataset into a MONAI detection datalist.

    Args:
        raw_dir: the task folder (holding ``dataset.json|yaml`` and ``raw_splitted/``) or the folder
            holding ``imagesTr``/``labelsTr`` directly.
        output_path: where to write the datalist JSON; None writes nothing.
        validation_fraction: share of the labelled cases put in ``"validation"`` (at least one case
            when the fraction is > 0 and there are two or more cases).
        seed: seed of the split; the split depends only on the sorted case ids and the seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` (``"test"`` only when ``imagesTs``
        exists). Items: ``image`` (path, or list of channel paths), ``instance_mask`` (path), ``box``
        (world ``cccwhd`` mm, list of 6-lists), ``label`` (0-based ints); test items hold ``image``.
        Paths are relative to the folder of ``output_path`` (of ``raw_dir`` when output_path is None),
        which is the ``dataset_dir`` to use with `meddet.data.load_datalist`.

    Raises:
        FileNotFoundError: no imagesTr folder or no dataset description.
        ValueError: listing every problem found (missing channel files, masks or labels json,
            instances without class, classes not in the dataset labels, mask/image geometry mismatch).
    """
    raw_dir = Path(raw_dir)
    data_dir, description_path = _find_layout(raw_dir)
    description = _read_description(description_path)
    class_ids = {int(k) for k in description["labels"]}
    modalities = description.get("modalities", description.get("modality"))
    train_files = _channel_files(data_dir / "imagesTr")
    if modalities:
        num_channels = len(modalities)
    else:
        num_channels = max((max(ch) + 1 for ch in train_files.values()), default=1)

    problems: list[str] = []
    labels_dir = data_dir / "labelsTr"
    if labels_dir.is_dir():
        for path in sorted(labels_dir.glob("*.nii*")):
            case = path.name.split(".nii")[0]
            if case not in train_files:
                problems.append(f"{path}: labels without image files {data_dir / 'imagesTr' / (case + '_0000.nii.gz')}")

    base = Path(output_path).parent if output_path is not None else raw_dir
    labelled = {}
    for case, channels in train_files.items():
        image = _image_entry(case, channels, num_channels, data_dir / "imagesTr", problems)
        if image is None:
            continue
        annotation = _case_annotation(case, image if isinstance(image, Path) else image[0], labels_dir,
                                      class_ids, problems)
        if annotation is None:
            continue
        world_boxes, labels, mask_path = annotation
        labelled[case] = {
            "image": _relative(image, base),
            "instance_mask": _relative(mask_path, base),
            "box": [[round(float(v), 6) for v in box] for box in world_boxes],
            "label": [int(v) for v in labels],
        }
    test = []
    for case, channels in _channel_files(data_dir / "imagesTs").items():
        image = _image_entry(case, channels, num_channels, data_dir / "imagesTs", problems)
        if image is not None:
            test.append({"image": _relative(image, base)})
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"nnDetection raw dataset {raw_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))
    if not labelled:
        raise ValueError(f"nnDetection raw dataset {raw_dir}: no cases found in {data_dir / 'imagesTr'}")

    cases = sorted(labelled)
    num_validation = int(round(validation_fraction * len(cases)))
    if validation_fraction > 0 and len(cases) >= 2:
        num_validation = min(max(num_validation, 1), len(cases) - 1)
    order = np.random.default_rng(seed).permutation(len(cases))
    validation_cases = {cases[i] for i in order[:num_validation]}
    datalist = {
        "training": [labelled[c] for c in cases if c not in validation_cases],
        "validation": [labelled[c] for c in cases if c in validation_cases],
    }
    if test:
        datalist["test"] = test
    if output_path is not None:
        write_datalist(datalist, output_path)
    return datalist
