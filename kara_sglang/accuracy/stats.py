"""The Wilson score interval: a binomial proportion's confidence interval that stays inside
[0, 1] and behaves at 0% and 100% and at the small n of AIME (30 problems)."""

from __future__ import annotations

import math
from typing import Tuple

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """(low, high) for ``successes`` out of ``n``; (0, 1) when there is nothing to go on."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes one end is exactly 0 or 1; rounding would leave 0.99999...
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high
