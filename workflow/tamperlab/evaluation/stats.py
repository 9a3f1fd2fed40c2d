"""Binomial intervals: every rate an evaluation reports carries one, and `compare` judges cells by them."""

from __future__ import annotations

import math
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959964…


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share p of n trials (95% for the default z)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson95(successes: int, n: int) -> tuple[float, float] | tuple[None, None]:
    """The Wilson 95% interval of `successes` of `n`, rounded like the rates ((None, None) for n = 0): every rate
    of an evaluation carries it (refusal.json's `wilson95`, refusal.csv's <rate>_lo and <rate>_hi)."""
    if not n:
        return None, None
    low, high = wilson_interval(successes / n, n)
    return round(low, 4), round(high, 4)
