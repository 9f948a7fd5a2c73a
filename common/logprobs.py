"""Per-token log-probs of completions without (B, T, V) float32 logits (used by GRPO and SFT).

The decoder runs once; the lm_head + logsumexp run over chunks of completion positions, each
under activation checkpointing, so at most (B, chunk, V) logits exist at a time.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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
        inputs = {k: v for k,
                  v in inputs.items()
                  if k not in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    hidden = body(**inputs, use_cache=False).last_hidden_state           # (B, P+T, H)
    # (B, T, H): predicts tokens P..P+T-1
    h = hidden[:, -T - 1: -1]
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

