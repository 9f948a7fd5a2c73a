# Run: pytest -m gpu tests/test_gpu.py -q      (needs CUDA; skipped elsewhere; tests/gpu_check.sh
# runs it)
# GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py -q   (the same logic on a CPU: a check of the
# tests themselves, not of CUDA; the CPU paths have their own tests in test_core.py / test_bench.py)
"""The CUDA path of the shared core on the tiny preset, through the public API
(common.models.load_policy, Policy.reference, common.grpo): NF4 load, LoRA-only gradients, the
reference pass, GRPO steps with an image,
chunked log-probs equal full log-probs, and resume that restores the CUDA RNG."""
import os

import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint, save_checkpoint
from common.grpo import GRPOConfig, train_grpo
from common.logprobs import completion_logprobs, unwrap
from common.rewards import per_rollout
from common.models import LORA_TARGETS, load_policy
from common.rollout import rollout_batch, run_rollouts
from common.runlog import read_jsonl

DEV = os.environ.get("GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                 reason="needs CUDA")]


def _img(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _messages(ex):
    c = ([{"type": "image", "image": ex["img"]}] if ex.get("img") is not None
         else []) + [{"type": "text", "text": ex["q"]}]
    return [{"role": "user", "content": c}]


DATA = [{"q": "What is in the image?", "img": _img(64, 48)}, {"q": "Say B"},
        {"q": "Name a city", "img": _img(40, 90, 1)}]
REWARD = per_rollout(lambda r, ex: {"reward": float(sum(r.ids) % 7) / 7})


def _rollout_fn(pol, exs, cfg):
    return run_rollouts(pol, exs, num_generations=cfg.num_generations, make_messages=_messages,
                        max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)


def _batch(policy, new=6, G=2):
    """Sampled rollouts (an image prompt and a text prompt, left-padded) -> a batch on the
    device."""
    torch.manual_seed(1)
    rs = run_rollouts(policy, DATA[:2], num_generations=G, make_messages=_messages,
                      max_new_tokens=new)
    return {k: v.to(policy.device) for k, v in rollout_batch(rs, policy.tokenizer).items()}


def _ids(policy, text="some words here, and more words"):
    return torch.tensor([policy.tokenizer.encode(text)], device=policy.device)


def _randomise_lora_B(policy, std=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, q in policy.model.named_parameters():
            if "lora_B" in n:
                q.copy_(torch.randn(q.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------
def test_nf4_load_puts_the_llm_linears_in_4bit_on_the_device():
    import bitsandbytes as bnb
    p = load_policy("tiny", load_in_4bit=True, device=DEV)
    assert p.device.type == DEV and p.extra["load_in_4bit"]
    base = unwrap(p.model)
    llm = [(n, m) for n,
           m in base.named_modules() if "language_model" in n and n.split(".")[-1] in LORA_TARGETS]
    assert llm
    for n, m in llm:   # peft wraps each target; its base layer is the NF4 one
        lin = m.base_layer if hasattr(m, "base_layer") else m
        assert isinstance(lin, bnb.nn.Linear4bit), n
        # double quant
        assert lin.weight.quant_state.quant_type == "nf4" and lin.weight.quant_state.nested, n
        assert lin.weight.device.type == DEV and lin.weight.dtype == torch.uint8, n
        assert lin.compute_dtype == (torch.bfloat16 if DEV == "cuda" else torch.float32), n
    # the vision tower and lm_head stay in the compute dtype
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n,
                   m in base.named_modules() if "visual" in n)
    assert not isinstance(base.get_output_embeddings(), bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = p.model(input_ids=_ids(p)).logits
    assert logits.device.type == DEV and torch.isfinite(logits).all()


def test_only_lora_parameters_get_gradients():
    p = load_policy("tiny", load_in_4bit=True, gradient_checkpointing=True, device=DEV)
    _randomise_lora_B(p, 0.05)  # non-zero B, so lora_A's gradient is not trivially zero
    p.model.train()
    batch = _batch(p)
    lp, _ = completion_logprobs(p.model, batch)
    (lp * batch["completion_mask"]).sum().backward()
    with_grad = {n for n, q in p.model.named_parameters() if q.grad is not None}
    lora = {n for n, q in p.model.named_parameters() if "lora_" in n}
    assert with_grad == lora, sorted(with_grad ^ lora)[:5]
    assert all(p.model.get_parameter(n).grad.abs().sum() > 0 for n in lora)
    assert all(p.model.get_parameter(n).grad.device.type == DEV for n in lora)
    assert not any("visual" in n for n in lora)          # the vision tower stays frozen


def test_reference_is_adapter_off_for_a_fresh_lora():
    """A fresh LoRA (lora_B = 0) is the base model: a run keeps the adapter-off path as pi_ref."""
    p = load_policy("tiny", load_in_4bit=True, device=DEV)
    ids = _ids(p)
    with torch.no_grad():
        start = p.model(input_ids=ids).logits
    with p.frozen_reference():
        assert p.reference_adapter is None                  # no copy made: adapter off is pi_ref
        opt = torch.optim.SGD(p.trainable_parameters(), lr=1.0)
        p.model(input_ids=ids).logits.float().square().mean().backward()
        opt.step()
        with torch.no_grad():
            tuned = p.model(input_ids=ids).logits
            with p.reference():
                ref = p.model(input_ids=ids).logits
            with p.base():
                off = p.model(input_ids=ids).logits
    assert not torch.equal(tuned, start)                   # the update moved the policy
    # pi_ref = the base = the fresh policy
    assert torch.equal(ref, off) and torch.equal(ref, start)


def test_reference_from_a_loaded_adapter_kl_zero_then_positive(tmp_path):
    """RL from a saved adapter: pi_ref = a frozen copy of it for the run, so KL is exactly 0 at step
    0 and
    > 0 after an update; the copy does not move, does not train, and is gone after the run."""
    p = load_policy("tiny", seed=3, device=DEV)
    _randomise_lora_B(p)
    p.save_adapter(str(tmp_path / "sft"))
    q = load_policy("tiny", seed=3, adapter=str(tmp_path / "sft"), load_in_4bit=True, device=DEV)
    ids = _ids(q)
    with torch.no_grad():
        start = q.model(input_ids=ids).logits
        with q.base():
            base = q.model(input_ids=ids).logits
    # the adapter is not the base
    assert not torch.allclose(start.float(), base.float(), atol=1e-2)
    seen = {}

    def spy(pol, exs, cfg):  # inside the run: reference() is the starting adapter, frozen
        with torch.no_grad(), pol.reference():
            seen.setdefault("ref", []).append(pol.model(input_ids=ids).logits)
        seen["trainable"] = [n for n, x in pol.model.named_parameters() if x.requires_grad]
        return _rollout_fn(pol, exs, cfg)
    cfg = GRPOConfig(max_steps=2, num_generations=3, prompts_per_step=2, max_completion_length=6,
                     beta=0.1, learning_rate=5e-2)
    train_grpo(q, DATA, spy, REWARD, cfg, str(tmp_path / "rl"))
    kl = [r["kl"] for r in read_jsonl(str(tmp_path / "rl" / "metrics.jsonl"))]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl
    # pi_ref did not move
    assert len(seen["ref"]) == 2 and all(torch.equal(r, start) for r in seen["ref"])
    assert seen["trainable"] and all(".default." in n for n in seen["trainable"])
    assert "reference" not in q.model.peft_config                       # removed after the run


def test_grpo_steps_nf4_gc_with_images(tmp_path):
    p = load_policy("tiny", load_in_4bit=True, gradient_checkpointing=True, device=DEV)
    before = {n: q.detach().clone() for n, q in p.model.named_parameters() if q.requires_grad}
    frozen = {n: q.detach().clone() for n,
              q in p.model.named_parameters() if "visual" in n and q.dtype.is_floating_point}
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = GRPOConfig(max_steps=2, num_generations=4, prompts_per_step=2, max_completion_length=12,
                     beta=0.04, num_iterations=2, micro_batch_size=3, learning_rate=1e-3)
    s = train_grpo(p, DATA, _rollout_fn, REWARD, cfg, str(tmp_path))
    f = s["final"]
    for k in ("loss", "kl", "entropy", "grad_norm", "reward"):
        assert f[k] == f[k] and abs(f[k]) != float("inf"), (k, f[k])   # finite
    after = dict(p.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)   # LoRA moved
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)        # the vision tower did not
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    if DEV == "cuda":
        print(f"tiny NF4 GRPO step peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def _plain_logprobs(model, batch):
    """The reference path: the model's full (B, L, V) logits, log_softmax, gather."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "n_images")}
    T = batch["completion_mask"].shape[1]
    logits = unwrap(model)(**inputs, use_cache=False).logits[:, -T - 1:-1].float()     # (B, T, V)
    # (B, T)
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][:, -T:, None]).squeeze(-1)


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4-bf16"])
def test_chunked_logprobs_equal_full_logprobs(nf4):
    p = load_policy("tiny", load_in_4bit=nf4, device=DEV, dtype=None if nf4 else torch.float32)
    # log-probs that vary from token to token, so a wrong position would show
    _randomise_lora_B(p, 0.5)
    batch = _batch(p, new=9, G=3)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        full = _plain_logprobs(p.model, batch)
        spread = full[mask].std().item()
        # bf16 logits round at ~2^-8 of their size: compare against the spread of the log-probs
        # themselves
        tol = 1e-4 if not nf4 else 0.03 * spread + 1e-3
        shifted = full.roll(1, dims=1)
        assert (shifted - full)[mask].abs().max() > 10 * tol       # this comparison can fail
        for chunk in (1, 4, 7, 4096):
            lp, _ = completion_logprobs(p.model, batch, chunk_tokens=chunk)
            err = (lp - full)[mask].abs().max().item()
            assert err <= tol, (chunk, err, tol)
    if nf4:
        return
    # and the same LoRA gradients through the checkpointed chunks
    params = p.trainable_parameters()
    grads = []
    for fn in (lambda: _plain_logprobs(p.model, batch),
               lambda: completion_logprobs(p.model, batch, chunk_tokens=5)[0]):
        p.model.zero_grad(set_to_none=True)
        ((fn() * mask).sum() / mask.sum()).backward()
        grads.append([q.grad.clone() for q in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_checkpoint_restores_the_device_rng(tmp_path):
    """Sampling on CUDA draws from the CUDA generator: a checkpoint must store and restore it, or a
    resumed
    run samples different completions than the uninterrupted one."""
    p = load_policy("tiny", device=DEV)
    opt = torch.optim.AdamW(p.trainable_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(11)                                   # seeds the CPU and every CUDA generator
    torch.rand(3, device=DEV)
    path = save_checkpoint(p, opt, sched, 1, str(tmp_path))
    expected = torch.rand(5, device=DEV)                    # what the uninterrupted run draws next
    # a fresh process: other generator states
    torch.manual_seed(999)
    load_checkpoint(p, opt, sched, path)
    assert torch.equal(torch.rand(5, device=DEV), expected)


def test_resume_takes_the_same_next_step(tmp_path):
    """An interrupted and resumed run logs the uninterrupted run's step and ends with its LoRA
    weights
    (fp32 and no 4-bit, so that the only difference a resume can make is the restored state)."""
    cfg = GRPOConfig(max_steps=3, num_generations=2, prompts_per_step=2, max_completion_length=6,
                     learning_rate=1e-2, beta=0.04, save_steps=2, seed=5)

    def run(out, max_steps, fresh_seed=None):
        p = load_policy("tiny", seed=1, device=DEV, dtype=torch.float32)
        if fresh_seed is not None:
            torch.manual_seed(fresh_seed)
        c = GRPOConfig(**{**cfg.__dict__, "max_steps": max_steps})
        train_grpo(p, DATA, _rollout_fn, REWARD, c, out, resume=fresh_seed is not None)
        return p, read_jsonl(os.path.join(out, "metrics.jsonl"))

    full, full_log = run(str(tmp_path / "a"), 3)
    run(str(tmp_path / "b"), 2)                                        # "interrupted" after step 2
    os.remove(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    resumed, b_log = run(str(tmp_path / "b"), 3, fresh_seed=1234)      # a fresh process resumes
    assert [r["step"] for r in b_log] == [0, 1, 2]
    for k in ("completion_length", "reward", "loss", "kl"):
        assert b_log[2][k] == pytest.approx(full_log[2][k], rel=1e-4, abs=1e-6), k
    fb = dict(resumed.model.named_parameters())
    for n, q in full.model.named_parameters():
        if q.requires_grad:
            torch.testing.assert_close(q, fb[n], atol=1e-5, rtol=1e-4)


def _near_tie_or_equal(p, plain, fast, enc, tol):
    """Greedy rows of the plain and the fast path agree up to their first difference, and there
    the two tokens are a near tie under the model (log-probs within `tol`): what bf16 rounding
    in a differently shaped computation (shared-prefix KV, merged LoRA) may flip."""
    from common.rollout import Rollout
    for a, b in zip(plain, fast):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            assert len(a) == len(b)
            continue
        r = Rollout(prompt_ids=enc.input_ids, ids=a[:k] + [a[k]], mask=[1] * (k + 1),
                    pixel_values=[enc.pixel_values], grids=[enc.image_grid_thw])
        batch = {key: v.to(p.device) for key, v in rollout_batch([r], p.tokenizer).items()}
        inputs = {key: v for key, v in batch.items() if key not in ("completion_mask", "n_images")}
        with torch.no_grad():
            logp = unwrap(p.model)(**inputs, use_cache=False).logits[0, -2].float().log_softmax(-1)
        assert abs(logp[a[k]] - logp[b[k]]).item() <= tol, (k, a[k], b[k], tol)


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4-bf16"])
def test_fast_generation_matches_plain_in_bf16(nf4):
    """common.generate.CachedGenerator (shared-prefix KV, merged LoRA with a bf16 base) against
    the plain HF generate, greedy, in bfloat16: the same tokens up to a near tie, and the
    log-probs it computed while decoding equal the training pass's within bf16 rounding: 4 units
    in the last place (2^-8 relative) of the largest logit, for the roundings of the merged
    weights, the activations, the logits and their log-softmax (the merged bf16 weights alone
    move log-probs by ~1 ulp of the logits)."""
    from common.chat import encode
    from common.generate import CachedGenerator, generate_ids
    from common.rollout import Rollout
    p = load_policy("tiny", load_in_4bit=nf4, device=DEV, dtype="bfloat16", seed=0)
    _randomise_lora_B(p, 0.5)                   # a non-zero adapter: merging it changes weights
    if not nf4:                                 # larger weights: greedy text that does not repeat
        with torch.no_grad():
            for n, q in unwrap(p.model).named_parameters():
                if q.dim() >= 2 and "visual" not in n and "lora_" not in n:
                    q.mul_(8.0)
    enc = encode(p.tokenizer, p.image_processor, _messages(DATA[0]), add_generation_prompt=True)
    G, n = 3, 12
    plain = generate_ids(p, [enc] * G, max_new_tokens=n, temperature=0)
    gen = CachedGenerator()
    fast = gen(p, [enc] * G, max_new_tokens=n, temperature=0)
    rs = [Rollout(prompt_ids=enc.input_ids, ids=list(r), mask=[1] * len(r),
                  pixel_values=[enc.pixel_values], grids=[enc.image_grid_thw]) for r in fast]
    batch = {k: v.to(p.device) for k, v in rollout_batch(rs, p.tokenizer).items()}
    mask = batch["completion_mask"].bool()
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "n_images")}
    with torch.no_grad():
        lp, _ = completion_logprobs(p.model, batch)
        z = unwrap(p.model)(**inputs, use_cache=False).logits[:, -mask.shape[1] - 1:-1]
    tol = 4 * 2 ** -8 * z[mask].abs().max().item()
    raw = torch.zeros_like(lp)
    for i, x in enumerate(gen.raw_logps):
        raw[i, :len(x)] = torch.tensor(x, device=raw.device)
    assert len(set(fast[0])) > 3                             # not one repeated token
    err = (raw - lp)[mask].abs().max().item()
    print(f"max |decode - training| log-prob {err:.4f}, tolerance {tol:.4f}")
    assert err <= tol, ((raw - lp)[mask], tol)
    _near_tie_or_equal(p, plain, fast, enc, tol)
