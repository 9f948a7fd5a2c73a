"""Generic statistics for reported numbers: intervals of rates. Plumbing, no paper knowledge."""
from __future__ import annotations

import math


def wilson(successes: float, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval [lo, hi] of a rate successes / n (rounded to 4 places; z = 1.96: 95 %).
    Scores in [0, 1] may be summed as fractional successes. None when n = 0 (no rate to bound).
    E. B. Wilson, "Probable inference...", JASA 22 (1927); unlike the normal interval it stays in
    [0, 1] and is not empty at p = 0 or 1."""
    if n == 0:
        return None
    p, d = successes / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(centre - half, 4), round(centre + half, 4)]
