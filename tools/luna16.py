"""LUNA16 from the download to an official-style CPM.

    python tools/luna16.py datalist --luna_dir D --output_dir O
        # O/luna16_fold{k}.json (validation = subset k), O/luna16_fold{k}_seriesuids.csv, O/luna16_overrides.json
    python tools/luna16.py submission --predictions P --output C
        # a bundle's predictions.json -> the LUNA16 submission CSV (LPS mm, <= 100 candidates per scan)
    python tools/luna16.py evaluate --annotations A --excluded E --submission C [--seriesuids F]
        # the official CPM rules; prints the seven sensitivities, then CPM=<value> as the last line

Frames, file formats and rules: `meddet.data.luna16` and `meddet.metrics.cpm`.
"""

from __future__ import annotations

import fire

from meddet.data.luna16 import build_fold_datalists, predictions_to_submission
from meddet.metrics.cpm import evaluate_submission


def datalist(luna_dir: str, output_dir: str, annotations: str | None = None, excluded: str | None = None,
             seriesuids: str | None = None) -> None:
    """Write one datalist per official fold present (image paths relative to `luna_dir`)."""
    summary = build_fold_datalists(luna_dir, output_dir, annotations, excluded, seriesuids)
    for fold, path in summary["datalists"].items():
        print(f"fold {fold}: {path}")
    print(f"{summary['scans']} scans ({summary['negative_scans']} without nodules), {summary['nodules']} nodules, "
          f"{summary['excluded']} excluded findings as ignore regions; overrides: {summary['overrides']}")


def submission(predictions: str, output: str, max_candidates: int = 100) -> None:
    """Convert a bundle's predictions.json to a LUNA16 submission CSV."""
    summary = predictions_to_submission(predictions, output, max_candidates)
    print(f"wrote {output}: {summary['candidates']} candidates for {summary['scans']} scans")


def evaluate(annotations: str, submission: str, excluded: str | None = None, seriesuids: str | None = None,
             output_dir: str | None = None, bootstrap_samples: int = 1000) -> None:
    """Score a submission by the official CPM rules; the last printed line is CPM=<value>."""
    result = evaluate_submission(annotations, submission, excluded, seriesuids, output_dir, bootstrap_samples)
    if not result["seriesuids_given"]:
        print("note: no --seriesuids: scans with neither a nodule nor a candidate are not counted")
    print(f"{result['num_scans']} scans, {result['num_nodules']} nodules, {result['num_found']} found, "
          f"{result['num_fp']} false positives")
    for rate, value, (low, high) in zip(result["fp_rates"], result["sensitivities"], result["sensitivities_ci"]):
        print(f"sensitivity at {rate:g} FP/scan: {value:.4f} (95 % CI {low:.4f}-{high:.4f})")
    low, high = result["cpm_ci"]
    print(f"CPM 95 % CI: {low:.4f}-{high:.4f}")
    print(f"CPM={result['cpm']:.4f}")


if __name__ == "__main__":
    fire.Fire({"datalist": datalist, "submission": submission, "evaluate": evaluate})
