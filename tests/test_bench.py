# Run: pytest tests/test_bench.py -q      (CPU, ~1 minute; correctness only, no timing assertions)
"""The optimised paths of common/grpo.py give the plain path's numbers on the tiny preset:
chunked log-probs == full-logits log_softmax (chunk sizes, images, 4-bit, with gradients);
micro-batched loss and gradients == full batch for each loss_type; `python -m common.perf.bench`
runs."""
import json
import os

import pytest
import torch

from common import grpo as grpo_mod
from common import logprobs as logprobs_mod
from common.cli import build_parser, given_flags
from common.perf.bench import (AGENT_GRAMMAR, Args, ScriptedAgent, agent_tools, estimate_args,
                               forced_generate, noise_image,
                          prompt_text, qwen25vl_config, random_size, summarise)
from common.grpo import GRPOConfig, train_grpo
from common.logprobs import completion_logprobs, unwrap
from common.models import build_tiny_tokenizer, load_policy
from common.rollout import Rollout, rollout_batch, run_rollouts
from helpers import run_script, scripted_rollouts


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


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
        return [{"role": "user",
                 "content": [{"type": "image", "image": noise_image(image_size, ex["seed"])},
                                             {"type": "text", "text": ex["text"]}]}]
    torch.manual_seed(1)
    rs = run_rollouts(policy, [{"text": t, "seed": i} for i, t in enumerate(texts)],
                      num_generations=G,
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
    # (B, T, V)
    logits = unwrap(model)(**inputs, use_cache=False).logits[:, -T - 1:-1].float() / temperature
    logp_all = logits.log_softmax(-1)
    # (B, T)
    logp = logp_all.gather(-1, batch["input_ids"][:, -T:, None]).squeeze(-1)
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


# ---------------------------------------------------------------------------------------------
# micro-batches vs the full batch, through the real loop (train_grpo)
# ---------------------------------------------------------------------------------------------


def loop_gradient(policy, lengths, loss_type, micro_batch_size, beta=0.1):
    """The summed LoRA gradient train_grpo builds before clipping, for a fixed batch."""
    captured = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        captured["grads"] = [p.grad.clone() for p in params]
        return real_clip(params, max_norm)
    losses = []
    real_loss = grpo_mod.grpo_loss

    def loss_spy(*a, **k):
        loss, st = real_loss(*a, **k)
        losses.append(loss.item())
        return loss, st
    G = len(lengths)
    cfg = GRPOConfig(learning_rate=0.0, num_generations=G, prompts_per_step=1, max_steps=1,
                     beta=beta,
                     loss_type=loss_type, max_completion_length=max(lengths),
                     micro_batch_size=micro_batch_size,
                     logprob_chunk_tokens=7)
    rollouts = scripted_rollouts(lengths)
    rewards = [float(i % 3) for i in range(G)]
    torch.nn.utils.clip_grad_norm_, grpo_mod.grpo_loss = capture, loss_spy
    try:
        train_grpo(policy, [{"id": 0}], lambda p, ex, c: [Rollout(**vars(r)) for r in rollouts],
                   lambda group, ex: [{"reward": r} for r in rewards], cfg, out_dir=policy._tmp)
    finally:
        torch.nn.utils.clip_grad_norm_, grpo_mod.grpo_loss = real_clip, real_loss
    return captured["grads"], losses


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    policy = load_policy("tiny", seed=0)
    g = torch.Generator().manual_seed(3)
    for p in policy.trainable_parameters():   # policy != reference, so the KL term has a gradient
        p.data = torch.randn(p.shape, generator=g) * 0.05
    policy._tmp = str(tmp_path_factory.mktemp("grpo"))
    return policy


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_microbatch_gradients_equal_full_batch_equal_tokens(tiny_lora, loss_type):
    lengths = [5, 5, 5, 5]   # equal generated tokens per micro-batch of 2
    full, _ = loop_gradient(tiny_lora, lengths, loss_type, micro_batch_size=4)
    micro, _ = loop_gradient(tiny_lora, lengths, loss_type, micro_batch_size=2)
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# bnpo (TRL's): test_grpo_loop.py
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_microbatch_gradients_equal_full_batch_ragged(tiny_lora, loss_type):
    lengths = [3, 9, 6, 2, 8, 5]   # ragged completions and micro-batches of 4 + 2
    full, _ = loop_gradient(tiny_lora, lengths, loss_type, micro_batch_size=6)
    micro, _ = loop_gradient(tiny_lora, lengths, loss_type, micro_batch_size=4)
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# test_microbatch_loss_sums_to_full_batch_loss (it re-implemented the loop's weights, so it could
# not fail) is replaced by tests/test_grpo_loop.py, which runs train_grpo itself.


# ---------------------------------------------------------------------------------------------
# the benchmark itself
# ---------------------------------------------------------------------------------------------
def test_random_config_matches_published_table():
    tok = build_tiny_tokenizer()
    for size, (hidden, layers, heads, kv, vocab, tied) in {"3b": (2048, 36, 16, 2, 151936, True),
                                                          "7b": (3584, 28, 28, 4, 152064,
                                                                 False)}.items():
        cfg = qwen25vl_config(size, tok)
        t, v = cfg.text_config, cfg.vision_config
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, cfg.tie_word_embeddings) == (hidden, layers, heads, kv, vocab, tied)
        assert (v.depth, v.hidden_size, v.out_hidden_size,
                v.fullatt_block_indexes) == (32, 1280, hidden, [7, 15, 23, 31])
        assert t.rope_parameters["mrope_section"] == [16, 24,
                                                      24] and t.rope_parameters["rope_theta"] == 1e6
        small = qwen25vl_config(size, tok, num_layers=2).vision_config
        assert small.depth == 2 and small.fullatt_block_indexes == [1]
    assert (random_size("qwen2.5-vl-7b-random") == "7b"
            and random_size("Qwen/Qwen2.5-VL-3B-Instruct") == "3b")
    assert random_size("tiny") is None
    assert Args().model == "tiny"


def test_bench_runs_and_ends_with_json(tmp_path):
    cmd = ["common.perf.bench", "--model", "tiny", "--steps", "1", "--warmup", "0",
           "--num_generations", "2", "--max_new_tokens", "4", "--prompt_tokens", "8",
           "--image_size", "56",
           "--beta", "0.04", "--threads", "1", "--out", str(tmp_path)]
    out = run_script(*cmd)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # forced: exactly max_new_tokens per completion
    assert res["ours"]["gen_tokens"] == 2 * 4
    assert (res["ours"]["step_s"] > 0 and res["args"]["image_size"] == 56
            and res["args"]["workload"] == "image")
    # prompt text + image tokens + completion, per row
    assert res["ours"]["train_tokens"] > 2 * (8 + 4)
    assert 0 < res["limits"]["decode_fraction"] and res["limits"]["bandwidth_gbps"] > 0
    assert os.path.exists(tmp_path / "result.json")
    # the step's peak over the memory before it (CPU: peak RSS reset through /proc)
    if res["ours"]["peak_increment_kind"] == "rss":
        assert 0 < res["ours"]["peak_increment_gb"] < res["ours"]["peak_gb"]


def test_bench_estimate_takes_the_bench_flags():
    """`bench --estimate`: the memory flags given, the estimator's GPU settings for the rest;
    flags that only change the measurement (steps, fastgen) are dropped."""
    argv = ["--estimate", "--model", "qwen2.5-vl-7b", "--num_generations", "4", "--steps", "3",
            "--fastgen", "--dtype", "auto", "--no-load_in_4bit", "--workload", "text"]
    parser = build_parser(Args)
    args = Args(**vars(parser.parse_args(argv)))
    args.workload = "text"
    e = estimate_args(args, given_flags(parser, argv))
    assert (e.model, e.num_generations, e.dtype, e.load_in_4bit, e.image_size) == (
        "qwen2.5-vl-7b", 4, "bfloat16", False, 0)
    assert e.max_new_tokens == 512 and e.gradient_checkpointing      # not given: GPU settings


def test_bench_bad_request_one_sentence(tmp_path):
    out = run_script("common.perf.bench", "--model", "tiny", "--num_generations", "1", "--out",
                     str(tmp_path),
                     timeout=120)
    assert out.returncode != 0 and "num_generations" in out.stderr


def test_logp_chunk_equals_log_softmax():
    """common.logprobs._logp_chunk (logit - logsumexp, entropy under no_grad) gives the same
    log-probs,
    entropies and gradients as a plain log_softmax; in no-grad passes it skips the entropy."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    tg = torch.randint(0, 50, (3, 5), generator=g)
    lp, ent = logprobs_mod._logp_chunk(head, h, tg, 0.7)
    logp_all = (head(h) / 0.7).log_softmax(-1)                         # (3, 5, 50)
    ref_lp = logp_all.gather(-1, tg[..., None])[..., 0]
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1).detach())
    (g1,) = torch.autograd.grad(lp.sum(), h, retain_graph=True)
    (g2,) = torch.autograd.grad(ref_lp.sum(), h)
    torch.testing.assert_close(g1, g2)
    with torch.no_grad():
        lp0, ent0 = logprobs_mod._logp_chunk(head, h, tg, 0.7)
    torch.testing.assert_close(lp0, ref_lp.detach())
    assert (ent0 == 0).all()


def test_summarise_median_min_max_by_hand():
    rows = [dict(step_s=s, generate_s=g, logprob_s=0.1, backward_s=0.2, other_s=s - g - 0.3,
                 gen_tokens=8)
            for s, g in ((9.0, 8.0), (1.0, 0.5), (3.0, 2.0), (2.0, 1.0))]
    s = summarise(rows, warmup=1)                  # the 9 s warm-up step is left out
    assert (s["step_s"], s["step_min_s"], s["step_max_s"]) == (2.0, 1.0, 3.0)
    assert s["generate_s"] == 1.0 and s["steps"] == 3
    assert s["gen_tokens_per_s"] == 8.0             # median of 16, 4, 8 tok/s


def test_agent_workload_two_tool_turns(tiny):
    """The agent workload's rollouts: 3 assistant turns, a text observation and a crop image
    observation spliced with mask 0, every sampled turn exactly the budget."""
    tok = tiny.tokenizer
    image = noise_image(112, 0)
    msgs = lambda ex: [{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": "where"}]}]
    torch.manual_seed(0)
    rs = run_rollouts(tiny, [{}], num_generations=2, make_messages=msgs,
                      tools=agent_tools(tok, 12, 0), grammar=AGENT_GRAMMAR,
                      max_turns=3, max_new_tokens=40, max_total_tokens=1 << 30,
                      generate=ScriptedAgent(tok, forced_generate, 112))
    for r in rs:
        assert r.answer == "Paris" and r.turns == 3
        tools = [t.get("name") for t in r.trajectory if t["role"] == "tool"]
        assert tools == ["text_search", "crop"]
        assert len(r.images) == 2 and r.images[1].size == (56, 56)
        # forced: every turn is exactly its budget
        assert r.n_generated == 3 * 40
        assert 0 < r.mask.count(0) and len(r.mask) == len(r.ids)


def test_agent_workload_on_a_text_model_answers_the_crop_turn_with_text():
    tok = build_tiny_tokenizer()
    tools = agent_tools(tok, 12, 0)
    no_image = Rollout(prompt_ids=[1, 2])
    obs, image = tools["crop"]({"bbox_2d": [0, 0, 28, 28]}, no_image)
    assert image is None and obs == tools["text_search"]({"query": "q"}, no_image)[0]
    with_image = Rollout(prompt_ids=[1, 2], images=[noise_image(56, 0)])
    assert tools["crop"]({"bbox_2d": [0, 0, 28, 28]}, with_image)[1].size == (28, 28)
