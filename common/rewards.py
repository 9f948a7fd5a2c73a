"""Reward functions -> one reward per rollout, as TRL's GRPOTrainer combines them.

A reward function scores a group: fn(group: list[Rollout], example) -> one {term: value} per
rollout, the total under "reward" (the other terms are logged as `rewards/<term>`). Several
functions are summed with `reward_weights` (TRL's name): reward = sum_i w_i * r_i.

A function may leave a rollout unscored: None instead of its dict, or {"reward": None, ...}.
As in TRL's GRPOTrainer, that is NaN for that function and the sum is a nansum, so the other
functions decide the reward (and a rollout no function scored gets 0, with a warning, as TRL);
the term means are over the rollouts a function scored, and `rewards/<fn>/none_frac` (only in
steps with a None) is the fraction it left unscored.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from common.rollout import Rollout


def per_rollout(fn: Callable[[Rollout, dict], dict]) -> Callable:
    """Turn a per-rollout reward fn(rollout, example) -> {term: value} into a group reward fn."""
    return lambda group, example: [fn(r, example) for r in group]


def score_groups(reward_fn, rollouts, examples, G: int, weights: list[float] | None) -> list[dict]:
    """One {term: value} per rollout with the total under "reward". Several reward functions
    (a list) are combined as TRL does: reward = nansum_i w_i * r_i (`reward_weights`, default 1),
    a None reward being NaN. Where some function returned None, every row gets its
    `<fn>/none_frac` term (1.0 on the rollouts it left unscored, else 0.0)."""
    fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    w = weights if weights is not None else [1.0] * len(fns)
    if len(w) != len(fns):
        raise ValueError(f"{len(w)} reward_weights for {len(fns)} reward functions.")
    # the term prefix of each function: none with one function, <name>_<j>/ with several
    prefix = [""] if len(fns) == 1 else [f"{getattr(fn, '__name__', 'r')}_{j}/"
                                         for j, fn in enumerate(fns)]
    outs = []                                     # per rollout: one dict or None per function
    for g, ex in enumerate(examples):
        group = rollouts[g * G: (g + 1) * G]
        per_fn = [fn(group, ex) for fn in fns]
        outs += [[out[i] for out in per_fn] for i in range(len(group))]
    unscored = [[o is None or o.get("reward") is None for o in row] for row in outs]
    has_none = [any(u[j] for u in unscored) for j in range(len(fns))]
    terms = []
    for row, none in zip(outs, unscored):
        t = {f"{p}{k}": v for p, o in zip(prefix, row) if o is not None for k, v in o.items()}
        t["reward"] = sum(float(wj * o["reward"]) for wj, o, n in zip(w, row, none) if not n)
        t.update({f"{p}none_frac": float(n) for p, n, h in zip(prefix, none, has_none) if h})
        terms.append(t)
    if n_all := sum(all(n) for n in unscored):
        warnings.warn(f"every reward function returned None for {n_all} rollout(s) of this batch; "
                      f"their reward is 0 (TRL's nansum); make at least one function score "
                      f"every rollout.")
    return terms


def reward_stats(terms: list[dict]) -> dict:
    """rewards/<term> mean and rewards/<term>/std over the rollouts that report it (a fraction
    `none_frac`: its mean only)."""
    out = {}
    for k in dict.fromkeys(k for t in terms for k in t):
        if k == "reward":
            continue
        v = [float(t[k]) for t in terms if k in t and t[k] is not None]
        if k.endswith("none_frac"):
            out[f"rewards/{k}"] = float(np.mean(v))
            continue
        out[f"rewards/{k}"] = float(np.mean(v)) if v else None
        out[f"rewards/{k}/std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return out
