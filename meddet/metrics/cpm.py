"""LUNA16 CPM: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, by the
challenge's official rules (`meddet.metrics.froc`, criterion ``"center_distance"``: hits inside the nodule's
radius, each nodule found at its best candidate, candidates on excluded findings ignored, at most 100
candidates per scan, the script's curve arithmetic), with a bootstrap interval over scans.

Two entry points: `evaluate_submission` scores the challenge's own files (annotations, excluded findings,
a submission CSV; LPS millimetres), `cpm_from_detections` scores ``predictions.json`` against a datalist
that carries ``diameter_mm`` (RAS millimetres; distances do not depend on the frame).

The interval: scans are resampled with replacement (as the official script's bootstrap), the CPM is
recomputed on each resample, and the percentile interval of those CPMs is reported (the script reports
per-rate intervals only; they are given here too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meddet.data.luna16 import (
    Luna16Error,
    excluded_diameters,
    read_annotations,
    read_seriesuids,
    read_submission,
)
from meddet.metrics.froc import FROC_FP_RATES, froc_curve, match_spheres
from meddet.metrics.froc_plot import save_froc_png

__all__ = ["cpm_from_detections", "cpm_from_scans", "evaluate_submission"]


def _sensitivities(scans: Sequence[tuple], fp_rates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found = np.concatenate([np.zeros(0)] + [s[0] for s in scans])
    false = np.concatenate([np.zeros(0)] + [s[1] for s in scans])
    fps, sensitivity = froc_curve(found, false, int(sum(s[2] for s in scans)), len(scans))
    return np.interp(fp_rates, fps, sensitivity), fps, sensitivity


def cpm_from_scans(scans: Sequence[tuple], fp_rates: Sequence[float] = FROC_FP_RATES, bootstrap_samples: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> dict:
    """CPM of per-scan match results.

    Args:
        scans: per evaluated scan, (found scores of its found ground truths, false-positive scores, number of
            ground truths), as `meddet.metrics.froc.match_spheres` gives them (NaN entries are dropped).
        fp_rates: the rates the sensitivity is read at.
        bootstrap_samples: resamples of the scans for the intervals (0: none).

    Returns:
        dict with ``fp_rates``, ``sensitivities``, ``cpm``, ``cpm_ci`` [low, high], ``sensitivities_ci``
        (one [low, high] per rate), ``curve_fps_per_scan``, ``curve_sensitivity``, ``num_scans``,
        ``num_nodules``, ``num_found``, ``num_fp``, ``bootstrap_samples``, ``confidence``.
    """
    scans = [(np.asarray(f, dtype=np.float64)[np.isfinite(f)], np.asarray(p, dtype=np.float64), int(n))
             for f, p, n in scans]
    rates = np.asarray(fp_rates, dtype=np.float64)
    sensitivities, fps, curve = _sensitivities(scans, rates)
    result = {
        "fp_rates": rates.tolist(),
        "sensitivities": sensitivities.tolist(),
        "cpm": float(np.mean(sensitivities)),
        "curve_fps_per_scan": fps.tolist(),
        "curve_sensitivity": curve.tolist(),
        "num_scans": len(scans),
        "num_nodules": int(sum(s[2] for s in scans)),
        "num_found": int(sum(len(s[0]) for s in scans)),
        "num_fp": int(sum(len(s[1]) for s in scans)),
        "bootstrap_samples": int(bootstrap_samples),
        "confidence": float(confidence),
    }
    if bootstrap_samples > 0 and scans:
        rng = np.random.default_rng(seed)
        draws = np.stack([_sensitivities([scans[i] for i in rng.integers(0, len(scans), len(scans))], rates)[0]
                          for _ in range(int(bootstrap_samples))])
        tail = (1.0 - confidence) / 2 * 100
        result["cpm_ci"] = np.percentile(draws.mean(axis=1), [tail, 100 - tail]).tolist()
        result["sensitivities_ci"] = np.percentile(draws, [tail, 100 - tail], axis=0).T.tolist()
    else:
        result["cpm_ci"] = [result["cpm"], result["cpm"]]
        result["sensitivities_ci"] = [[s, s] for s in result["sensitivities"]]
    return result


def _arrays(value, width: int) -> np.ndarray:
    return np.asarray(value if value is not None and len(value) else np.zeros((0, width)),
                      dtype=np.float64).reshape(-1, width)


def cpm_from_detections(predictions: Sequence[dict], ground_truths: Sequence[dict], **kwargs) -> dict:
    """CPM of per-scan detections (``"box"`` world `cccwhd`, ``"label_scores"``) against ground truths with
    ``"box"`` (`cccwhd`: the centre counts), ``"diameter_mm"`` (one per box) and optional ``"ignore_box"``
    (`cccwhd`, radius half the mean size). All classes are pooled, as LUNA16 has one. `kwargs` go to
    `cpm_from_scans`."""
    if len(predictions) != len(ground_truths):
        raise ValueError(f"predictions and ground truths must be aligned per scan: "
                         f"{len(predictions)} vs {len(ground_truths)}")
    scans = []
    for index, (prediction, truth) in enumerate(zip(predictions, ground_truths)):
        boxes = _arrays(truth.get("box"), 6)
        diameters = np.asarray(truth.get("diameter_mm", []), dtype=np.float64).reshape(-1)
        if len(diameters) != len(boxes):
            raise ValueError(f"ground truth {index}: {len(boxes)} boxes but {len(diameters)} diameter_mm values")
        ignore = _arrays(truth.get("ignore_box"), 6)
        detections = _arrays(prediction.get("box"), 6)
        found, false = match_spheres(detections[:, :3], prediction.get("label_scores", []), boxes[:, :3],
                                     diameters / 2, ignore[:, :3], ignore[:, 3:].mean(axis=1) / 2)
        scans.append((found, false, len(boxes)))
    return cpm_from_scans(scans, **kwargs)


def evaluate_submission(annotations, submission, excluded=None, seriesuids=None, output_dir=None,
                        bootstrap_samples: int = 1000) -> dict:
    """Score a LUNA16 submission CSV by the official rules (module docstring).

    Args:
        annotations: ``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm).
        submission: the submission CSV (seriesuid, coordX, coordY, coordZ, probability).
        excluded: ``annotations_excluded.csv`` or None (no ignore regions).
        seriesuids: the evaluated scans (one seriesuid per line). Default: every scan of the annotations and
            the submission, which leaves out scans with neither a nodule nor a candidate: give the list
            for an official false-positive rate. Annotations of scans outside it are not evaluated; a
            submission row of a scan outside it is an error.
        output_dir: where ``luna16_cpm.json`` and ``luna16_froc.png`` go (default: next to the submission).

    Returns:
        the dict of `cpm_from_scans`, plus ``seriesuids_given`` and the input file names.
    """
    nodules = read_annotations(annotations)
    ignored = read_annotations(excluded, excluded=True) if excluded is not None else {}
    if seriesuids is not None:
        evaluated = read_seriesuids(seriesuids)
        candidates = read_submission(submission, known_uids=evaluated)
    else:
        candidates = read_submission(submission)
        evaluated = sorted(set(nodules) | set(candidates))
    if not evaluated:
        raise Luna16Error(f"{submission}: no scans to evaluate (empty annotations, submission and seriesuids)")

    empty = np.zeros((0, 4))
    scans = []
    for uid in evaluated:
        found_rows, ignore_rows, candidate_rows = (table.get(uid, empty) for table in (nodules, ignored, candidates))
        found, false = match_spheres(candidate_rows[:, :3], candidate_rows[:, 3], found_rows[:, :3],
                                     found_rows[:, 3] / 2, ignore_rows[:, :3],
                                     excluded_diameters(ignore_rows[:, 3]) / 2)
        scans.append((found, false, len(found_rows)))
    result = cpm_from_scans(scans, bootstrap_samples=bootstrap_samples)
    result.update(seriesuids_given=seriesuids is not None, annotations=str(annotations), submission=str(submission),
                  excluded=None if excluded is None else str(excluded))

    output_dir = Path(output_dir) if output_dir is not None else Path(submission).parent
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "luna16_cpm.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    low, high = result["cpm_ci"]
    save_froc_png(output_dir / "luna16_froc.png", result["curve_fps_per_scan"], result["curve_sensitivity"],
                  result["fp_rates"], result["sensitivities"],
                  f"LUNA16 FROC: CPM {result['cpm']:.3f} ({low:.3f}-{high:.3f}), {result['num_scans']} scans, "
                  f"{result['num_nodules']} nodules", intervals=result["sensitivities_ci"])
    return result
