# Run: pytest tests/test_generate.py -q      (CPU, ~30 s)
"""common/generate.py gives the plain path's numbers: greedy tokens identical to
common.generate.generate_ids / the re-prefill agent loop, and the per-token log-probs it computed
while decoding (prompt prefilled once for G rows, KV kept across turns, a crop image fed
into the cache) equal the training pass's (common.grpo.completion_logprobs) on the final
sequences. A generator made wrong on purpose (positions off by one) fails the same check.
The last four tests guard four reviewed bugs of the cached path (stop strings ending inside a
token, rows reused across different images, prefill dedup by pixel sum, LoRA merged into a
half-precision base); tests/test_differential.py compares the two paths on random cases."""
import pytest
import torch

from common.perf.bench import (AGENT_GRAMMAR, ScriptedAgent, agent_tools, forced_generate,
                                noise_image, prompt_text)
from common.chat import encode
from common.generate import (CachedGenerator, _draw, can_merge, generate_ids, image_features,
                             merged_lora, sub_batch, vision_token_ids)
from common.logprobs import completion_logprobs, unwrap
from common.models import load_policy
from common.rollout import Rollout, rollout_batch, run_rollouts


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def make_policy():
    """The tiny preset with weights scaled up (so greedy decoding does not repeat one token) and
    a non-zero LoRA adapter (so merging it changes the weights)."""
    p = load_policy("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, prm in unwrap(p.model).named_parameters():
            if "lora_" in n:
                prm.normal_(0, 0.1, generator=g)
            elif prm.dim() >= 2 and "visual" not in n:
                prm.mul_(8.0)
    return p


@pytest.fixture(scope="module")
def policy():
    return make_policy()


def image_prompt(policy, size=56, seed=0, n_text=10):
    msgs = [{"role": "user", "content": [{"type": "image", "image": noise_image(size, seed)},
                                         {"type": "text",
                                          "text": prompt_text(policy.tokenizer, n_text, seed)}]}]
    return encode(policy.tokenizer, policy.image_processor, msgs, add_generation_prompt=True)


def text_prompt(policy, seed=0, n_text=12):
    return encode(policy.tokenizer, None,
                  [{"role": "user", "content": prompt_text(policy.tokenizer, n_text, seed)}],
                  add_generation_prompt=True)


def greedy_with_raw(gen, policy, seqs, n):
    """Greedy decoding through `gen`, and per row the raw log-prob of each chosen token."""
    ids = gen(policy, seqs, max_new_tokens=n, temperature=0)
    return ids, gen.raw_logps


@pytest.mark.parametrize("kind", ["text", "image"])
def test_shared_prefix_equals_plain(policy, kind):
    enc = image_prompt(policy) if kind == "image" else text_prompt(policy)
    G, n = 3, 10
    plain = generate_ids(policy, [enc] * G, max_new_tokens=n, temperature=0)
    gen = CachedGenerator()
    fast, raw = greedy_with_raw(gen, policy, [enc] * G, n)
    assert fast == plain and len(set(map(tuple, fast[0:1]))) == 1 and len(set(fast[0])) > 3
    assert gen.stats["prefill_tokens"] == len(enc.input_ids)        # prefilled once, not G times
    # the decode-time log-probs are the training pass's
    rs = [Rollout(prompt_ids=enc.input_ids, ids=list(r), mask=[1] * len(r),
                  pixel_values=[enc.pixel_values] if enc.pixel_values is not None else [],
                  grids=[enc.image_grid_thw] if enc.image_grid_thw is not None else [])
                  for r in fast]
    batch = rollout_batch(rs, policy.tokenizer)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model, batch, 1.0)
    torch.testing.assert_close(torch.tensor(raw), lp, atol=2e-5, rtol=1e-5)


class OffByOne(CachedGenerator):
    """A broken generator: every fed segment starts one position too late."""

    def _segment_positions(self, policy, ids, grids, start):
        return super()._segment_positions(policy, ids, grids, start + (1 if start else 0))


def agent_rollouts(policy, gen, G=2, n=16, seeds=(3, 4)):
    """Scripted tool turns for two prompts of different lengths (ragged rows); the stray-tag
    filter is off, so what is scored is what was sampled."""
    tok = policy.tokenizer
    agent = ScriptedAgent(tok, gen, 112)
    agent.bad = set()
    msgs = lambda ex: [{"role": "user",
                        "content": [{"type": "image", "image": noise_image(112, ex["seed"])},
                                                    {"type": "text", "text": ex["text"]}]}]
    examples = [{"seed": s, "text": "where" + " is the river city" * i} for i,
                s in enumerate(seeds)]
    return run_rollouts(policy, examples, num_generations=G, make_messages=msgs,
                        tools=agent_tools(tok, 12, 0), grammar=AGENT_GRAMMAR,
                        max_turns=3, max_new_tokens=n + 40, max_total_tokens=1 << 30, temperature=0,
                        generate=agent)


def fast_agent_logps(policy, gen_cls):
    """Agent rollouts through gen_cls, and the decode-time raw log-probs at each generated token."""
    rec = []

    class Rec(gen_cls):
        def __call__(self, policy, seqs, **kw):
            ids = super().__call__(policy, seqs, **kw)
            rec.append([(len(s.input_ids), list(r)) for s, r in zip(seqs, self.raw_logps)])
            return ids
    gen = Rec(force_length=True)
    return agent_rollouts(policy, gen), rec, gen


def check_against_training_pass(policy, rs, rec):
    batch = rollout_batch(rs, policy.tokenizer)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model, batch, 1.0)             # (B, T)
    got, want = [], []
    for call in rec:
        for i, (seq_len, raw) in enumerate(call):
            off = seq_len - len(rs[i].prompt_ids)
            got += raw
            want += lp[i, off: off + len(raw)].tolist()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-5, rtol=1e-5)


def test_kv_across_turns_equals_reprefill_loop(policy):
    """Two tool turns (a text observation, then a crop image) and an answer: the same tokens as
    the plain loop that re-encodes everything each turn, the training pass's log-probs, and far
    fewer tokens prefilled."""
    plain = agent_rollouts(policy, forced_generate)
    fast, rec, gen = fast_agent_logps(policy, CachedGenerator)
    assert [r.ids for r in fast] == [r.ids for r in plain]
    assert all(len(r.images) == 2 and r.answer == "Paris" for r in fast)
    check_against_training_pass(policy, fast, rec)
    # lower bound
    plain_prefill = sum(len(r.prompt_ids) for r in plain) + sum(len(r.ids) for r in plain)
    assert gen.stats["reused_tokens"] > 0 and gen.stats["prefill_tokens"] < plain_prefill / 2


def test_a_wrong_generator_fails_the_check(policy):
    fast, rec, _ = fast_agent_logps(policy, OffByOne)
    with pytest.raises(AssertionError):
        check_against_training_pass(policy, fast, rec)


def test_merged_lora_decode(policy):
    """Merged weights while decoding: the same greedy tokens, and afterwards the very same weight
    tensors (bit for bit), so training never sees a rounded W + BA - BA."""
    assert can_merge(policy)
    enc = text_prompt(policy, seed=3)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    modules = [(n, type(m)) for n, m in policy.model.named_modules()]
    merged = CachedGenerator(merge_lora=True)(policy, [enc] * 2, max_new_tokens=8, temperature=0)
    separate = CachedGenerator(merge_lora=False)(policy, [enc] * 2, max_new_tokens=8, temperature=0)
    assert merged == separate
    for n, p in policy.model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the LoRA wrappers are back
    assert [(n, type(m)) for n, m in policy.model.named_modules()] == modules
    with merged_lora(policy):       # inside: the adapter is off and the base holds W + scale B A
        out_m = unwrap(policy.model)(input_ids=torch.tensor([enc.input_ids])).logits
    out = unwrap(policy.model)(input_ids=torch.tensor([enc.input_ids])).logits
    torch.testing.assert_close(out_m, out, atol=1e-5, rtol=1e-5)
    with policy.model.disable_adapter():   # and they still act: the adapter changes the logits
        off = unwrap(policy.model)(input_ids=torch.tensor([enc.input_ids])).logits
        assert not torch.allclose(off, out)


def test_vision_once_per_image_same_logprobs(policy):
    """image_features runs the tower once per distinct image; the log-probs with those features
    equal those with pixel_values, micro-batch by micro-batch."""
    enc = image_prompt(policy, size=84, seed=2)
    g = torch.Generator().manual_seed(0)
    rs = [Rollout(prompt_ids=enc.input_ids, ids=torch.randint(0, 500, (6,), generator=g).tolist(),
                  mask=[1] * 6,
                  pixel_values=[enc.pixel_values], grids=[enc.image_grid_thw]) for _ in range(4)]
    batch = rollout_batch(rs, policy.tokenizer)
    calls = []
    h = unwrap(policy.model).model.visual.register_forward_hook(lambda m, i,
                                                                o: calls.append(i[0].shape[0]))
    try:
        feats = image_features(policy.model, batch)
    finally:
        h.remove()
    # one image's patches, once
    assert len(calls) == 1 and calls[0] == enc.pixel_values.shape[0]
    with torch.no_grad():
        for mb in ([0, 1], [2, 3]):
            a, _ = completion_logprobs(policy.model, sub_batch(batch, mb, None), 1.0)
            b, _ = completion_logprobs(policy.model, sub_batch(batch, mb, feats), 1.0)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_left_padding_and_stale_rope_deltas(policy):
    """Two suspicions about the plain path, checked (both were not real in transformers 5.24): a
    left-padded text batch decodes as each row alone, and a text-only generate after an image
    generate (Qwen2.5-VL keeps `rope_deltas` between calls) decodes as a fresh one."""
    a, b = text_prompt(policy, seed=1, n_text=6), text_prompt(policy, seed=2, n_text=20)
    alone = [generate_ids(policy, [s], max_new_tokens=8, temperature=0)[0] for s in (a, b)]
    assert generate_ids(policy, [a, b], max_new_tokens=8, temperature=0) == alone
    assert CachedGenerator()(policy, [a, b], max_new_tokens=8, temperature=0) == alone
    img = image_prompt(policy)
    generate_ids(policy, [img, img], max_new_tokens=3, temperature=0)
    # state was left behind
    assert unwrap(policy.model).model.rope_deltas is not None
    assert generate_ids(policy, [a, b], max_new_tokens=8, temperature=0) == alone


def dialogue(policy, temperature, **kw):
    """run_rollouts with a 3-turn dialogue (a text user turn, then an image one), ragged prompts."""
    msgs = lambda ex: [{"role": "user",
                        "content": [{"type": "image", "image": noise_image(56, ex["seed"])},
                                                    {"type": "text", "text": ex["text"]}]}]
    hook = lambda r, t: "tell me more" if t == 1 else [{"type": "image",
                                                        "image": noise_image(56, 9)},
                                                        {"type": "text", "text": "and this?"}]
    examples = [{"seed": s, "text": "where" + " is the river city" * i} for i,
                s in enumerate((3, 4))]
    return run_rollouts(policy, examples, num_generations=2, make_messages=msgs, max_turns=3,
                        max_new_tokens=6,
                        max_total_tokens=600, temperature=temperature, next_user_turn=hook, **kw)


def test_default_rollouts_equal_the_plain_path(policy):
    """run_rollouts' default (CachedGenerator, one per batch_size rollouts) gives the plain
    path's greedy tokens over three turns with images, and its sampler log-probs at T = 1 are
    the training forward's (the sampler's distribution has the vision tokens suppressed, as HF's
    `suppress_tokens` in the plain path, so they are renormalised without them here)."""
    plain = dialogue(policy, 0.0, generate=generate_ids)
    # two caches: 3 + 1 rows
    fast = dialogue(policy, 0.0, batch_size=3)
    assert [r.ids for r in fast] == [r.ids for r in plain]
    assert [r.mask for r in fast] == [r.mask for r in plain]
    assert all(r.turns == 3 and len(r.images) == 2 for r in fast)
    torch.manual_seed(0)
    rs = dialogue(policy, 1.0)
    batch = rollout_batch(rs, policy.tokenizer)
    T = batch["completion_mask"].shape[1]
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "n_images")}
    with torch.no_grad():
        logits = unwrap(policy.model)(**inputs).logits[:, -T - 1: -1].float()   # (B, T, V)
    logits[..., vision_token_ids(policy.tokenizer)] = float("-inf")
    lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, -T:, None])[..., 0]  # (B, T)
    m = batch["completion_mask"].bool()
    samp = torch.zeros_like(lp)
    for i, r in enumerate(rs):
        samp[i, :len(r.sample_logps)] = torch.tensor(r.sample_logps)
    torch.testing.assert_close(samp[m], lp[m], atol=2e-5, rtol=1e-5)


def test_vision_once_on_agent_batches(policy):
    """Rows with 1-3 images (prompt + crops, some shared by the G copies) and a row without any:
    the features path gives the pixel path's log-probs in every micro-batch."""
    encs = [image_prompt(policy, size=56, seed=s) for s in (0, 1)]
    crop = image_prompt(policy, size=28, seed=5)
    g = torch.Generator().manual_seed(1)
    rs = []
    for k, (e, extra) in enumerate([(0, 0), (0, 1), (1, 2), (1, 0)]):
        enc = encs[e]
        ids = torch.randint(0, 500, (5,), generator=g).tolist()
        pv, gr = [enc.pixel_values], [enc.image_grid_thw]
        for _ in range(extra):   # a crop: its image tokens inside the completion
            ids += crop.input_ids[:]
            pv.append(crop.pixel_values)
            gr.append(crop.image_grid_thw)
        rs.append(Rollout(prompt_ids=enc.input_ids, ids=ids, mask=[1] * len(ids), pixel_values=pv,
                          grids=gr))
    t = text_prompt(policy)
    rs.append(Rollout(prompt_ids=t.input_ids, ids=[7, 8, 9], mask=[1, 1, 1]))
    batch = rollout_batch(rs, policy.tokenizer)
    feats = image_features(policy.model, batch)
    assert len(feats) == len(batch["image_grid_thw"])
    with torch.no_grad():
        for mb in ([0, 1], [2, 3], [4], [3, 4]):
            a, _ = completion_logprobs(policy.model, sub_batch(batch, mb, None), 1.0)
            b, _ = completion_logprobs(policy.model, sub_batch(batch, mb, feats), 1.0)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_draw_samples_the_softmax():
    """The inverse-CDF sampler draws from exp(logp): frequencies within 5 sigma of the
    probabilities over 100k draws, and a token masked to -inf (top-k / top-p / suppressed) never."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, -1.0, float("-inf"), 0.5, -3.0, 1.0]])
    lp = logits.log_softmax(-1).expand(100_000, 6).contiguous()
    freq = torch.bincount(_draw(lp), minlength=6).double() / 100_000
    p = lp[0].exp().double()
    sigma = (p * (1 - p) / 100_000).sqrt()
    assert freq[2] == 0 and ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


# ---------------------------------------------------------------------------------------------
# the cached path's four reviewed bugs, one test each (each failed before its fix)
# ---------------------------------------------------------------------------------------------
def image_prompt_of(policy, image, text):
    msgs = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": text}]}]
    return encode(policy.tokenizer, policy.image_processor, msgs, add_generation_prompt=True)


def overhanging_stop(tok, ids):
    """(k, stop): a 3-character stop string that ends one character into token ids[k] (which
    decodes to 2+ ASCII characters), so the text runs past it; the first such k >= 2."""
    for k in range(2, len(ids)):
        head, piece = tok.decode(ids[:k]), tok.decode(ids[k: k + 1])
        if len(piece) >= 2 and piece.isascii() and head.isascii() and len(head) >= 2:
            return k, head[-2:] + piece[0]
    raise AssertionError("no token to overhang in " + repr(tok.decode(ids)))


def test_stop_string_ending_inside_a_token(policy):
    """Item 1: a stop string that ends INSIDE the last token (as SmolLM2's `</` `answer` `>.`
    for `</answer>`) stops the cached path on the same token as the plain path's
    transformers StopStringCriteria (it used to check decode(tail).endswith(stop) only)."""
    tok = policy.tokenizer
    enc = text_prompt(policy, seed=5)
    free = generate_ids(policy, [enc], max_new_tokens=24, temperature=0)[0]
    k, stop = overhanging_stop(tok, free)
    plain = generate_ids(policy, [enc] * 2, max_new_tokens=24, temperature=0, stop_strings=[stop])
    assert plain[0] == free[: k + 1]           # the plain path stops on the overhanging token
    fast = CachedGenerator()(policy, [enc] * 2, max_new_tokens=24, temperature=0,
                             stop_strings=[stop])
    assert fast == plain, (stop, [tok.decode(r) for r in fast])


def test_rows_with_different_images_are_not_reused(policy):
    """Item 2: two prompts, the same text, same-size different images: on the next turn (the
    same tokens appended to both) each must continue from its own image's cache row, not from
    the first row whose tokens match (a tie that the first row used to win)."""
    text = prompt_text(policy.tokenizer, 8, 1)
    a = image_prompt_of(policy, noise_image(56, 11), text)
    b = image_prompt_of(policy, noise_image(56, 12), text)
    assert a.input_ids == b.input_ids and not torch.equal(a.pixel_values, b.pixel_values)
    gen = CachedGenerator()
    gen(policy, [a, b], max_new_tokens=4, temperature=0)
    obs = policy.tokenizer(" the river city", add_special_tokens=False)["input_ids"]
    nxt = [type(s)(s.input_ids + obs, s.loss_mask + [0] * len(obs), s.images, s.pixel_values,
                   s.image_grid_thw) for s in (a, b)]
    plain = generate_ids(policy, nxt, max_new_tokens=8, temperature=0)
    assert plain[0] != plain[1]                # the image matters to this model
    assert gen(policy, nxt, max_new_tokens=8, temperature=0) == plain


def test_prefill_dedup_tells_a_rotated_image_apart(policy):
    """Item 3: an image and the same image rotated 180 degrees (same shape, same pixel sum) with
    the same question are two prompts, each prefilled with its own pixels (the dedup key used to
    be token ids + pixel shape + pixel sum)."""
    im = noise_image(56, 21)
    a, b = image_prompt_of(policy, im, "what is here"), image_prompt_of(policy, im.rotate(180),
                                                                         "what is here")
    assert float(a.pixel_values.double().sum()) == float(b.pixel_values.double().sum())
    assert not torch.equal(a.pixel_values, b.pixel_values)
    plain = generate_ids(policy, [a, b], max_new_tokens=8, temperature=0)
    assert plain[0] != plain[1]
    assert CachedGenerator()(policy, [a, b], max_new_tokens=8, temperature=0) == plain


def test_no_merge_into_a_half_precision_base():
    """Item 4: LoRA is merged into the base weights only when they are float32. Merged into a
    bf16 / fp16 base, W + BA is rounded to the base dtype and a young adapter (lora_B ~ 1e-4) is
    mostly lost, so the sampler would not be the policy being trained: there the adapter must
    stay separate (merged_lora a no-op: the very same logits as the adapter path)."""
    for dtype in (torch.bfloat16, torch.float16):
        p = load_policy("tiny", seed=0, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, prm in unwrap(p.model).named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 1e-4)
        assert not can_merge(p), dtype
        ids = torch.tensor([text_prompt(p, seed=3).input_ids])
        with torch.no_grad():
            with p.base():
                base = unwrap(p.model)(input_ids=ids).logits.float()
            adapter = unwrap(p.model)(input_ids=ids).logits.float()
            with merged_lora(p):
                merged = unwrap(p.model)(input_ids=ids).logits.float()
        assert not torch.equal(adapter, base)  # the adapter acts
        assert torch.equal(merged, adapter), (dtype, (merged - adapter).abs().max())
    assert can_merge(make_policy())            # float32: merged
