"""Hand-written GRPO (Shao et al. 2024, arXiv 2402.03300) with TRL's names and semantics.

B = sequences in a batch (prompts x G), G = num_generations, T = completion tokens,
V = vocabulary, mask[b, t] = 1 on tokens the policy generated (0 on prompt, padding and
tool observations). Each choice below matches TRL's GRPOTrainer (the objective: Sec. 4.1 there).

    A_i      = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        scale_rewards="group"
    ratio    = exp(logp - old_logp)                                   (== 1 with mu = 1)
    loss_t   = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t     = exp(ref - logp) - (ref - logp) - 1              (k3, joschu.net/blog/kl-approx.html)
    pi_ref   = the policy at the start of the run (Policy.frozen_reference)
    GSPO     importance_sampling_level="sequence": ratio = exp(mean_t log_ratio) per sequence

One logging choice differs: the logged kl, entropy and clip_ratio/* are token-weighted across
micro-batches (clip fractions sequence-weighted under GSPO), where TRL logs the mean of the
micro-batch means; the two agree when the micro-batches hold equal token counts.

Per-token log-probs: common/logprobs.py; rewards: common/rewards.py; checkpoints:
common/checkpoint.py (stale checkpoints of another run are refused; MAY_CHANGE_ON_RESUME).

More than one process (torchrun; common/distributed.py): the same update as one process, given
the same rollouts. The step's prompts_per_step prompts are split into contiguous blocks of whole
groups (one per rank); rewards are gathered so advantages (scale_rewards="batch" too), the
dropped groups and the reward metrics are those of the whole batch; the loss normalisers use
global counts (sequences for grpo / dr_grpo, micro-batches for bnpo, dapo's num_items_in_batch,
each all-reduced) and every rank's loss is scaled by the world size, so the mean of the ranks'
gradients is the one-process gradient; `average_gradients` takes that mean in one all_reduce
before clip_grad_norm_. Why by hand and not DDP: the trainable set is a few LoRA tensors, reduced
once per optimiser step after all micro-batches (DDP would reduce in every micro-batch's backward
unless wrapped in no_sync, and its reducer must see every parameter used in each backward, which
peft's reference adapter switching, gradient checkpointing's recomputation and NF4 bases make
fragile); one flat all_reduce of the LoRA gradients is what DDP computes, with nothing to wrap.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Literal

import numpy as np
import torch

from common import distributed as dist
from common.checkpoint import (check_resume_args, check_world_size, fresh_out, load_checkpoint,
                               read_state, resume_from, save_checkpoint)
from common.errors import UserError
from common.generate import image_features, sub_batch
from common.logprobs import completion_logprobs
from common.rewards import reward_stats, score_groups
from common.rollout import STOP_REASONS, rollout_batch
from common.runlog import RunLog


# ---------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale_rewards: str = "group") -> torch.Tensor:
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
              max_completion_length: int | None = None, num_items_in_batch: float | None = None,
              importance_sampling_level: str = "token"):
    """Clipped surrogate + k3 KL, aggregated by TRL's `loss_type` (over this micro-batch).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). ref_logp may be None when beta = 0.
      grpo     mean over sequences of (sum_t loss * mask / sum_t mask)
      bnpo     sum(loss * mask) / sum(mask) of this micro-batch (TRL: the loop then averages
               micro-batches with equal weight, so bnpo != dapo when token counts differ)
      dr_grpo  sum(loss * mask) / (B * max_completion_length)
      dapo     sum(loss * mask) / num_items_in_batch (generated tokens in the whole generation
               batch; = mask.sum() with one micro-batch)
    importance_sampling_level: "token" (GRPO) or "sequence" (GSPO, arXiv 2507.18071: one ratio
      per sequence, exp(mean_t log_ratio), TRL's name and semantics).
    Returns (loss, stats): stats are means over this micro-batch's tokens (clip fractions over
    sequences at the sequence level, as TRL), with their counts under "_n_tok" / "_n_clip" so a
    loop can weight micro-batches.
    """
    mask = mask.float()
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    A = advantages[:, None]                                              # (B, 1)
    log_ratio = logp - old_logp                                          # (B, T)
    if importance_sampling_level == "token":
        log_w = log_ratio                                                # (B, T)
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (B, 1)
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, not "
                         f"{importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    per_token_loss = -torch.min(unclipped, clipped)                      # (B, T) or (B, 1)
    per_token_kl = None
    if beta != 0.0:
        d = ref_logp - logp
        per_token_kl = torch.exp(d) - d - 1                              # k3 >= 0, unbiased
        per_token_loss = per_token_loss + beta * per_token_kl            # (B, T)
    per_token_loss = per_token_loss.expand_as(mask)                      # (B, T)

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
        # GSPO: one value per sequence
        seq = ratio.shape[1] == 1
        cmean = (lambda x: x.mean().item()) if seq else (lambda x: masked_mean(x, mask).item())
        stats = {"clip_ratio/low_mean": cmean(low), "clip_ratio/high_mean": cmean(high),
                 "clip_ratio/region_mean": cmean(low + high),
                 "_n_tok": mask.sum().item(),
                 "_n_clip": float(len(mask)) if seq else mask.sum().item()}
        if per_token_kl is not None:
            stats["kl"] = masked_mean(per_token_kl, mask).item()
    return loss, stats


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    """Every GRPO setting, declared once, with TRL's names and these defaults. A script's `Args`
    inherits this class, so each field is a command-line flag (its docstring is the help); the
    script re-declares only the fields whose paper value differs, with the source.
    `GRPOConfig.of(args)` picks these fields out of a script's parsed `Args` for `train_grpo`."""
    # --- GRPO (TRL names) ---
    max_steps: int = 200
    """GRPO steps"""
    learning_rate: float = 1e-5
    """GRPO learning rate (LoRA)"""
    num_generations: int = 4
    """G, rollouts per prompt (>= 2: advantages are centred within a group)"""
    prompts_per_step: int = 4
    """prompts per GRPO step (batch = prompts_per_step x G rollouts)"""
    num_iterations: int = 1
    """mu: optimiser updates per generation batch (> 1: the ratio is taken to the log-probs
    before the first update, and the clip acts)"""
    beta: float = 0.001
    """KL coefficient to pi_ref (the RL starting point); 0 skips the reference pass"""
    epsilon: float = 0.2
    """clip range, low side"""
    epsilon_high: float | None = None
    """clip range, high side (none = epsilon; DAPO: 0.28)"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    """loss aggregation (TRL names; grpo_loss's docstring gives each formula)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantage scaling: std of the group (GRPO), of the whole batch, or none (Dr. GRPO)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """one ratio per token (GRPO) or per sequence, exp(mean_t log ratio) (GSPO, arXiv 2507.18071)"""
    drop_zero_std_groups: bool = False
    """leave groups whose rewards are all equal out of the update (DAPO's dynamic sampling,
    without re-sampling)"""
    mask_truncated_completions: bool = False
    """leave completions cut by a token limit out of the loss (TRL's rule)"""
    max_completion_length: int = 2048
    """tokens per rollout after the prompt, tool observations included"""
    temperature: float = 1.0
    """sampling temperature for RL (> 0); log-probs are taken at the same temperature"""
    micro_batch_size: int = 4
    """sequences per forward/backward"""
    max_grad_norm: float = 1.0
    """gradient clipping (global L2 norm)"""
    warmup_steps: int = 0
    """linear learning-rate warm-up over this many steps, then constant"""
    reward_weights: list[float] | None = None
    """weights of several reward functions, comma-separated (none = 1 each; TRL's name)"""
    logprob_chunk_tokens: int = 1024
    """tokens per lm_head chunk: (chunk, V) fp32 logits at a time (memory, not results)"""
    vision_once: bool = True
    """run the frozen vision tower once per distinct image of a batch and reuse its output in
    the old / reference / policy passes (exact; memory and time only)"""
    save_steps: int = 0
    """save a GRPO checkpoint (adapter, optimiser, RNG, these settings) every N steps into
    <out>/rl (0 = only the final adapter)"""
    save_total_limit: int | None = None
    """keep only the last N checkpoints, deleting older ones after each save (none = all; TRL's
    name)"""
    resume: bool = False
    """continue RL from the latest <out>/rl/checkpoint-N: same step, data order and RNG; its
    settings must match this run's (common/checkpoint.py MAY_CHANGE_ON_RESUME lists the
    exceptions, max_steps among them, to extend a run)"""
    overwrite_output_dir: bool = False
    """a new run (no --resume) deletes the checkpoint-N folders an earlier run left in <out>/rl
    instead of refusing to start (TRL's name)"""
    seed: int = 0

    @classmethod
    def of(cls, args, **overrides) -> "GRPOConfig":
        """The GRPO fields of a script's parsed `Args` (every field, the same in every script)."""
        return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls)}, **overrides})


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


def check_config(cfg: GRPOConfig) -> None:
    """One sentence for settings that cannot train (G = 1 gives NaN advantages, T = 0 is greedy)."""
    if cfg.num_generations < 2:
        raise UserError(f"num_generations must be >= 2 (GRPO compares completions within a group; "
                        f"got "
                        f"{cfg.num_generations}).")
    if cfg.temperature <= 0:
        raise UserError(f"temperature must be > 0 for training (got {cfg.temperature}): GRPO needs "
                        f"sampled, "
                        f"different completions and scores them at that temperature.")
    if min(cfg.max_steps, cfg.prompts_per_step, cfg.micro_batch_size, cfg.num_iterations) < 1:
        raise UserError("max_steps, prompts_per_step, micro_batch_size and num_iterations must "
                        "each be >= 1.")
    if cfg.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise UserError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, not {cfg.loss_type!r}.")
    if cfg.importance_sampling_level not in ("token", "sequence"):
        raise UserError(f"importance_sampling_level must be token or sequence, not "
                        f"{cfg.importance_sampling_level!r}.")
    if cfg.prompts_per_step % dist.world_size():
        raise UserError(f"prompts_per_step={cfg.prompts_per_step} does not divide among "
                        f"{dist.world_size()} processes (each takes whole prompt groups); pass a "
                        f"multiple of {dist.world_size()}.")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise UserError(f"save_total_limit must be >= 1 or none (keep every checkpoint), not "
                        f"{cfg.save_total_limit}.")


def train_grpo(policy, dataset: list[dict], rollout_fn: Callable, reward_fn, cfg: GRPOConfig,
               out_dir: str, *, weights: list[float] | None = None,
               resume: bool | None = None, on_step: Callable | None = None) -> dict:
    """GRPO on `dataset` (a list of examples).

    rollout_fn(policy, examples, cfg) -> list[Rollout], G per example, grouped.
    reward_fn(group: list[Rollout], example) -> one {term: value} per rollout, with the total
      under "reward" (the other terms are logged separately); or a list of such functions,
      combined with cfg.reward_weights.
    weights: optional per-example sampling weights (e.g. LRAS difficulty).
    resume: continue from the latest complete checkpoint in out_dir (an error if there is none,
      or if its settings differ from cfg's beyond MAY_CHANGE_ON_RESUME; a run already at
      max_steps is left as it is); None = cfg.resume. Without it, checkpoints of an earlier run
      in out_dir are an error (cfg.overwrite_output_dir: deleted).
    on_step(step, rollouts, rewards): a hook for samples / trajectory pages.
    pi_ref is the policy at the start of the run (before any resume): `Policy.frozen_reference`.
    """
    check_config(cfg)
    # the ranks draw each step's prompts by index from the same list
    dist.require_same_on_every_rank([[str(e.get("id", i)) for i, e in enumerate(dataset)],
                                     weights], "The GRPO datasets")
    resume = cfg.resume if resume is None else resume
    if resume and cfg.overwrite_output_dir:
        raise UserError("--resume continues the run in --out and --overwrite_output_dir deletes "
                        "its checkpoints; pass one of them.")
    if not resume:
        fresh_out(out_dir, cfg.overwrite_output_dir)
    with policy.frozen_reference():
        return _train_grpo(policy, dataset, rollout_fn, reward_fn, cfg, out_dir, weights, resume,
                           on_step)


def _train_grpo(policy, dataset, rollout_fn, reward_fn, cfg, out_dir, weights, resume,
                on_step) -> dict:
    G = cfg.num_generations
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("No trainable parameters: load the policy with lora=True.")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    start = 0
    if resume:
        ck = resume_from(out_dir)
        state = read_state(ck)
        check_resume_args(state.get("args"), asdict(cfg), ck)
        check_world_size(state, ck)
        start = state["step"]
        if start > cfg.max_steps:
            raise UserError(f"--resume: {ck} is past max_steps={cfg.max_steps}; pass "
                            f"--max_steps {start} or more.")
        summary_path = os.path.join(out_dir, "summary.json")
        if start == cfg.max_steps and os.path.isfile(summary_path):   # the run finished
            print(f"[grpo] {ck}: already at max_steps={cfg.max_steps}; nothing to do")
            with open(summary_path, encoding="utf-8") as f:
                return json.load(f)
        load_checkpoint(policy, opt, sched, ck, state)
        print(f"[grpo] resumed from {ck} at step {start}")
    log = RunLog(out_dir, resume=resume and start > 0)
    log.drop_from(start)  # steps the interrupted run logged after its last checkpoint
    policy.model.train()
    W = dist.world_size()
    if W > 1:
        n = cfg.prompts_per_step // W
        print(f"[grpo] {W} processes: each takes {n} of the {cfg.prompts_per_step} prompts per "
              f"step (x G={G}: {n * G} of {cfg.prompts_per_step * G} rollouts); gradients "
              f"averaged across processes; sampling seeds "
              f"{dist.describe(cfg.seed)['sampling_seeds']}")
    # a run stopped after its last checkpoint but before its summary: the last logged step
    last = {k: v for k, v in log.history[-1].items() if k != "step"} if log.history else {}
    for step in log.bar(range(start, cfg.max_steps), desc="grpo", initial=start,
                        total=cfg.max_steps):
        t0 = time.perf_counter()
        examples = [dataset[i] for i in sample_prompts(len(dataset), cfg.prompts_per_step, step,
                                                       cfg.seed, weights)]
        examples = dist.shard(examples)            # this rank's whole prompt groups (all: W = 1)
        rollouts = rollout_fn(policy, examples, cfg)                     # B_r = its prompts x G
        t_gen = dist.all_reduce([time.perf_counter() - t0], "max")[0]

        local_terms = score_groups(reward_fn, rollouts, examples, G, cfg.reward_weights)
        terms = dist.gather_in_order(local_terms)  # the whole batch's, in prompt order
        lo = dist.shard_bounds(cfg.prompts_per_step)[0] * G    # this rank's first rollout
        rewards = torch.tensor([t["reward"] for t in terms], dtype=torch.float)  # (B,)
        if not torch.isfinite(rewards).all():
            raise FloatingPointError(f"Step {step}: a reward is NaN/inf; check the reward "
                                     f"function.")
        advantages = group_advantages(rewards, G, cfg.scale_rewards)     # (B,)
        zero_std = (rewards.view(-1, G).std(1) < 1e-6)                   # (B/G,)
        keep = torch.ones(len(rewards), dtype=torch.bool)                  # (B,)
        if cfg.drop_zero_std_groups:
            keep = (~zero_std).repeat_interleave(G)
        idx = [i - lo for i in keep.nonzero().flatten().tolist()   # kept, of this rank's
               if lo <= i < lo + len(rollouts)]
        if keep.any():   # every rank updates (collectives inside) when any rollout is kept
            stats, t_lp, t_bw = update(policy, opt, sched, params, cfg, rollouts, idx,
                                       advantages[lo: lo + len(rollouts)], step)
        else:
            stats, t_lp, t_bw = {"skipped": 1}, 0.0, 0.0

        seen = dist.gather_in_order([(r.n_generated, r.truncated, r.answer is None,
                                      r.stop_reason) for r in rollouts])   # the whole batch's
        n_gen = sum(s[0] for s in seen)
        last = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                **reward_stats(terms), **stats,
                "frac_reward_zero_std": zero_std.float().mean().item(),
                "completion_length": n_gen / len(seen),
                "truncated_frac": float(np.mean([s[1] for s in seen])),
                "ended_without_answer": float(np.mean([s[2] for s in seen])),
                **{f"stop/{k}": float(np.mean([s[3] == k for s in seen]))
                   for k in STOP_REASONS},
                "lr": sched.get_last_lr()[0], "time/generate": t_gen, "time/logprob": t_lp,
                "time/backward": t_bw, "tokens_per_s": n_gen / max(t_gen, 1e-9)}
        log.log(last, step)
        if on_step is not None:   # this rank's rollouts (rank 0's are the ones written)
            on_step(step, rollouts, local_terms)
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            # the last one lets a run be extended
            save_checkpoint(policy, opt, sched, step + 1, out_dir, args=asdict(cfg),
                            total_limit=cfg.save_total_limit)
    log.plot(["reward", "kl", "completion_length", "entropy"], title="GRPO")
    if policy.has_adapter and dist.is_main():
        policy.save_adapter(os.path.join(out_dir, "adapter"))
    summary = {"steps": cfg.max_steps, "final": last, "config": asdict(cfg),
               **({"distributed": dist.describe(cfg.seed)} if W > 1 else {})}
    log.summary(summary)
    dist.barrier()   # the adapter is on disk before any rank loads it
    return summary


def global_counts(n_seq: int, n_mbs: int, n_tokens: float) -> list[float]:
    """(sequences, micro-batches, loss tokens) of the whole batch: this rank's, summed over the
    ranks (tests/test_distributed.py breaks this on purpose and watches the update differ)."""
    return dist.all_reduce([n_seq, n_mbs, n_tokens])


def update(policy, opt, sched, params, cfg: GRPOConfig, rollouts, idx, advantages, step):
    """mu optimiser updates on the kept rollouts. Returns (stats, t_logprob, t_backward); every
    statistic is weighted by tokens across micro-batches (clip fractions by sequences under
    GSPO), and `loss` is the loss that was back-propagated.
    Several processes: `idx` are this rank's kept rollouts (possibly none: the rank still joins
    every collective); counts, gradients and statistics are reduced over the ranks."""
    W = dist.world_size()
    mbs = [list(range(s, min(s + cfg.micro_batch_size, len(idx))))
           for s in range(0, len(idx), cfg.micro_batch_size)]
    if idx:
        batch = rollout_batch([rollouts[i] for i in idx], policy.tokenizer)
        batch = {k: v.to(policy.device) for k, v in batch.items()}
        gen_mask = batch["completion_mask"]                              # (B, T)
        mask = gen_mask
        if cfg.mask_truncated_completions:
            trunc = torch.tensor([rollouts[i].truncated for i in idx], device=mask.device)
            mask = mask * (~trunc).float()[:, None]
        adv = advantages[idx].to(policy.device)
        n_local = mask.sum().item()
    else:
        batch, n_local = {}, 0.0
    # the normalisers count the whole batch, all ranks: sequences (grpo, dr_grpo), micro-batches
    # (bnpo), generated tokens (dapo's num_items_in_batch)
    n_seq, n_mbs, n_items = global_counts(len(idx), len(mbs), n_local)
    lp = lambda sub: completion_logprobs(policy.model, sub, cfg.temperature,
                                         cfg.logprob_chunk_tokens)
    t1 = time.perf_counter()
    frozen_tower = not any(p.requires_grad for n,
                           p in policy.model.named_parameters() if "visual" in n)
    feats = (image_features(policy.model, batch) if cfg.vision_once and frozen_tower and idx
             else None)
    with torch.no_grad():   # old (only when mu > 1) and reference log-probs, per micro-batch
        old_lp = [lp(sub_batch(batch, mb, feats))[0]
                  for mb in mbs] if cfg.num_iterations > 1 else None
        ref_lp = None
        if cfg.beta != 0.0:
            with policy.reference():
                ref_lp = [lp(sub_batch(batch, mb, feats))[0] for mb in mbs]
    t_lp = time.perf_counter() - t1
    sampled = [rollouts[i].sample_logps for i in idx]          # None from a scripted sampler
    gap = bool(idx) and all(x is not None for x in sampled)
    samp, gaps = (torch.zeros_like(gen_mask) if idx else None), []  # (B, T) sampler log-probs
    for b, x in enumerate(sampled if gap else []):
        samp[b, :len(x)] = torch.tensor(x, dtype=samp.dtype)
    sums, counts, losses, norms, t_bw = {}, {}, [], [], 0.0
    for it in range(cfg.num_iterations):
        t2 = time.perf_counter()
        step_loss = 0.0
        for j, mb in enumerate(mbs):
            sub = sub_batch(batch, mb, feats)
            logp, ent = lp(sub)
            m = mask[mb]
            loss, st = grpo_loss(logp, logp.detach() if old_lp is None else old_lp[j],
                                 None if ref_lp is None else ref_lp[j], adv[mb], m,
                                 loss_type=cfg.loss_type, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                 max_completion_length=cfg.max_completion_length,
                                 num_items_in_batch=n_items,
                                 importance_sampling_level=cfg.importance_sampling_level)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Step {step}: the loss is {loss.item()}. Lower --learning_rate, check the "
                    f"rewards, or load in float32; the run stops here instead of going on.")
            # micro-batch weights: grpo / dr_grpo average sequences over the whole batch
            # (= TRL's 1/accumulation with equal micro-batches), bnpo gives each micro-batch
            # the same weight (TRL's semantics), dapo already divides by the batch's tokens;
            # x W because average_gradients divides the ranks' sum by W (W = 1: no change)
            w = W * {"grpo": len(mb) / n_seq, "dr_grpo": len(mb) / n_seq,
                     "bnpo": 1.0 / n_mbs, "dapo": 1.0}[cfg.loss_type]
            (loss * w).backward()
            step_loss += (loss * w).item()
            st["entropy"] = masked_mean(ent, m).item()
            n_tok, n_clip = st.pop("_n_tok"), st.pop("_n_clip")
            for k, v in st.items():
                n = n_clip if k.startswith("clip_ratio") else n_tok
                sums[k], counts[k] = sums.get(k, 0.0) + v * n, counts.get(k, 0.0) + n
            if gap and it == 0:  # the sampler's log-prob vs this pass's (before any update)
                gm = gen_mask[mb].bool()
                gaps.append((logp.detach() - samp[mb]).abs()[gm])
        dist.average_gradients(params)   # the mean over ranks = the one-process gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"Step {step}: the gradient norm is {grad_norm}; "
                                     f"lower --learning_rate. The run stops here.")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_bw += time.perf_counter() - t2
        losses.append(dist.all_reduce([step_loss])[0] / W)   # the mean of the ranks' losses
        norms.append(grad_norm.item())
    # token-weighted over every rank's micro-batches: sums and counts reduced, in a fixed order
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    keys += (["kl"] if cfg.beta != 0.0 else []) + ["entropy"]
    red = dist.all_reduce([sums.get(k, 0.0) for k in keys] + [counts.get(k, 0.0) for k in keys])
    sums, counts = dict(zip(keys, red[:len(keys)])), dict(zip(keys, red[len(keys):]))
    stats = {k: sums[k] / max(counts[k], 1.0) for k in sums}
    stats.update(loss=float(np.mean(losses)), grad_norm=float(np.mean(norms)),
                 **({f"grad_norm/update_{u + 1}": g for u, g in enumerate(norms)} if len(norms) > 1
                    else {}),
                 skipped=0)
    d = torch.cat(gaps) if gaps else torch.zeros(0)  # like TRL's sampling_logp_difference (vLLM)
    d_sum, d_n = dist.all_reduce([d.sum().item(), d.numel()])
    d_max = dist.all_reduce([d.max().item() if d.numel() else 0.0], "max")[0]
    if d_n:
        stats["sampling/sampling_logp_difference/mean"] = d_sum / d_n
        stats["sampling/sampling_logp_difference/max"] = d_max
    return stats, t_lp, t_bw
