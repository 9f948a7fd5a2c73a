"""Reward functions -> one reward per rollout, as TRL's GRPOTrainer combines them.

A reward function scores a group: fn(group: list[Rollout], example) -> one {term: value} per
rollout, the total under "reward" (the other terms are logged as `rewards/<term>`). Several
functions are summed with `reward_weights` (TRL's name): reward = sum_i w_i * r_i.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from common.rollout import Rollout


def per_rollout(fn: Callable[[Rollout, dict], dict]) -> Callable:
    """Turn a per-rollout reward fn(rollout, example) -> {term: value} into a group reward fn."""
    return lambda group, example: [fn(r, example) for r in group]


def score_groups(reward_fn, rollouts, examples, G: int, weights: list[float] | None) -> list[dict]:
    """One {term: value} per rollout with the total under "reward". Several reward functions
    (a list) are combined as TRL does: reward = sum_i w_i * r_i (`reward_weights`, default 1)."""
    fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    w = weights if weights is not None else [1.0] * len(fns)
    if len(w) != len(fns):
        raise ValueError(f"{len(w)} reward_weights for {len(fns)} reward functions.")
    terms = []
    for g, ex in enumerate(examples):
        group = rollouts[g * G: (g + 1) * G]
        per_fn = [fn(group, ex) for fn in fns]
        for i in range(len(group)):
            if len(fns) == 1:
                terms.append(per_fn[0][i])
                continue
            row = {f"{getattr(fn, '__name__', 'r')}_{j}/{k}": v for j,
                   (fn, out) in enumerate(zip(fns, per_fn))
                   for k, v in out[i].items()}
            row["reward"] = sum(wj * out[i]["reward"] for wj, out in zip(w, per_fn))
            terms.append(row)
    return terms


def reward_stats(terms: list[dict]) -> dict:
    """rewards/<term> mean and rewards/<term>/std over the rollouts that report it."""
    out = {}
    for k in dict.fromkeys(k for t in terms for k in t):
        if k == "reward":
            continue
        v = [float(t[k]) for t in terms if k in t and t[k] is not None]
        out[f"rewards/{k}"] = float(np.mean(v)) if v else None
        out[f"rewards/{k}/std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return out
