"""Hand-written GRPO (Shao et al. 2024, arXiv 2402.03300) with TRL's names and semantics.

B = sequences in a batch (prompts x G), G = num_generations, T = completion tokens,
V = vocabulary, mask[b, t] = 1 on tokens the policy generated (0 on prompt, padding and
tool observations). See shared/papers/grpo.md; each choice below matches TRL's GRPOTrainer.

    A_i      = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        scale_rewards="group"
    ratio    = exp(logp - old_logp)                                   (== 1 with mu = 1)
    loss_t   = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t     = exp(ref - logp) - (ref - logp) - 1                     (k3, joschu.net/blog/kl-approx.html)
"""
from __future__ import annotations

import glob
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from common.rollout import STOP_REASONS, Rollout, rollout_batch
from common.runlog import RunLog


# ---------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """rewards (B,) grouped contiguously by prompt -> advantages (B,)."""
    r = rewards.view(-1, group_size)                                    # (B/G, G)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)                 # (B,)
    if scale_rewards == "group":      # GRPO: per-group std (unbiased, as torch.std / TRL)
        std = r.std(dim=1, keepdim=True).expand_as(r).reshape(-1)
    elif scale_rewards == "batch":    # one std over the whole batch
        std = rewards.std().expand_as(rewards)
    elif scale_rewards == "none":     # Dr. GRPO: no std scaling
        return centred
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred / (std + 1e-4)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, loss_type: str = "grpo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              max_completion_length: int | None = None, num_items_in_batch: float | None = None):
    """Clipped surrogate + k3 KL, aggregated by TRL's `loss_type`.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp may be None when beta = 0.
      grpo     mean over sequences of (sum_t loss * mask / sum_t mask)
      bnpo     sum(loss * mask) / sum(mask)
      dr_grpo  sum(loss * mask) / (B * max_completion_length)
      dapo     sum(loss * mask) / num_items_in_batch (generated tokens in the whole generation
               batch; = mask.sum() with one micro-batch)
    Returns (loss, stats) with stats as floats.
    """
    mask = mask.float()
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    A = advantages[:, None]                                              # (B, 1)
    log_ratio = logp - old_logp                                          # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    per_token_loss = -torch.min(unclipped, clipped)                      # (B, T)
    per_token_kl = None
    if beta != 0.0:
        d = ref_logp - logp
        per_token_kl = torch.exp(d) - d - 1                              # k3 >= 0, unbiased
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        loss = (per_token_loss * mask).sum() / (logp.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token_loss * mask).sum() / max(float(n), 1.0)
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, not {loss_type!r}")

    with torch.no_grad():  # TRL's clip statistics: only clips that change the gradient count
        low = ((ratio < 1 - eps_low) & (A < 0)).float()
        high = ((ratio > 1 + eps_high) & (A > 0)).float()
        stats = {"clip_ratio/low_mean": masked_mean(low, mask).item(),
                 "clip_ratio/high_mean": masked_mean(high, mask).item(),
                 "clip_ratio/region_mean": masked_mean(low + high, mask).item()}
        if per_token_kl is not None:
            stats["kl"] = masked_mean(per_token_kl, mask).item()
    return loss, stats


# ---------------------------------------------------------------------------------------------
# per-token log-probs without (B, T, V) float32 logits
# ---------------------------------------------------------------------------------------------
def _logp_chunk(head, h, targets, temperature):
    """log p(target) and entropy for one chunk, with as few (B, c, V) fp32 tensors alive as we can:
    log p = z_target - logsumexp(z) (no full log_softmax tensor); the entropy is a logged
    statistic, so it is computed under no_grad (autograd keeps nothing for it) and skipped in
    no-grad passes (reference / old log-probs), where callers drop it."""
    logits = head(h).float()                                             # (B, c, V)
    if temperature != 1.0:
        logits = logits / temperature if logits.requires_grad else logits.div_(temperature)
    lse = logits.logsumexp(-1)                                           # (B, c)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse    # (B, c)
    if not torch.is_grad_enabled():
        return logp, torch.zeros_like(logp)
    with torch.no_grad():                                                # H = lse - sum_v p_v z_v
        entropy = lse - torch.einsum("bcv,bcv->bc", (logits - lse[..., None]).exp_(), logits)
    return logp, entropy


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def completion_logprobs(model, batch: dict, temperature: float = 1.0, chunk_tokens: int = 1024):
    """Log-probs (B, T) and entropies (B, T) of the completion tokens of `rollout_batch` output.

    The decoder runs once; the lm_head + log_softmax run over chunks of completion positions,
    each under activation checkpointing, so at most (B, chunk, V) logits exist at a time, in
    the forward and in the backward (V = 151,936 for Qwen2.5: full fp32 logits for
    8 x 2,048 tokens would be ~10 GB; one 1,024-token chunk is 0.6 GB). Logits are divided by the
    sampling temperature, as TRL does. Entropies are zeros in no-grad passes.
    """
    hf = unwrap(model)
    body, head = hf.model, hf.get_output_embeddings()
    T = batch["completion_mask"].shape[1]
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "n_images")}
    if "pixel_values" in inputs and len(inputs["pixel_values"]) == 0:  # a sub-batch without images
        inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    hidden = body(**inputs, use_cache=False).last_hidden_state           # (B, P+T, H)
    h = hidden[:, -T - 1: -1]                                            # (B, T, H): predicts tokens P..P+T-1
    targets = batch["input_ids"][:, -T:]                                 # (B, T)
    c = max(1, chunk_tokens // h.shape[0])
    logps, ents = [], []
    for s in range(0, T, c):
        if torch.is_grad_enabled():
            lp, en = checkpoint(_logp_chunk, head, h[:, s: s + c], targets[:, s: s + c],
                                temperature, use_reentrant=False)
        else:
            lp, en = _logp_chunk(head, h[:, s: s + c], targets[:, s: s + c], temperature)
        logps.append(lp)
        ents.append(en.detach())
    return torch.cat(logps, 1), torch.cat(ents, 1)


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    """GRPO knobs, with TRL's names."""
    learning_rate: float = 1e-5
    num_generations: int = 4            # = G in the GRPO paper
    prompts_per_step: int = 2           # prompts per generation batch (B = prompts x G)
    num_iterations: int = 1             # = mu: updates per generation batch
    max_steps: int = 10
    beta: float = 0.0                   # KL coefficient (TRL's default 0)
    epsilon: float = 0.2
    epsilon_high: float | None = None   # DAPO clip-higher: 0.28
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    max_completion_length: int = 256
    temperature: float = 1.0
    micro_batch_size: int = 8           # sequences per forward/backward
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    drop_zero_std_groups: bool = False  # DAPO dynamic sampling (without re-sampling)
    mask_truncated_completions: bool = False
    save_steps: int = 0                 # 0 = only at the end
    logprob_chunk_tokens: int = 1024    # tokens per lm_head chunk: (chunk, V) fp32 logits at a time
    seed: int = 0


def sample_prompts(n_data: int, k: int, step: int, seed: int, weights=None) -> list[int]:
    """Indices of the prompts for `step`: a function of (seed, step) alone, so a resumed run
    sees the same data order. Uniform: epochs of seeded permutations; weighted: draws."""
    if weights is not None:
        return random.Random(seed * 1_000_003 + step).choices(range(n_data), weights=weights, k=k)
    out = []
    for j in range(step * k, step * k + k):
        epoch, pos = divmod(j, n_data)
        perm = list(range(n_data))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[pos])
    return out


def per_rollout(fn: Callable[[Rollout, dict], dict]) -> Callable:
    """Turn a per-rollout reward fn(rollout, example) -> {term: value} into a group reward fn."""
    return lambda group, example: [fn(r, example) for r in group]


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s):
    random.setstate(s["python"]); np.random.set_state(s["numpy"]); torch.set_rng_state(s["torch"])


def save_checkpoint(policy, opt, sched, step: int, out_dir: str) -> str:
    path = os.path.join(out_dir, f"checkpoint-{step}")
    policy.save_adapter(path)
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state()}, os.path.join(path, "trainer_state.pt"))
    return path


def latest_checkpoint(out_dir: str) -> str | None:
    cks = glob.glob(os.path.join(out_dir, "checkpoint-*"))
    return max(cks, key=lambda p: int(p.rsplit("-", 1)[1])) if cks else None


def load_checkpoint(policy, opt, sched, path: str) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(policy.model, load_file(os.path.join(path, "adapter_model.safetensors")))
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"]


def train_grpo(policy, dataset: list[dict], rollout_fn: Callable, reward_fn: Callable,
               cfg: GRPOConfig, out_dir: str, *, weights: list[float] | None = None,
               resume: bool = False, on_step: Callable | None = None) -> dict:
    """GRPO on `dataset` (a list of examples).

    rollout_fn(policy, examples, cfg) -> list[Rollout], G per example, grouped.
    reward_fn(group: list[Rollout], example) -> one {term: value} per rollout, with the total
      under "reward" (the other terms are logged separately).
    weights: optional per-example sampling weights (e.g. LRAS difficulty).
    on_step(step, rollouts, rewards): a hook for samples / trajectory pages.
    """
    G = cfg.num_generations
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("No trainable parameters: load the policy with lora=True.")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    start = 0
    if resume and (ck := latest_checkpoint(out_dir)):
        start = load_checkpoint(policy, opt, sched, ck)
        print(f"[grpo] resumed from {ck} at step {start}")
    log = RunLog(out_dir, resume=resume and start > 0)
    log.drop_from(start)  # steps the interrupted run logged after its last checkpoint
    policy.model.train()
    last = {}
    for step in log.bar(range(start, cfg.max_steps), desc="grpo", initial=start, total=cfg.max_steps):
        t0 = time.perf_counter()
        examples = [dataset[i] for i in sample_prompts(len(dataset), cfg.prompts_per_step, step,
                                                       cfg.seed, weights)]
        rollouts = rollout_fn(policy, examples, cfg)                     # B = prompts x G
        t_gen = time.perf_counter() - t0

        terms = []
        for g, ex in enumerate(examples):
            terms += reward_fn(rollouts[g * G: (g + 1) * G], ex)
        rewards = torch.tensor([t["reward"] for t in terms], dtype=torch.float)  # (B,)
        if not torch.isfinite(rewards).all():
            raise FloatingPointError(f"Step {step}: a reward is NaN/inf; check the reward function.")
        advantages = group_advantages(rewards, G, cfg.scale_rewards)     # (B,)
        zero_std = (rewards.view(-1, G).std(1) < 1e-6)                   # (B/G,)
        keep = torch.ones(len(rollouts), dtype=torch.bool)
        if cfg.drop_zero_std_groups:
            keep = (~zero_std).repeat_interleave(G)
        idx = keep.nonzero().flatten().tolist()

        stats_acc: dict[str, list] = {}
        t_lp = t_bw = 0.0
        if idx:
            batch = rollout_batch([rollouts[i] for i in idx], policy.tokenizer)
            batch = {k: v.to(policy.device) for k, v in batch.items()}
            mask = batch["completion_mask"]
            if cfg.mask_truncated_completions:
                trunc = torch.tensor([rollouts[i].truncated for i in idx], device=mask.device)
                mask = mask * (~trunc).float()[:, None]
            adv = advantages[idx].to(policy.device)
            n_items = mask.sum().item()
            mbs = [list(range(s, min(s + cfg.micro_batch_size, len(idx))))
                   for s in range(0, len(idx), cfg.micro_batch_size)]
            t1 = time.perf_counter()
            with torch.no_grad():   # old (only when mu > 1) and reference log-probs, per micro-batch
                old_lp = ([completion_logprobs(policy.model, _sub(batch, mb), cfg.temperature,
                                               cfg.logprob_chunk_tokens)[0] for mb in mbs]
                          if cfg.num_iterations > 1 else None)
                ref_lp = None
                if cfg.beta != 0.0:
                    with policy.reference():
                        ref_lp = [completion_logprobs(policy.model, _sub(batch, mb), cfg.temperature,
                                                      cfg.logprob_chunk_tokens)[0] for mb in mbs]
            t_lp += time.perf_counter() - t1
            for _ in range(cfg.num_iterations):
                t2 = time.perf_counter()
                for j, mb in enumerate(mbs):
                    sub = _sub(batch, mb)
                    logp, ent = completion_logprobs(policy.model, sub, cfg.temperature,
                                                    cfg.logprob_chunk_tokens)
                    m = mask[mb]
                    loss, st = grpo_loss(logp, logp.detach() if old_lp is None else old_lp[j],
                                         None if ref_lp is None else ref_lp[j], adv[mb], m,
                                         loss_type=cfg.loss_type, epsilon=cfg.epsilon,
                                         epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                         max_completion_length=cfg.max_completion_length,
                                         num_items_in_batch=n_items)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"Step {step}: the loss is {loss.item()}. Lower --learning_rate, check the "
                            f"rewards, or load in float32; the run stops here instead of going on.")
                    # micro-batch weights so that they sum to the full-batch loss exactly (dapo
                    # already divides by n_items; TRL's bnpo normalises per micro-batch instead,
                    # which equals this only when micro-batches hold equal token counts)
                    w = {"grpo": len(mb) / len(idx), "dr_grpo": len(mb) / len(idx),
                         "bnpo": m.sum().item() / max(n_items, 1.0), "dapo": 1.0}[cfg.loss_type]
                    (loss * w).backward()
                    st.update(loss=loss.item(), entropy=masked_mean(ent, m).item())
                    for k, v in st.items():
                        stats_acc.setdefault(k, []).append(v)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"Step {step}: the gradient norm is {grad_norm}; "
                                             f"lower --learning_rate. The run stops here.")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                t_bw += time.perf_counter() - t2
            stats_acc["grad_norm"] = [grad_norm.item()]

        n_gen = sum(r.n_generated for r in rollouts)
        last = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                **{f"rewards/{k}": float(np.mean([t[k] for t in terms if k in t]))   # terms may differ
                   for k in dict.fromkeys(k for t in terms for k in t) if k != "reward"},  # per rollout
                **{k: float(np.mean(v)) for k, v in stats_acc.items()},
                "frac_reward_zero_std": zero_std.float().mean().item(),
                "completion_length": n_gen / len(rollouts),
                "truncated_frac": float(np.mean([r.truncated for r in rollouts])),
                **{f"stop/{k}": float(np.mean([r.stop_reason == k for r in rollouts])) for k in STOP_REASONS},
                "lr": sched.get_last_lr()[0], "time/generate": t_gen, "time/logprob": t_lp,
                "time/backward": t_bw, "tokens_per_s": n_gen / max(t_gen, 1e-9)}
        log.log(last, step)
        if on_step is not None:
            on_step(step, rollouts, terms)
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(policy, opt, sched, step + 1, out_dir)  # the last one lets a run be extended
    log.plot(["reward", "kl", "completion_length", "entropy"], title="GRPO")
    if policy.has_adapter:
        policy.save_adapter(os.path.join(out_dir, "adapter"))
    summary = {"steps": cfg.max_steps, "final": last, "config": asdict(cfg)}
    log.summary(summary)
    return summary


def _sub(batch: dict, rows: list[int]) -> dict:
    """Rows of a rollout batch, with the images that belong to those rows (stored in row order)."""
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        first = torch.cat([batch["n_images"].new_zeros(1), batch["n_images"].cumsum(0)])  # (B+1,)
        img = [i for b in rows for i in range(int(first[b]), int(first[b + 1]))]
        patches = batch["image_grid_thw"].prod(-1)
        pfirst = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        out["image_grid_thw"] = batch["image_grid_thw"][img]
        out["pixel_values"] = torch.cat([batch["pixel_values"][pfirst[i]: pfirst[i + 1]] for i in img]) \
            if img else batch["pixel_values"][:0]
    return out
