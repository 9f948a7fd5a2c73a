"""Checkpoints for the GRPO and SFT loops: atomic, pickle-free, with every RNG.

    out/checkpoint-<step>/adapter_config.json, adapter_model.safetensors   (peft format)
    out/checkpoint-<step>/trainer_state.pt   step, optimizer, scheduler, RNG states, and the
                                             run's training arguments under "args"

A checkpoint is written to `out/.checkpoint-<step>.tmp` and renamed into place, so a kill during
a save leaves no half-written `checkpoint-<step>/` (`latest_checkpoint` also skips any folder
that lacks one of the files above). `trainer_state.pt` holds only tensors, numbers, strings,
lists and dicts and is read with `torch.load(weights_only=True)`: a planted pickle cannot run
code. RNG states (Python, NumPy, torch CPU, every CUDA device) are stored as tensors / lists.
Under torchrun every rank's RNG state is gathered and stored ("rng_ranks", with "world_size");
rank 0 writes. A resume restores each rank's own state, and refuses another world size
(`check_world_size`: the split of each step's prompts, and so the rollouts, would differ).

One folder holds one run's checkpoints: a fresh run into a folder that holds checkpoint-N
folders refuses (`fresh_out`; `overwrite_output_dir` deletes them instead), a resume whose
training arguments differ from the checkpoint's names the fields and stops
(`check_resume_args`; only MAY_CHANGE_ON_RESUME may differ), and `save_total_limit` keeps the
last N complete checkpoints (`prune_checkpoints`).
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from common import distributed as dist
from common.errors import UserError

FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt")

MAY_CHANGE_ON_RESUME = ("max_steps", "save_steps", "save_total_limit", "resume",
                        "overwrite_output_dir", "logprob_chunk_tokens", "vision_once")
"""The training arguments a resume may change: max_steps (to extend a run), how and how often it
saves, the flags that say what to do with the folder, and the memory-only settings (lm_head
chunking, the vision tower once per image: the same numbers). Any other difference would
continue one run as another (the optimiser state, for one, carries the old learning rate)."""


def pack_random(state) -> dict:
    """A `random.Random` state as a tensor + numbers (no pickle)."""
    version, mt, gauss = state
    return {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss}


def unpack_random(d: dict):
    return d["version"], tuple(d["state"].tolist()), d["gauss"]


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": pack_random(random.getstate()),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(s: dict) -> None:
    random.setstate(unpack_random(s["python"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(policy, opt, sched, step: int, out_dir: str, extra: dict | None = None, *,
                    args: dict | None = None, total_limit: int | None = None) -> str:
    """Write checkpoint-<step> atomically (temporary folder, then rename); returns its path.
    args: the run's training arguments (its config as a dict), compared on resume;
    total_limit: then keep only the last N complete checkpoints (TRL's save_total_limit).
    Several processes: every rank calls it (its RNG state is gathered), rank 0 writes."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    rngs = dist.all_gather_object(rng_state())         # [rank 0's, rank 1's, ...]
    if not dist.is_main():
        return final
    tmp = os.path.join(out_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_adapter(tmp)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": rngs[0], "args": args, **(extra or {})}
    if len(rngs) > 1:
        state.update(world_size=len(rngs), rng_ranks=rngs)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):  # re-saving a step (an extended run): replace it
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if total_limit is not None:
        prune_checkpoints(out_dir, total_limit)
    return final


def checkpoint_dirs(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-<step> folder, complete or not, by step."""
    if not os.path.isdir(out_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(out_dir, d)) for d in os.listdir(out_dir)
                  if (m := re.fullmatch(r"checkpoint-(\d+)", d)))


def prune_checkpoints(out_dir: str, limit: int) -> None:
    """Keep the last `limit` complete checkpoints; delete every checkpoint folder before them."""
    complete = [s for s, p in checkpoint_dirs(out_dir) if is_complete(p)]
    if len(complete) <= limit:
        return
    first_kept = complete[-limit]
    for s, p in checkpoint_dirs(out_dir):
        if s < first_kept:
            shutil.rmtree(p)


def is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) and os.path.getsize(os.path.join(path, f)) > 0
               for f in FILES)


def latest_checkpoint(out_dir: str) -> str | None:
    """The complete checkpoint-<step> folder with the highest step (incomplete ones skipped)."""
    found = [(s, p) for s, p in checkpoint_dirs(out_dir) if is_complete(p)]
    return found[-1][1] if found else None


def read_state(path: str) -> dict:
    """The trainer state of a checkpoint folder (tensors and plain values only: no pickle)."""
    try:
        return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    except Exception as e:  # an unpickling error: not a file this code wrote
        # from None: torch's own text suggests weights_only=False, which would run the pickle
        raise UserError(f"{path}/trainer_state.pt is not a checkpoint this code wrote "
                        f"({type(e).__name__}); "
                        f"delete the folder or resume from another one.") from None


def load_checkpoint(policy, opt, sched, path: str, state: dict | None = None) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the trainer state
    (`state`: one `read_state(path)` already read)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = read_state(path) if state is None else state
    set_peft_model_state_dict(policy.model,
                              load_file(os.path.join(path, "adapter_model.safetensors")))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    check_world_size(state, path)
    set_rng_state(state["rng_ranks"][dist.rank()] if "rng_ranks" in state else state["rng"])
    return state


def check_world_size(state: dict, path: str) -> None:
    """A resume runs on as many processes as the run it continues (one sentence if not)."""
    saved, now = state.get("world_size", 1), dist.world_size()
    if saved != now:
        raise UserError(f"--resume: {path} was saved by {saved} process(es) and this run has "
                        f"{now}; resume with the same number (torchrun --nproc_per_node {saved}"
                        f"{'' if saved > 1 else ', or plain python'}) or start a new run.")


def resume_from(out_dir: str) -> str:
    """The checkpoint to resume from, or a one-sentence error when there is none."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        raise UserError(f"--resume: there is no complete checkpoint in {out_dir}; run without "
                        f"--resume "
                        f"to start over, or pass the --out of the run to continue.")
    return ck


def fresh_out(out_dir: str, overwrite: bool) -> None:
    """A fresh run (no resume) into `out_dir`: refuse when it holds checkpoint-<step> folders (a
    later resume would take an older run's for this one's), or delete them when `overwrite`."""
    found = checkpoint_dirs(out_dir)
    if not found:
        return
    names = ", ".join(os.path.basename(p) for _, p in found)
    if not overwrite:
        raise UserError(f"{out_dir} already holds {names} of an earlier run; pass --resume to "
                        f"continue that run, or --overwrite_output_dir to delete them and start "
                        f"over (or choose another --out).")
    dist.barrier()      # every rank has looked before rank 0 deletes
    if not dist.is_main():
        dist.barrier()
        return
    for _, p in found:
        shutil.rmtree(p)
    for d in os.listdir(out_dir):   # what killed saves left
        if re.fullmatch(r"\.checkpoint-\d+\.tmp|checkpoint-\d+\.old", d):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    print(f"[checkpoint] --overwrite_output_dir: deleted {names} of an earlier run in {out_dir}")
    dist.barrier()


def check_resume_args(saved: dict | None, now: dict, path: str) -> None:
    """Stop a resume whose training arguments differ from those `path` was saved with (other than
    MAY_CHANGE_ON_RESUME), naming each field as `name: old -> new`."""
    if saved is None:
        print(f"[checkpoint] warning: {path} holds no training arguments (saved by older code); "
              f"they are not compared.")
        return
    diff = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != v]
    if diff:
        raise UserError(f"--resume: the training arguments differ from those {path} was saved "
                        f"with ({'; '.join(diff)}); pass the checkpoint's values to continue that "
                        f"run, or start a new one (another --out, or --overwrite_output_dir).")
