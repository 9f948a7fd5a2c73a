# Run: pytest tests/test_bench.py -q      (CPU, ~1 minute; correctness only, no timing assertions)
"""The optimised paths of common/grpo.py give the plain path's numbers on the tiny preset:
chunked log-probs == full-logits log_softmax (chunk sizes, images, 4-bit, with gradients);
micro-batched loss and gradients == full batch for each loss_type; `python -m common.bench` runs."""
import json
import os

import pytest
import torch

from common import grpo as grpo_mod
from common.bench import Args, PATCHES, noise_image, prompt_text, qwen25vl_config, random_size
from common.grpo import completion_logprobs, unwrap
from common.models import build_tiny_tokenizer, load_policy
from common.rollout import rollout_batch, run_rollouts
from helpers import run_script



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core box, 2 OpenMP threads make tiny ops ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_policy("tiny", seed=0)


def sampled_batch(policy, image_size=0, G=3, new=7):
    """Real rollouts (left-padded prompts of different lengths, ragged completions) -> batch."""
    tok = policy.tokenizer
    texts = [prompt_text(tok, n, seed=n) for n in (5, 11)]

    def messages(ex):
        if not image_size:
            return [{"role": "user", "content": ex["text"]}]
        return [{"role": "user", "content": [{"type": "image", "image": noise_image(image_size, ex["seed"])},
                                             {"type": "text", "text": ex["text"]}]}]
    torch.manual_seed(1)
    rs = run_rollouts(policy, [{"text": t, "seed": i} for i, t in enumerate(texts)], num_generations=G,
                      make_messages=messages, max_new_tokens=new, temperature=1.0)
    for i, r in enumerate(rs):  # ragged completions, one with a 0-mask (observation-like) stretch
        r.ids, r.mask = r.ids[: 2 + i % new], r.mask[: 2 + i % new]
        if len(r.mask) > 3 and i == 1:
            r.mask[1] = 0
    return rollout_batch(rs, tok)


def plain_logprobs(model, batch, temperature):
    """The reference path: full (B, L, V) logits, log_softmax, gather."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "n_images")}
    T = batch["completion_mask"].shape[1]
    logits = unwrap(model)(**inputs, use_cache=False).logits[:, -T - 1:-1].float() / temperature  # (B, T, V)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, batch["input_ids"][:, -T:, None]).squeeze(-1)                       # (B, T)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def check_equal(policy, batch, chunks=(1, 3, 7, 4096), temperature=0.7, atol=1e-5):
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        ref_lp, ref_ent = plain_logprobs(policy.model, batch, temperature)
        for c in chunks:
            lp, _ = completion_logprobs(policy.model, batch, temperature, chunk_tokens=c)
            with torch.enable_grad():  # entropies are computed only in grad passes
                ent = completion_logprobs(policy.model, batch, temperature, chunk_tokens=c)[1]
            assert lp.shape == ref_lp.shape
            torch.testing.assert_close(lp[mask], ref_lp[mask], atol=atol, rtol=1e-4)
            torch.testing.assert_close(ent[mask], ref_ent[mask], atol=atol, rtol=1e-4)


def test_chunked_logprobs_equal_plain_text(tiny):
    check_equal(tiny, sampled_batch(tiny))


def test_chunked_logprobs_equal_plain_with_images(tiny):
    batch = sampled_batch(tiny, image_size=56)
    assert "pixel_values" in batch and batch["image_grid_thw"].shape[0] == 6
    check_equal(tiny, batch)


def test_chunked_logprobs_equal_plain_4bit():
    policy = load_policy("tiny", load_in_4bit=True, seed=0)
    assert policy.extra["load_in_4bit"]
    check_equal(policy, sampled_batch(policy), chunks=(2, 4096), atol=1e-4)


def test_chunked_logprob_gradients_equal_plain(tiny):
    """With gradients on, the checkpointed chunks give the plain path's LoRA gradients."""
    batch = sampled_batch(tiny, image_size=56)
    mask = batch["completion_mask"]
    params = tiny.trainable_parameters()
    for p in params:  # non-zero LoRA B, so the adapter's gradients are not trivially zero
        torch.nn.init.normal_(p, std=0.02)
    grads = []
    for fn in (lambda: plain_logprobs(tiny.model, batch, 1.0)[0],
               lambda: completion_logprobs(tiny.model, batch, 1.0, chunk_tokens=5)[0]):
        tiny.model.zero_grad(set_to_none=True)
        ((fn() * mask).sum() / mask.sum()).backward()
        grads.append([p.grad.clone() for p in params])
    tiny.model.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# micro-batches vs the full batch through the real loop: tests/test_grpo_loop.py


# ---------------------------------------------------------------------------------------------
# the benchmark itself
# ---------------------------------------------------------------------------------------------
def test_random_config_matches_published_table():
    tok = build_tiny_tokenizer()
    for size, (hidden, layers, heads, kv, vocab, tied) in {"3b": (2048, 36, 16, 2, 151936, True),
                                                          "7b": (3584, 28, 28, 4, 152064, False)}.items():
        cfg = qwen25vl_config(size, tok)
        t, v = cfg.text_config, cfg.vision_config
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, cfg.tie_word_embeddings) == (hidden, layers, heads, kv, vocab, tied)
        assert (v.depth, v.hidden_size, v.out_hidden_size, v.fullatt_block_indexes) == (32, 1280, hidden, [7, 15, 23, 31])
        assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
        small = qwen25vl_config(size, tok, num_layers=2).vision_config
        assert small.depth == 2 and small.fullatt_block_indexes == [1]
    assert random_size("qwen2.5-vl-7b-random") == "7b" and random_size("Qwen/Qwen2.5-VL-3B-Instruct") == "3b"
    assert random_size("tiny") is None
    assert Args().model == "tiny"


def test_bench_runs_and_ends_with_json(tmp_path):
    cmd = ["common.bench", "--model", "tiny", "--steps", "1", "--warmup", "0",
           "--num_generations", "2", "--max_new_tokens", "4", "--prompt_tokens", "8", "--image_size", "56",
           "--beta", "0.04", "--threads", "1", "--out", str(tmp_path)]
    out = run_script(*cmd)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ours"]["gen_tokens"] == 2 * 4          # forced: exactly max_new_tokens per completion
    assert res["ours"]["step_s"] > 0 and res["image_size"] == 56
    assert os.path.exists(tmp_path / "result.json")


def test_bench_bad_request_one_sentence(tmp_path):
    out = run_script("common.bench", "--model", "tiny", "--num_generations", "1", "--out", str(tmp_path),
                     timeout=120)
    assert out.returncode != 0 and "num_generations" in out.stderr


def test_logp_chunk_equals_log_softmax():
    """common.grpo._logp_chunk (logit - logsumexp, entropy under no_grad) gives the same log-probs,
    entropies and gradients as a plain log_softmax; in no-grad passes it skips the entropy."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    tg = torch.randint(0, 50, (3, 5), generator=g)
    lp, ent = grpo_mod._logp_chunk(head, h, tg, 0.7)
    logp_all = (head(h) / 0.7).log_softmax(-1)                         # (3, 5, 50)
    ref_lp = logp_all.gather(-1, tg[..., None])[..., 0]
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1).detach())
    (g1,) = torch.autograd.grad(lp.sum(), h, retain_graph=True)
    (g2,) = torch.autograd.grad(ref_lp.sum(), h)
    torch.testing.assert_close(g1, g2)
    with torch.no_grad():
        lp0, ent0 = grpo_mod._logp_chunk(head, h, tg, 0.7)
    torch.testing.assert_close(lp0, ref_lp.detach())
    assert (ent0 == 0).all()
    assert set(PATCHES) == {"head_no_checkpoint"}
