"""Masked supervised fine-tuning: the loss sees only tokens whose loss_mask is 1.

    loss = sum_{b,t} mask[b,t] * -log p(x[b,t] | x[b,<t]) / sum_{b,t} mask[b,t]

summed over every micro-batch of one optimiser step (gradient accumulation normalises by the
masked-token count of the whole step, not per micro-batch, so long and short samples weigh
the same per token). Masks come from common/chat.py: assistant replies in, prompts and tool
observations out.

Under torchrun (common/distributed.py) each rank takes a contiguous share of every step's
batch_size sequences (the data order is a function of the seed, the same on every rank); the
denominator is still the whole step's masked-token count, each rank's loss is scaled by the
world size and `average_gradients` takes the mean before clipping: the one-process gradient.
"""
from __future__ import annotations

import inspect
import math
import os
import random
from dataclasses import asdict, dataclass

import torch

from common import distributed as dist
from common.chat import Encoded, collate
from common.checkpoint import (check_resume_args, fresh_out, load_checkpoint, pack_random,
                               read_state, resume_from, save_checkpoint, unpack_random)
from common.cli import RunArgs
from common.logprobs import completion_logprobs, unwrap
from common.generate import image_token_id
from common.runlog import RunLog


@dataclass
class SFTArgs(RunArgs):
    """The SFT fields of a script's `Args` (`class Args(GRPOConfig, SFTArgs)`); `sft_config(args)`
    reads them."""
    # --- SFT ---
    sft_learning_rate: float = 1e-4
    """SFT learning rate"""
    sft_epochs: float = 3.0
    """SFT epochs"""
    sft_batch_size: int = 8
    """sequences per SFT step"""
    sft_max_steps: int = 0
    """cap on SFT steps (0 = epochs decide)"""
    full_sft: bool = False
    """SFT trains every weight, not only LoRA (Policy.train_all_weights: a random-weight model
    learns little
    through LoRA alone); the base weights are saved in the adapter folder and load with it"""


@dataclass
class SFTConfig:
    learning_rate: float = 1e-4          # a common LoRA SFT rate; scripts set their paper's
    epochs: float = 3.0
    batch_size: int = 8                  # sequences per optimiser step
    micro_batch_size: int = 4
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"          # cosine | linear | constant (after warm-up)
    max_grad_norm: float = 1.0
    max_steps: int = 0                   # > 0 caps the number of optimiser steps
    max_length: int = 4096               # longer samples are cut (their masked tokens too)
    save_steps: int = 0                  # > 0: a checkpoint every N steps and at the end
    resume: bool = False                 # continue from the latest checkpoint in out_dir
    overwrite_output_dir: bool = False   # a fresh run deletes an earlier run's checkpoints
    logprob_chunk_tokens: int = 1024
    seed: int = 0


def sft_config(args, **overrides) -> SFTConfig:
    """The SFTConfig of a script's `Args`: its SFTArgs fields, micro_batch_size and seed."""
    fields = dict(learning_rate=args.sft_learning_rate, epochs=args.sft_epochs,
                  batch_size=args.sft_batch_size,
                  micro_batch_size=args.micro_batch_size, max_steps=args.sft_max_steps,
                  seed=args.seed)
    return SFTConfig(**{**fields, **overrides})


def trajectory_messages(messages: list[dict], turns: list[dict]) -> list[dict]:
    """Prompt messages + an agent trajectory's turns -> chat messages for SFT: assistant turns as
    replies, tool observations as user turns (with their image), as the agent loop shows them with
    observation_style="user_turn"; common/chat.encode masks everything but the replies."""
    msgs = list(messages)
    for t in turns:
        if t["role"] == "assistant":
            msgs.append({"role": "assistant", "content": t["text"]})
        else:
            image = [{"type": "image", "image": t["image"]}] if t.get("image") else []
            msgs.append({"role": "user",
                         "content": image + [{"type": "text", "text": t["observation"]}]})
    return msgs


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[schedule]


def sft_batch(samples: list[Encoded], tokenizer) -> dict:
    """Right-padded batch laid out for `completion_logprobs`: all positions after the first are
    "completion", with loss_mask shifted to the targets."""
    batch = collate(samples, tokenizer.pad_token_id, "right", image_token_id(tokenizer))
    loss_mask = batch.pop("loss_mask")
    # completion_logprobs predicts the last T tokens from the positions before them: T = L - 1
    batch["completion_mask"] = loss_mask[:, 1:].float()
    if "pixel_values" in batch:
        batch["n_images"] = torch.tensor([0 if s.image_grid_thw is None else len(s.image_grid_thw)
                                          for s in samples])
    return batch


def masked_nll(policy, batch: dict, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked token NLL, number of masked tokens) for one micro-batch."""
    logp, _ = completion_logprobs(policy.model, batch, 1.0, chunk_tokens)  # (B, L-1)
    mask = batch["completion_mask"]
    return -(logp * mask).sum(), mask.sum()


@torch.no_grad()
def sequence_logprobs(policy, samples: list[Encoded],
                      batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log p over each sample's loss-mask tokens, their count) under the current
    weights in eval mode (no dropout), one no-grad forward per batch (e.g. how likely a model
    finds given continuations)."""
    out, was_training = [], policy.model.training
    policy.model.eval()
    for i in range(0, len(samples), batch_size):
        part = samples[i: i + batch_size]
        batch = {k: v.to(policy.device) for k, v in sft_batch(part, policy.tokenizer).items()}
        logp, _ = completion_logprobs(policy.model, batch, 1.0)         # (B, L-1)
        mask = batch["completion_mask"]
        out += [(float(lp), int(n)) for lp, n in zip((logp * mask).sum(1), mask.sum(1))]
    policy.model.train(was_training)
    return out


@torch.no_grad()
def continuation_logprobs(policy, prefix: list[int],
                          continuations: list[list[int]]) -> list[tuple[float, int]]:
    """sequence_logprobs for many continuations of one prefix: the prefix runs once, its KV
    cache is repeated for every continuation (right-padded), so a prompt shared by S sentences
    costs one forward instead of S. Same numbers as sequence_logprobs on prefix + continuation
    with the continuation masked in (tests/test_differential.py checks them against each other).
    Text only: positions are given explicitly, so no rope state of an earlier call leaks in."""
    was_training = policy.model.training
    policy.model.eval()
    dev, hf = policy.device, unwrap(policy.model)           # LoRA layers stay in the modules
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    def positions(start, n, rows):   # text only: explicit, never the model's cached rope state
        pos = torch.arange(start, start + n, device=dev).expand(rows, n)
        return pos.expand(3, rows, n) if policy.is_vlm else pos            # Qwen2.5-VL: mrope
    head = hf(input_ids=torch.tensor([prefix], device=dev), use_cache=True,
              position_ids=positions(0, len(prefix), 1))
    first = head.logits[0, -1].float().log_softmax(-1)                  # predicts token 0
    L = max(len(c) for c in continuations)
    ids = torch.full((len(continuations), L), policy.tokenizer.pad_token_id, device=dev)
    mask = torch.zeros(len(continuations), L, dtype=torch.long, device=dev)
    for b, c in enumerate(continuations):
        ids[b, : len(c)], mask[b, : len(c)] = torch.tensor(c, device=dev), 1
    cache = getattr(head, "cache", None) or head.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    attn = torch.cat([torch.ones(len(continuations), len(prefix), dtype=torch.long, device=dev),
                      mask], 1)
    logits = hf(input_ids=ids, attention_mask=attn, use_cache=True, **{key: cache},
                position_ids=positions(len(prefix), L, len(continuations))).logits
    rest = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L-1)
    policy.model.train(was_training)
    return [(float(first[c[0]] + (rest[b, : len(c) - 1]).sum()), len(c))
            for b, c in enumerate(continuations)]


def train_sft(policy, samples: list[Encoded], cfg: SFTConfig, out_dir: str) -> dict:
    """LoRA SFT on encoded samples; writes metrics, a loss plot and `<out_dir>/adapter`.
    With cfg.save_steps, checkpoints (common/checkpoint.py) hold the data order and RNG too, so
    cfg.resume continues exactly where the run stopped."""
    if not cfg.resume:   # an earlier run's checkpoints: refused, or deleted when asked
        fresh_out(out_dir, cfg.overwrite_output_dir)
    samples = [s for s in samples if sum(s.loss_mask) > 0]
    if not samples:
        raise ValueError("No SFT sample has a trainable token (all loss masks are 0).")
    for s in samples:
        if len(s.input_ids) > cfg.max_length:
            if s.image_grid_thw is not None:
                raise ValueError(f"A sample with images is {len(s.input_ids)} tokens, over "
                                 f"max_length={cfg.max_length}; raise it (cutting would split an "
                                 f"image).")
            s.input_ids, s.loss_mask = s.input_ids[: cfg.max_length], s.loss_mask[: cfg.max_length]
    # each rank trains on its share of the very same samples
    dist.require_same_on_every_rank([[s.input_ids, s.loss_mask] for s in samples],
                                    "The SFT samples")
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt,
                                              lambda s: lr_factor(s, total, warmup,
                                                                  cfg.lr_schedule))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    start = 0
    if cfg.resume:   # the checkpoint's settings must be these (common/checkpoint.py)
        ck = resume_from(out_dir)
        state = read_state(ck)
        check_resume_args(state.get("args"), asdict(cfg), ck)
        load_checkpoint(policy, opt, sched, ck, state)
        start, order = state["step"], list(state["order"])
        rng.setstate(unpack_random(state["sft_rng"]))
        print(f"[sft] resumed from {ck} at step {start}")
    log = RunLog(out_dir, resume=start > 0)
    log.drop_from(start)
    policy.model.train()
    loss_val = float("nan")
    for step in log.bar(range(start, total), desc="sft", initial=start, total=total):
        if len(order) < cfg.batch_size:   # epochs of shuffles
            perm = list(range(len(samples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        n_tok = sum(sum(samples[i].loss_mask[1:]) for i in idx)   # the whole step's, all ranks
        total_nll, mine = 0.0, dist.shard(idx)                      # this rank's sequences
        for s in range(0, len(mine), cfg.micro_batch_size):
            batch = sft_batch([samples[i] for i in mine[s: s + cfg.micro_batch_size]],
                              policy.tokenizer)
            batch = {k: v.to(policy.device) for k, v in batch.items()}
            nll, _ = masked_nll(policy, batch, cfg.logprob_chunk_tokens)
            (nll * dist.world_size() / max(n_tok, 1)).backward()
            total_nll += nll.item()
        dist.average_gradients(params)         # the mean over ranks = the one-process gradient
        loss_val = dist.all_reduce([total_nll])[0] / max(n_tok, 1)
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"SFT step {step}: the loss is {loss_val}. Lower "
                                     f"--learning_rate "
                                     f"or check the data; the run stops here instead of going on.")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.log({"loss": loss_val, "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                 "tokens": n_tok}, step)
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == total):
            save_checkpoint(policy, opt, sched, step + 1, out_dir,
                            extra={"order": order, "sft_rng": pack_random(rng.getstate())},
                            args=asdict(cfg))
    log.plot(["loss", "lr"], title="SFT")
    if dist.is_main():
        policy.save_adapter(os.path.join(out_dir, "adapter"))
    summary = {"steps": total, "samples": len(samples), "final_loss": loss_val,
               "config": asdict(cfg), **({"distributed": dist.describe(cfg.seed)}
                                         if dist.world_size() > 1 else {})}
    log.summary(summary)        # rank 0 writes; every rank waits, the adapter is on disk too
    return summary
