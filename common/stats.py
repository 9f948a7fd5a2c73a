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


def rate_bars(path: str, names: list[str], bars: dict[str, list], intervals: dict[str, list] | None = None,
              title: str = "") -> None:
    """Grouped bars of rates on a 0-1 axis: one group per name, one bar per entry of `bars` (None
    draws 0); a bar label that `intervals` maps to [lo, hi] per name gets those as error bars."""
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x, width = np.arange(len(names)), 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        v = [b or 0 for b in values]
        ci = (intervals or {}).get(label)
        err = None if ci is None else [[a - lo for a, (lo, _) in zip(v, ci)], [hi - a for a, (_, hi) in zip(v, ci)]]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, v, width, yerr=err, capsize=3, label=label)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
