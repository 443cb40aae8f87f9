"""tools/benchmark.py as an instrument: every section runs, pairs each figure with its baseline, writes the JSON."""

from __future__ import annotations

import json

import pytest

import bundle_helpers  # noqa: F401  (puts tools/ on the path)
from benchmark import run_benchmark


def test_loader_and_wbc_sections_write_their_figures(tmp_path):
    path = tmp_path / "figures.json"
    figures = run_benchmark(sections="wbc,loader", repeats=1, loader_volume=(80, 72, 48), loader_patch=(32, 32, 32),
                            json=str(path))
    assert json.loads(path.read_text()) == figures
    assert figures["threads"] == 1 and figures["loader_volume"] == [80, 72, 48]
    for key in ("loader_patches_per_s_per_worker", "loader_monai_crop_patches_per_s_per_worker",
                "loader_disk_cache_patches_per_s_per_worker", "wbc_10000_s",
                "monai_nms_10000_s"):
        assert figures[key] > 0, key
    assert figures["loader_speedup"] == pytest.approx(
        figures["loader_patches_per_s_per_worker"] / figures["loader_monai_crop_patches_per_s_per_worker"])


def test_zoo_section_runs_the_bundle_detector_beside_the_zoo_retinanet():
    figures = run_benchmark(sections="zoo", repeats=1, zoo_volume=(64, 64, 32))
    # the bundle's 128^3 window shrinks to the volume, at least two strides (64) deep
    assert figures["zoo_tile_size"] == [64, 64, 64] and figures["zoo_tiles"] == 1
    assert figures["inference_vs_zoo_ratio"] == pytest.approx(
        figures["ours_inference_s"] / figures["zoo_retinanet_inference_s"])


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit, match="unknown sections"):
        run_benchmark(sections="wbc,gpu")
