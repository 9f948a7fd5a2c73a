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
    lo, hi = _wilson_limits(successes, n, z)
    # clamped: rounding leaves -0.0 (or a hair past 1) where the bound is exactly 0 (or 1)
    return [max(0.0, round(lo, 4)), min(1.0, round(hi, 4))]


def _wilson_limits(successes: float, n: int, z: float) -> tuple[float, float]:
    p, d = successes / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def newcombe_paired(a: list, b: list, z: float = 1.96) -> tuple[float, list[float]] | None:
    """The difference p_a - p_b of two success rates measured on the same items (a[i], b[i] in
    {0, 1}: item i under condition a and b) and its 95 % interval by Newcombe's square-and-add
    method for paired data (method 10 of R. G. Newcombe, Stat. Med. 17:2635-2650, 1998; as
    contingencytables' Newcombe_square_and_add_CI_paired_2x2): each rate's Wilson interval,
    combined with psi, the correlation of the two rates (0 when the cross-product is in
    [0, N / 2] or a margin is empty). Unrounded; None for no items."""
    if len(a) != len(b):
        raise ValueError(f"paired flags need equal lengths, got {len(a)} and {len(b)}")
    if any(x not in (0, 1) for x in (*a, *b)):
        raise ValueError("paired flags must be 0 or 1 (a score in between has no 2x2 table)")
    n = len(a)
    if n == 0:
        return None
    both = sum(x and y for x, y in zip(a, b))
    only_a, only_b = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = _wilson_limits(both + only_a, n, z), _wilson_limits(both + only_b, n, z)
    margins = [both + only_a, only_b + neither, both + only_b, only_a + neither]
    cross = both * neither - only_a * only_b
    psi = 0.0
    if all(margins) and not 0 <= cross <= n / 2:
        psi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(math.prod(margins))
    lo = p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * psi * (p1 - l1) * (u2 - p2))
    hi = p1 - p2 + math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * psi * (p2 - l2) * (u1 - p1))
    return p1 - p2, [lo, hi]


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


def two_way_bootstrap(matrix, groups: dict, stat, n: int = 1000, seed: int = 0):
    """Percentile 95 % interval of stat(matrix, groups) for a (rows x columns) tensor whose
    columns fall in groups ({name: column-index tensor}), resampling rows and, within each group,
    columns, both with replacement (e.g. questions x sentences: both sets are samples).
    -> (point, lo, hi), tensors shaped like stat's value."""
    import torch
    point = stat(matrix, groups)
    g = torch.Generator().manual_seed(seed)
    boots = torch.stack([
        stat(matrix[torch.randint(len(matrix), (len(matrix),), generator=g)],
             {k: c[torch.randint(len(c), (len(c),), generator=g)] for k, c in groups.items()})
        for _ in range(max(n, 1))])
    return point, boots.quantile(0.025, 0), boots.quantile(0.975, 0)
