"""Generic statistics for reported numbers: intervals of rates and of any metric (a grouped
bootstrap). Plumbing, no paper knowledge."""
from __future__ import annotations

import math
import random

import numpy as np


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
    # clamped: rounding leaves -0.0 (or a hair past 1) where the bound is exactly 0 (or 1)
    return [max(0.0, round(centre - half, 4)), min(1.0, round(centre + half, 4))]


def bootstrap_ci(groups: list, stat, keys, n: int = 200, seed: int = 0) -> dict:
    """95 % percentile bootstrap intervals {key_ci95: [lo, hi]}, resampling whole groups:
    `groups[i]` is item i's group (e.g. a seed, whose versions go together; one group per item
    resamples items);
    `stat([(draw j, item i)])` -> the metrics of one resample (a group drawn twice appears twice,
    under two draw numbers j). A key whose metric is always None gets no interval."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names, draws, rng = list(members), {}, random.Random(seed)
    for _ in range(n):
        idx = [(j, i) for j, g in enumerate(rng.choices(names, k=len(names))) for i in members[g]]
        m = stat(idx)
        for key in keys:
            if m.get(key) is not None:
                draws.setdefault(key, []).append(m[key])
    return {f"{k}_ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for k, v in draws.items()}


def rate_bars(path: str, names: list[str], bars: dict[str, list],
              intervals: dict[str, list] | None = None, title: str = "",
              xlabel: str = "") -> None:
    """Grouped bars of rates on a 0-1 axis: one group per name, one bar per entry of `bars` (None
    draws 0, written n/a); a bar label that `intervals` maps to [lo, hi] per name gets those as
    error bars. Each bar carries its value (a bar of 0 is otherwise invisible)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x, width = np.arange(len(names)), 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        v = [b or 0 for b in values]
        ci = (intervals or {}).get(label)
        err = None if ci is None else [[a - lo for a, (lo, _) in zip(v, ci)],
                                       [hi - a for a, (_, hi) in zip(v, ci)]]
        drawn = ax.bar(x + (i - (len(bars) - 1) / 2) * width, v, width, yerr=err, capsize=3,
                       label=label)
        ax.bar_label(drawn, labels=["n/a" if b is None else f"{b:.2f}" for b in values],
                     fontsize=7, padding=1)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1.05), title=title, ylabel="rate (0-1)",
           xlabel=xlabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
