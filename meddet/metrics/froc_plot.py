"""The FROC figure shared by every report: the curve on a log2 axis, the operating points labelled with their
sensitivity, and, when given, their bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["save_froc_png"]


def save_froc_png(path, curve_fps: Sequence[float], curve_sensitivity: Sequence[float], fp_rates: Sequence[float],
                  sensitivities: Sequence[float], title: str, intervals: Sequence[Sequence[float]] | None = None) -> None:
    """Write the FROC curve to `path` (PNG). `intervals`: one (low, high) per rate, drawn as error bars."""
    # a bare Figure with the Agg canvas: no pyplot state, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rates = np.asarray(fp_rates, dtype=np.float64)
    values = np.asarray(sensitivities, dtype=np.float64)
    low, high = rates.min() / 2, rates.max() * 2
    xs = np.geomspace(low, high, 400)
    ys = np.interp(xs, curve_fps, curve_sensitivity)

    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(xs, ys, "-", color="tab:blue", label="FROC")
    if intervals is not None:
        bounds = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
        axes.errorbar(rates, values, yerr=[values - bounds[:, 0], bounds[:, 1] - values], fmt="none",
                      ecolor="tab:gray", capsize=3, label="95 % bootstrap interval")
    axes.plot(rates, values, "o", color="tab:red", label="operating points")
    for rate, value in zip(rates, values):
        axes.annotate(f"{value:.3f}", (rate, value), textcoords="offset points", xytext=(0, -14), ha="center",
                      fontsize=8, color="tab:red")
    axes.set_xscale("log", base=2)
    axes.set_xlim(low, high)
    axes.set_xticks(rates)
    axes.set_xticklabels([f"{r:g}" for r in rates])
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("false positives per scan")
    axes.set_ylabel("sensitivity")
    axes.grid(True, alpha=0.4)
    axes.legend(loc="lower right")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
