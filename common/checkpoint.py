"""Checkpoints for the GRPO and SFT loops: atomic, pickle-free, with every RNG.

    out/checkpoint-<step>/adapter_config.json, adapter_model.safetensors   (peft format)
    out/checkpoint-<step>/trainer_state.pt   step, optimizer, scheduler, RNG states

A checkpoint is written to `out/.checkpoint-<step>.tmp` and renamed into place, so a kill during
a save leaves no half-written `checkpoint-<step>/` (`latest_checkpoint` also skips any folder
that lacks one of the files above). `trainer_state.pt` holds only tensors, numbers, strings,
lists and dicts and is read with `torch.load(weights_only=True)`: a planted pickle cannot run
code. RNG states (Python, NumPy, torch CPU, every CUDA device) are stored as tensors / lists.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from common.errors import UserError

FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt")


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


def save_checkpoint(policy, opt, sched, step: int, out_dir: str, extra: dict | None = None) -> str:
    """Write checkpoint-<step> atomically (temporary folder, then rename); returns its path."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_adapter(tmp)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": rng_state(), **(extra or {})}
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):  # re-saving a step (an extended run): replace it
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) and os.path.getsize(os.path.join(path, f)) > 0
               for f in FILES)


def latest_checkpoint(out_dir: str) -> str | None:
    """The complete checkpoint-<step> folder with the highest step (incomplete ones skipped)."""
    if not os.path.isdir(out_dir):
        return None
    found = [(int(m.group(1)), os.path.join(out_dir, d)) for d in os.listdir(out_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    found = [(s, p) for s, p in found if is_complete(p)]
    return max(found)[1] if found else None


def load_checkpoint(policy, opt, sched, path: str) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(policy.model,
                              load_file(os.path.join(path, "adapter_model.safetensors")))
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    except Exception as e:  # an unpickling error: not a file this code wrote
        raise ValueError(f"{path}/trainer_state.pt is not a checkpoint this code wrote "
                         f"({type(e).__name__}); "
                         f"delete the folder or resume from another one.") from e
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def resume_from(out_dir: str) -> str:
    """The checkpoint to resume from, or a one-sentence error when there is none."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        raise UserError(f"--resume: there is no complete checkpoint in {out_dir}; run without "
                        f"--resume "
                        f"to start over, or pass the --out of the run to continue.")
    return ck
