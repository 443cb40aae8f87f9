"""Bootstrap confidence intervals of a mean (percentile method), e.g. of paired metric differences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_mean_ci(values: Sequence[float], confidence: float = 0.95, samples: int = 10000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval of the mean (`samples`
    resamples with replacement, seeded). One value gives a zero-width interval; none gives NaNs."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(int(samples), data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(data.mean()), float(low), float(high)
