"""Data parallelism on PyTorch's own runtime: this module knows ranks, collectives and how to
split a list of items; nothing of models, losses or files.

    torchrun --nproc_per_node 4 gog.py --stage rl ...                  # 4 GPUs, one node (nccl)
    accelerate launch --num_processes 4 gog.py --stage rl ...          # the same launcher inside
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 gog.py --stage all --model tiny   # CPU (gloo)

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK; `init()` (called by common.cli.run_stages)
then joins the process group: nccl on CUDA (each process on cuda:LOCAL_RANK), gloo on a CPU.
Without WORLD_SIZE (a plain `python gog.py`) nothing here initialises anything and every helper
is the identity: one process behaves exactly as before this module existed.

The program stays SPMD (every rank runs the same code on the same data, except for the items
`shard` gives it): `gather_in_order` hands every rank the whole result, so every rank takes the
same branches and calls the same collectives in the same order. Files are written by rank 0
alone (common/runlog.py, common/checkpoint.py check `is_main()`); `barrier()` after a write that
another rank reads next.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes logs, plots, pages, checkpoints and adapters."""
    return rank() == 0


def active() -> bool:
    """A process group of more than one process is up."""
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join the process group the launcher describes (no-op for one process). Ranks other
    than 0 print nothing to stdout (their progress bars are off too): one console, rank 0's."""
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def close() -> None:
    if active():
        dist.destroy_process_group()


def device() -> torch.device | None:
    """This rank's GPU under a launcher (cuda:LOCAL_RANK), else None (the caller's default)."""
    if world_size() > 1 and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank()}")
    return None


def sampling_seed(seed: int) -> int:
    """The seed of this rank's sampler: seed + rank, so ranks draw different rollouts."""
    return seed + rank()


def describe(seed: int) -> dict:
    """What a run records about its processes (empty for one process)."""
    if world_size() == 1:
        return {}
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None,
            "sampling_seeds": [seed + r for r in range(world_size())]}


# ---------------------------------------------------------------------------------------------
# collectives (the identity for one process)
# ---------------------------------------------------------------------------------------------
def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if (
        active() and dist.get_backend() == "nccl") else torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max of a list of numbers over the ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def average_gradients(params: list[torch.Tensor]) -> None:
    """p.grad <- the mean of p.grad over the ranks, in one flat all_reduce (a parameter without
    a gradient on some rank counts as zeros there). What DDP does in its backward hooks, done by
    hand once per optimiser step: see common/grpo.py for why not DDP."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (pickled; keep it small)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# splitting work by whole items
# ---------------------------------------------------------------------------------------------
def shard_bounds(n: int, ranks: int | None = None, r: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous block of n items (sizes differ by at most one)."""
    ranks, r = world_size() if ranks is None else ranks, rank() if r is None else r
    return n * r // ranks, n * (r + 1) // ranks


def shard(items: list) -> list:
    """This rank's contiguous block of `items` (whole items: a prompt with its G rollouts is
    one item); all of them for one process."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def gather_in_order(results: list) -> list:
    """Concatenate each rank's `results` in rank order: with `shard`'s contiguous blocks this
    is the original order. Every rank gets the whole list (SPMD: see the module docstring)."""
    if not active():
        return results
    return [x for part in all_gather_object(results) for x in part]


def require_same_on_every_rank(data, what: str) -> None:
    """Refuse, on every rank, when the ranks hold different `data` (JSON-able: what a split is
    about to divide; items that differ between ranks would be gathered as one list, each rank's
    results silently paired with another rank's items). Each rank sends a SHA-256 of its data's
    JSON, not the data. One process: nothing to compare, nothing computed."""
    if not active():
        return
    key = hashlib.sha256(json.dumps(data).encode()).hexdigest()
    if len(set(keys := all_gather_object(key))) > 1:
        raise RuntimeError(f"{what} differ between the {len(keys)} processes (each rank must "
                           f"hold the same ones before they are split): a bug, please report it.")


def run_sharded(fn, items: list) -> list:
    """fn(this rank's shard of items) on every rank, then the results of all items in the
    original order (fn returns a list whose length is a multiple of len(its items), e.g. G
    rollouts per example, grouped). One process: fn(items)."""
    if not active():
        return fn(items)
    return gather_in_order(fn(shard(items)))
