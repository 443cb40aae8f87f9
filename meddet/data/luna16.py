"""LUNA16 in and out: the challenge's files (MetaImage scans in ``subset0..subset9``, ``annotations.csv``,
``annotations_excluded.csv``, ``seriesuids.csv``, submission CSVs) <-> MONAI detection datalists and
``predictions.json``.

Frames: the CSVs hold LPS world millimetres (ITK's frame, the scans' MetaImage ``Offset``); datalists and
``predictions.json`` hold RAS world millimetres (the frame MONAI's readers give every format, see
`meddet.data.datalist`). The two differ by the sign of x and y, so a nodule centre (x, y, z) in a CSV is
the datalist box centre (-x, -y, z), and back. A nodule becomes the cube of its diameter; an excluded
finding becomes an ignore region, the cube of its diameter (10 mm when the file gives -1, as the official
evaluation does).

Every reader collects all problems of a file (at most 20 shown) and names the file and line; writers
write to a temporary file and rename it, so an error never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from meddet.data.boxes import flip_lps_ras
from meddet.data.datalist import write_datalist
from meddet.data.image_io import image_stem, metaimage_data_problem

__all__ = [
    "EXCLUDED_DEFAULT_DIAMETER_MM",
    "Luna16Error",
    "build_fold_datalists",
    "excluded_diameters",
    "find_scans",
    "predictions_to_submission",
    "read_annotations",
    "read_seriesuids",
    "read_submission",
]

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
NUM_SUBSETS = 10
_MAX_REPORTED = 20


class Luna16Error(ValueError):
    """LUNA16 input that cannot be used; the message names the file and every problem found."""


def _raise_problems(path, problems: list[str]) -> None:
    if problems:
        shown = problems[:_MAX_REPORTED]
        if len(problems) > _MAX_REPORTED:
            shown.append(f"... and {len(problems) - _MAX_REPORTED} more")
        raise Luna16Error(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))


def _read_rows(path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV with a header holding at least `columns`."""
    path = Path(path)
    if not path.is_file():
        raise Luna16Error(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise Luna16Error(f"{path}: header {reader.fieldnames} lacks the column(s) {missing}; "
                              f"expected {','.join(columns)}")
        return [(reader.line_num, row) for row in reader]


def _read_table(path, columns: Sequence[str], value_rule, known_uids: Iterable[str] | None = None
                ) -> dict[str, np.ndarray]:
    """seriesuid -> float array (k, 4) of the numeric columns, every row checked."""
    known = set(known_uids) if known_uids is not None else None
    table: dict[str, list] = {}
    problems = []
    for line, row in _read_rows(path, columns):
        uid = (row.get(columns[0]) or "").strip()
        values, row_problems = [], []
        if not uid:
            row_problems.append("empty seriesuid")
        elif known is not None and uid not in known:
            row_problems.append(f"unknown seriesuid {uid} (not among the {len(known)} known scans)")
        for column in columns[1:]:
            text = (row.get(column) or "").strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
                row_problems.append(f"{column} = {text!r} is not a number")
            else:
                if not math.isfinite(value):
                    row_problems.append(f"{column} = {text!r} is not a finite number")
            values.append(value)
        if not row_problems:
            rule_problem = value_rule(values)
            if rule_problem:
                row_problems.append(rule_problem)
        problems += [f"line {line}: {p}" for p in row_problems]
        if not row_problems:
            table.setdefault(uid, []).append(values)
    _raise_problems(path, problems)
    return {uid: np.asarray(rows, dtype=np.float64).reshape(-1, 4) for uid, rows in table.items()}


def read_annotations(path, known_uids: Iterable[str] | None = None, excluded: bool = False) -> dict[str, np.ndarray]:
    """``annotations.csv`` (or, with `excluded`, ``annotations_excluded.csv``) -> seriesuid -> (k, 4) array of
    LPS centre x, y, z and diameter (mm). Nodule diameters must be positive; an excluded finding's may be
    negative (unknown: the official evaluation takes 10 mm, so does `excluded_diameters`). With `known_uids`,
    a row of another scan is an error."""
    def rule(values):
        if not excluded and values[3] <= 0:
            return f"diameter_mm = {values[3]:g} is not positive"
        return None

    return _read_table(path, ANNOTATION_COLUMNS, rule, known_uids)


def excluded_diameters(diameters) -> np.ndarray:
    """Diameters of excluded findings as the official evaluation reads them: negative means 10 mm."""
    diameters = np.asarray(diameters, dtype=np.float64)
    return np.where(diameters < 0, EXCLUDED_DEFAULT_DIAMETER_MM, diameters)


def read_submission(path, known_uids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """A submission CSV -> seriesuid -> (k, 4) array of LPS centre x, y, z and probability."""
    return _read_table(path, SUBMISSION_COLUMNS, lambda values: None, known_uids)


def read_seriesuids(path) -> list[str]:
    """The evaluated scans: one seriesuid per line (``seriesuids.csv``; a ``seriesuid`` header is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise Luna16Error(f"{path}: file not found")
    uids, problems = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells or (line == 1 and cells[0] == "seriesuid"):
                continue
            if len(cells) != 1 or not re.fullmatch(r"[0-9.]+", cells[0]):
                problems.append(f"line {line}: expected one seriesuid (digits and dots), got {row}")
            else:
                uids.append(cells[0])
    _raise_problems(path, problems)
    if len(set(uids)) != len(uids):
        duplicated = sorted({u for u in uids if uids.count(u) > 1})
        raise Luna16Error(f"{path}: seriesuid(s) listed twice: {duplicated[:5]}")
    return uids


def find_scans(luna_dir) -> dict[str, tuple[int, str]]:
    """seriesuid -> (subset index, path relative to `luna_dir`) of every ``subset<k>/**/<seriesuid>.mhd``,
    each header checked (data file present, size as the header says)."""
    luna_dir = Path(luna_dir)
    if not luna_dir.is_dir():
        raise Luna16Error(f"{luna_dir}: LUNA16 folder not found")
    scans: dict[str, tuple[int, str]] = {}
    problems = []
    for subset in range(NUM_SUBSETS):
        folder = luna_dir / f"subset{subset}"
        if not folder.is_dir():
            continue
        for header in sorted(folder.rglob("*.mhd")):
            uid = header.name[: -len(".mhd")]
            relative = header.relative_to(luna_dir).as_posix()
            problem = metaimage_data_problem(header)
            if problem:
                problems.append(f"{header}: {problem}")
            elif uid in scans:
                problems.append(f"{header}: seriesuid {uid} also in {scans[uid][1]}")
            else:
                scans[uid] = (subset, relative)
    _raise_problems(luna_dir, problems)
    if not scans:
        raise Luna16Error(f"{luna_dir}: no subset<k>/*.mhd scans found (expected subset0 ... subset9 folders)")
    return scans


def _cube(centre_lps, diameter: float) -> list[float]:
    x, y, z = flip_lps_ras(centre_lps, width=3)[0]
    return [float(x), float(y), float(z), float(diameter), float(diameter), float(diameter)]


def _item(uid: str, image: str, nodules: np.ndarray, excluded: np.ndarray) -> dict:
    item = {"image": image, "seriesuid": uid,
            "box": [_cube(row[:3], row[3]) for row in nodules],
            "label": [0] * len(nodules),
            "diameter_mm": [float(row[3]) for row in nodules]}
    if len(excluded):
        item["ignore_box"] = [_cube(row[:3], d) for row, d in zip(excluded, excluded_diameters(excluded[:, 3]))]
    return item


def _write_atomic(path: Path, write) -> str:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return str(path)


def build_fold_datalists(luna_dir, output_dir, annotations=None, excluded=None, seriesuids=None) -> dict:
    """One MONAI detection datalist per official fold present: ``luna16_fold{k}.json`` (validation = subset k,
    training = the other subsets present), ``luna16_fold{k}_seriesuids.csv`` (the validation scans, for the
    CPM evaluation) and ``luna16_overrides.json`` (the bundle overrides this data needs).

    Args:
        luna_dir: the LUNA16 folder (``subset0`` ... ``subset9``; image paths are written relative to it, so
            run the bundles with ``--dataset_dir luna_dir``).
        output_dir: where the files go.
        annotations, excluded, seriesuids: the CSVs; default ``luna_dir/annotations.csv``,
            ``luna_dir/annotations_excluded.csv`` (optional) and ``luna_dir/seriesuids.csv`` (optional). With
            a seriesuids file, annotation rows of scans it lists but which are not downloaded are skipped
            (only some subsets present) and rows of any other scan are errors; without it every annotation
            row must name a scan found in the subsets.

    Returns:
        dict with ``datalists`` (fold -> path), ``overrides`` (path), and counts ``scans``, ``nodules``,
        ``excluded``, ``negative_scans``.
    """
    luna_dir, output_dir = Path(luna_dir), Path(output_dir)
    scans = find_scans(luna_dir)
    seriesuids_path = Path(seriesuids) if seriesuids else luna_dir / "seriesuids.csv"
    known = set(read_seriesuids(seriesuids_path)) | set(scans) if seriesuids_path.is_file() else set(scans)
    nodules = read_annotations(Path(annotations) if annotations else luna_dir / "annotations.csv", known)
    excluded_path = Path(excluded) if excluded else luna_dir / "annotations_excluded.csv"
    ignored = read_annotations(excluded_path, known, excluded=True) if excluded_path.is_file() else {}

    empty = np.zeros((0, 4))
    items_by_subset: dict[int, list[dict]] = {}
    for uid, (subset, image) in sorted(scans.items()):
        items_by_subset.setdefault(subset, []).append(_item(uid, image, nodules.get(uid, empty),
                                                            ignored.get(uid, empty)))
    output_dir.mkdir(parents=True, exist_ok=True)
    datalists = {}
    for fold in sorted(items_by_subset):
        training = [item for subset, items in sorted(items_by_subset.items()) if subset != fold for item in items]
        content = {"training": training, "validation": items_by_subset[fold]}
        path = output_dir / f"luna16_fold{fold}.json"
        datalists[fold] = _write_atomic(path, lambda tmp, content=content: write_datalist(content, tmp))
        uids = "".join(f"{item['seriesuid']}\n" for item in items_by_subset[fold])
        _write_atomic(output_dir / f"luna16_fold{fold}_seriesuids.csv",
                      lambda tmp, uids=uids: tmp.write_text("seriesuid\n" + uids))
    # the datalist boxes are already in the RAS frame the bundles read; only the class name differs
    overrides = _write_atomic(output_dir / "luna16_overrides.json",
                              lambda tmp: tmp.write_text(json.dumps({"class_names": ["nodule"]}, indent=2) + "\n"))
    items = [item for group in items_by_subset.values() for item in group]
    return {
        "datalists": datalists,
        "overrides": overrides,
        "scans": len(items),
        "nodules": sum(len(item["box"]) for item in items),
        "excluded": sum(len(item.get("ignore_box", [])) for item in items),
        "negative_scans": sum(1 for item in items if not item["box"]),
    }


def _seriesuid_of(entry: dict, where: str) -> str:
    if entry.get("seriesuid"):
        return str(entry["seriesuid"])
    image = entry.get("image")
    image = image[0] if isinstance(image, (list, tuple)) and image else image
    if not isinstance(image, str) or not image:
        raise Luna16Error(f"{where}: no 'seriesuid' and no image path to take it from")
    return image_stem(image)


def predictions_to_submission(predictions_json, output_csv, max_candidates: int = 100) -> dict:
    """A bundle's ``predictions.json`` (RAS world ``cccwhd`` boxes) -> a LUNA16 submission CSV (LPS world box
    centres, ``probability`` = the detection score), at most `max_candidates` per scan (the highest scores).
    The seriesuid is the entry's ``seriesuid`` or else the image file name without its extension.

    Returns:
        dict with ``scans`` and ``candidates`` written.
    """
    predictions_json, output_csv = Path(predictions_json), Path(output_csv)
    if not predictions_json.is_file():
        raise Luna16Error(f"{predictions_json}: file not found")
    try:
        entries = json.loads(predictions_json.read_text())
    except ValueError as error:
        raise Luna16Error(f"{predictions_json}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise Luna16Error(f"{predictions_json}: expected a list of per-image prediction entries")
    rows, seen, problems = [], {}, []
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a dict, got {type(entry).__name__}")
            continue
        uid = _seriesuid_of(entry, f"{predictions_json}: {where}")
        if uid in seen:
            problems.append(f"{where}: seriesuid {uid} already given by entry {seen[uid]}")
            continue
        seen[uid] = index
        boxes = np.asarray(entry.get("box") or [], dtype=np.float64).reshape(-1, 6)
        scores = np.asarray(entry.get("label_scores", []), dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            problems.append(f"{where}: {len(boxes)} boxes but {len(scores)} label_scores")
            continue
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            problems.append(f"{where}: non-finite box or score values")
            continue
        order = np.argsort(-scores, kind="mergesort")[:max_candidates]
        centres = flip_lps_ras(boxes[order, :3], width=3)
        rows += [(uid, *centre, score) for centre, score in zip(centres, scores[order])]
    _raise_problems(predictions_json, problems)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(SUBMISSION_COLUMNS)
            writer.writerows([uid, repr(float(x)), repr(float(y)), repr(float(z)), repr(float(p))]
                             for uid, x, y, z, p in rows)

    output_csv.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(output_csv, write)
    return {"scans": len(seen), "candidates": len(rows)}
