# Run: pytest tests/test_differential.py -q   (CPU, ~1 min; SmolLM2 tier: pytest -m slow, minutes)
"""Differential test: the cached sampler (common.generate.CachedGenerator, run_rollouts' default)
against the plain one (common.generate.generate_ids) on randomised cases, greedy, token for token.

Two kinds of case, each drawn from its own seed (a failure names it; rerun only that case with
DIFF_SEEDS=<seed>[,<seed>...] pytest tests/test_differential.py -k <test>):
  * batch: 1-4 distinct prompts, each copied 1-3 times (shared prefixes), optionally shuffled;
    text of random length (so the plain path left-pads), a common text prefix, some with an
    image drawn from a pool with equal-pixel-sum twins (the image rotated 180 degrees or
    flipped), a same-size different image, and same-text prompts; per-row budgets; stop strings
    cut out of a plain free run so that they end INSIDE a token (and some ending on a token
    boundary); an extra EOS id taken from that run, so rows of a group stop at different points.
    Then a second call on the same generator: each sequence (+ its first output or not) + a text
    observation, sometimes with a new image per row (same tokens, different pixels).
  * rollout: run_rollouts over 1-3 examples x G 1-3. Either tool turns (a scripted wrapper, the
    same on both sides, samples with the case's stop strings and appends a text-search / crop /
    answer action; tools return text or a crop of the rollout's image; both observation styles),
    or a dialogue with `next_user_turn` (text and image user turns) comparing generate=None (the
    default: one CachedGenerator per batch_size rollouts) with generate=generate_ids. Compared:
    ids, mask, stop_reason, answer and turns of every rollout.

Each of the four reviewed fixes was broken on purpose, one at a time, and the tiny tier run
(160 batch + 64 rollout cases, about 40 s of one CPU thread; failing cases of each):
  1. stop strings by `decode(last 12 generated tokens).endswith(stop)` again: caught, 51 of 160
     batch and 11 of 64 rollout cases.
  2. _match by tokens only (`_same_image` always true): caught, 21 of 160 batch cases (on the
     second call: the first has no cache to match) and 1 of 64 rollout cases.
  3. prefill dedup key (token ids, pixel shape, pixel sum) again: caught, 22 of 160 batch and
     3 of 64 rollout cases.
  4. can_merge true for any full-precision base (bf16 / fp16 merged again): NOT caught, and it
     cannot be here: the tiny and SmolLM2 presets load in float32 on a CPU, where merging is
     allowed and exact to float32 rounding, so the break changes nothing these cases run. A
     bf16 tier is unlikely to help (not tried): the bug loses the part of a young adapter's
     delta below bf16's resolution, which moves the logits far less than bf16's own noise
     between two paths, so greedy tokens would rarely show it. The dedicated test guards it:
     tests/test_generate.py::test_no_merge_into_a_half_precision_base (bf16 and fp16: merged
     logits must equal the adapter path's exactly).

The SmolLM2 tier (`-m slow`: 16 batch + 6 rollout cases, text only, ~4 min on one thread) passes;
with break 1 its batch cases failed 6 of 16 (SmolLM2 tokenises `</answer>.` as `</` `answer`
`>.`, the overhang the break misses).
"""
import contextlib
import os
import random

import pytest
import torch
from PIL import Image

from common.chat import Encoded, encode
from common.generate import CachedGenerator, eos_token_ids, generate_ids
from common.logprobs import unwrap
from common.models import load_policy
from common.perf.bench import AGENT_GRAMMAR, agent_tools, noise_image, prompt_text
from common.rollout import run_rollouts, user_segment
from helpers import perturb_lora
from test_generate import make_policy

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

N_BATCH, N_ROLLOUT = 160, 64              # the tiny tier (CI)
N_BATCH_SLOW, N_ROLLOUT_SLOW = 16, 6      # the SmolLM2 tier
FLIPS = (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_LEFT_RIGHT,
         Image.Transpose.FLIP_TOP_BOTTOM)


@pytest.fixture(scope="module")
def tiny():
    return make_policy()


# ---------------------------------------------------------------------------------------------
# drawing a case
# ---------------------------------------------------------------------------------------------
def seeds(base: int, n: int) -> list[int]:
    only = os.environ.get("DIFF_SEEDS")
    return [int(s) for s in only.split(",")] if only else [base + i for i in range(n)]


def image_pool(rng) -> list:
    """An image, a same-size other image, and equal-pixel-sum twins (rotated 180 / flipped)."""
    w, h = 28 * rng.randint(1, 3), 28 * rng.randint(1, 3)
    a = noise_image(max(w, h), rng.randrange(1 << 20)).resize((w, h))
    b = noise_image(max(w, h), rng.randrange(1 << 20)).resize((w, h))
    return [a, b] + [a.transpose(f) for f in rng.sample(FLIPS, 2)]


def text_pool(tok, rng) -> list[str]:
    """A few user texts of random length, most sharing a prefix."""
    prefix = prompt_text(tok, rng.randint(1, 10), rng.randrange(1 << 20)) if rng.random() < 0.7 \
        else ""
    return [(prefix + " " + prompt_text(tok, rng.randint(1, 24), rng.randrange(1 << 20))).strip()
            for _ in range(3)]


def message(policy, text, image):
    if image is None or not policy.is_vlm:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": text}]}]


def encode_msgs(policy, msgs) -> Encoded:
    return encode(policy.tokenizer, policy.image_processor, msgs, add_generation_prompt=True)


def pick_stops(tok, rng, runs: list[list[int]]) -> list[str]:
    """1-3 stop strings cut out of the decoded text of sampled sequences: most end INSIDE a token
    (the text runs past them), some on a token boundary; ASCII only."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        ids = rng.choice(runs)
        ks = [k for k in range(len(ids)) if tok.decode(ids[k: k + 1]).isascii()
              and tok.decode(ids[k: k + 1])]
        if not ks:
            continue
        k = rng.choice(ks)
        head, piece = tok.decode(ids[:k]), tok.decode(ids[k: k + 1])
        cut = rng.randint(1, len(piece) - 1) if len(piece) >= 2 and rng.random() < 0.8 \
            else len(piece)
        stop = head[len(head) - rng.randint(0, min(4, len(head))):] + piece[:cut]
        if stop.isascii() and stop not in stops:
            stops.append(stop)
    return stops or ["</answer>"]


@contextlib.contextmanager
def extra_eos(policy, tid):
    """The generation config's EOS list gains `tid` (both paths read it through
    common.generate.eos_token_ids), so rows of a group end at different points."""
    cfg = unwrap(policy.model).generation_config
    saved = cfg.eos_token_id
    if tid is not None:
        cfg.eos_token_id = ([saved] if isinstance(saved, int) else list(saved or [])) + [int(tid)]
    try:
        yield
    finally:
        cfg.eos_token_id = saved


def with_tail(policy, rng, s: Encoded, out: list[int], pool) -> Encoded:
    """s + (its output or not) + a user turn (text, sometimes with an image from the pool)."""
    tok = policy.tokenizer
    parts = [{"type": "text", "text": prompt_text(tok, rng.randint(1, 8), rng.randrange(1 << 20))}]
    if policy.is_vlm and pool and rng.random() < 0.4:
        parts.insert(0, {"type": "image", "image": rng.choice(pool)})
    ids, _, pvs, grids = user_segment(policy, parts, close_turn=True)
    head = s.input_ids + (out if rng.random() < 0.5 else [])
    pv = [x for x in [s.pixel_values] + pvs if x is not None]
    gr = [x for x in [s.image_grid_thw] + grids if x is not None]
    return Encoded(head + ids, [0] * len(head + ids), [], torch.cat(pv) if pv else None,
                   torch.cat(gr) if gr else None)


# ---------------------------------------------------------------------------------------------
# the two kinds of case: each returns a list of differences (empty: the paths agree)
# ---------------------------------------------------------------------------------------------
def batch_case(policy, seed: int) -> list[str]:
    rng = random.Random(seed)
    tok = policy.tokenizer
    pool = image_pool(rng) if policy.is_vlm else []
    texts = text_pool(tok, rng)
    prompts = []
    for _ in range(rng.randint(1, 4)):
        img = rng.choice(pool) if pool and rng.random() < 0.7 else None
        msgs = message(policy, rng.choice(texts), img)
        one = encode_msgs(policy, msgs)   # copies: the same object, or encoded again
        prompts += [one if rng.random() < 0.5 else encode_msgs(policy, msgs)
                    for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        rng.shuffle(prompts)
    R = len(prompts)
    budget = rng.randint(1, 14) if rng.random() < 0.5 else [rng.randint(1, 14) for _ in range(R)]
    free = generate_ids(policy, prompts, max_new_tokens=12, temperature=0)
    stops = pick_stops(tok, rng, [r for r in free if r]) if rng.random() < 0.7 else None
    toks = [t for r in free for t in r]
    eos = rng.choice(toks) if toks and rng.random() < 0.5 else None
    bs = rng.choice([64, 64, 2, 3])
    kw = dict(max_new_tokens=budget, temperature=0, stop_strings=stops)
    diffs = []
    with extra_eos(policy, eos):
        gen = CachedGenerator()
        plain = generate_ids(policy, prompts, batch_size=bs, **kw)
        fast = gen(policy, prompts, **kw)
        diffs += differing_rows("turn 1", stops, eos, fast, plain)
        if rng.random() < 0.6:
            nxt = [with_tail(policy, rng, s, o, pool) for s, o in zip(prompts, plain)]
            plain2 = generate_ids(policy, nxt, batch_size=bs, **kw)
            fast2 = gen(policy, nxt, **kw)
            diffs += differing_rows("turn 2", stops, eos, fast2, plain2)
    return diffs


def differing_rows(what, stops, eos, fast, plain) -> list[str]:
    return [f"{what} (stops {stops}, eos {eos}): row {i} of {len(plain)}: fast {f} != plain {p}"
            for i, (f, p) in enumerate(zip(fast, plain)) if f != p]


class Scripted:
    """generate= for run_rollouts, the same on both sides: the inner sampler with this call's
    stop strings (from the case's plan), then per row a scripted action (text search, crop,
    answer, or none) unless the turn ended with an EOS."""

    def __init__(self, policy, inner, plan):
        tok = policy.tokenizer
        self.tails = [tok(s, add_special_tokens=False)["input_ids"] for s in (
            " <text_search>capital city river</text_search>",
            ' <tool_call>{"name": "crop", "arguments": {"bbox_2d": [0, 0, 28, 28]}}</tool_call>',
            " <answer>Paris</answer>")]
        self.inner, self.plan, self.calls = inner, plan, 0
        self.eos = set(eos_token_ids(policy))

    def __call__(self, policy, seqs, *, max_new_tokens, stop_strings=None, **kw):
        stops, acts = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        tails = [self.tails[a] if a is not None else [] for a in acts[: len(seqs)]]
        n = [max(1, b - len(t)) for b, t in zip(max_new_tokens, tails)]
        out = self.inner(policy, seqs, max_new_tokens=n, stop_strings=stops, **kw)
        out = out[0] if isinstance(out, tuple) else out
        return [ids + ([] if ids and ids[-1] in self.eos else t) for ids, t in zip(out, tails)]


def rollout_case(policy, seed: int) -> list[str]:
    rng = random.Random(seed)
    tok = policy.tokenizer
    pool = image_pool(rng) if policy.is_vlm else []
    texts = text_pool(tok, rng)
    examples = [{"seed": rng.randrange(1 << 20), "text": rng.choice(texts),
                 "image": rng.randrange(len(pool)) if pool and rng.random() < 0.75 else None}
                for _ in range(rng.randint(1, 3))]
    G = rng.randint(1, 3)
    R = len(examples) * G
    msgs = lambda ex: message(policy, ex["text"],
                              None if ex["image"] is None else pool[ex["image"]])
    common = dict(num_generations=G, make_messages=msgs, max_turns=rng.randint(1, 4),
                  max_new_tokens=rng.randint(3, 28), max_total_tokens=rng.randint(60, 400),
                  temperature=0)
    toks = generate_ids(policy, [encode_msgs(policy, msgs(ex)) for ex in examples],
                        max_new_tokens=12, temperature=0)
    free = [r for r in toks if r]
    eos = rng.choice([t for r in free for t in r]) if free and rng.random() < 0.4 else None
    if rng.random() < 0.6:      # tool turns through a scripted wrapper
        plan = [(pick_stops(tok, rng, free) if free and rng.random() < 0.8 else None,
                 [rng.choice([0, 1, 2, None]) for _ in range(R)]) for _ in range(4)]
        style = rng.choice(["user_turn", "inline"])
        tools = agent_tools(tok, rng.randint(1, 12), rng.randrange(1 << 20))
        if style == "inline":   # inline observations are text only (rollout.observation_segment)
            tools["crop"] = lambda args, r, text_search=tools["text_search"]: text_search(args, r)
        kw = dict(common, tools=tools, grammar=AGENT_GRAMMAR, observation_style=style)
        with extra_eos(policy, eos):
            plain = run_rollouts(policy, examples, generate=Scripted(policy, generate_ids, plan),
                                 **kw)
            fast = run_rollouts(policy, examples,
                                generate=Scripted(policy, CachedGenerator(), plan), **kw)
        what = f"tools ({style}, stops per call {[st for st, _ in plan]}, eos {eos})"
    else:                        # a dialogue: the default generate=None against generate_ids
        def hook(r, t):
            h = random.Random(r.example["seed"] * 31 + t)
            if h.random() < 0.2:
                return None
            text = prompt_text(tok, h.randint(1, 8), h.randrange(1 << 20))
            if pool and h.random() < 0.5:
                return [{"type": "image", "image": h.choice(pool)}, {"type": "text", "text": text}]
            return text
        kw = dict(common, next_user_turn=hook)
        bs = rng.randint(1, 4)
        with extra_eos(policy, eos):
            plain = run_rollouts(policy, examples, generate=generate_ids, batch_size=bs, **kw)
            fast = run_rollouts(policy, examples, batch_size=bs, **kw)
        what = f"dialogue (batch_size {bs}, eos {eos})"
    fields = ("ids", "mask", "stop_reason", "answer", "turns")
    return [f"{what}: rollout {i} of {len(plain)}, {k}: fast {getattr(f, k)} != plain "
            f"{getattr(p, k)}" for i, (f, p) in enumerate(zip(fast, plain)) for k in fields
            if getattr(f, k) != getattr(p, k)][:1]


def run_cases(policy, case, case_seeds, test: str) -> None:
    failed = {}
    for s in case_seeds:
        try:
            diffs = case(policy, s)
        except Exception as e:   # a crash is a failing case too, with its seed
            diffs = [f"raised {type(e).__name__}: {e}"]
        if diffs:
            failed[s] = diffs
    msg = "\n".join(f"case seed {s}: {ds[0][:600]}" for s, ds in failed.items())
    assert not failed, (f"{len(failed)} of {len(case_seeds)} {case.__name__} cases differ "
                        f"(rerun one: DIFF_SEEDS={next(iter(failed))} pytest "
                        f"tests/test_differential.py -k {test}):\n{msg}")


# ---------------------------------------------------------------------------------------------
# the tiers
# ---------------------------------------------------------------------------------------------
def test_batches_tiny(tiny):
    run_cases(tiny, batch_case, seeds(1000, N_BATCH), "batches_tiny")


def test_rollouts_tiny(tiny):
    run_cases(tiny, rollout_case, seeds(5000, N_ROLLOUT), "rollouts_tiny")


@pytest.fixture(scope="module")
def smollm2():
    p = load_policy("smollm2", seed=0)
    perturb_lora(p, 1e-3, seed=0)      # a young, non-zero adapter: merging it does some work
    return p


@pytest.mark.slow
def test_batches_smollm2(smollm2):
    run_cases(smollm2, batch_case, seeds(2000, N_BATCH_SLOW), "batches_smollm2")


@pytest.mark.slow
def test_rollouts_smollm2(smollm2):
    run_cases(smollm2, rollout_case, seeds(6000, N_ROLLOUT_SLOW),
              "rollouts_smollm2")


# ---------------------------------------------------------------- shared-prefix log-probs
@pytest.mark.parametrize("seed", seeds(300, 4))
def test_continuation_logprobs_equal_sequence_logprobs(seed, policy=None):
    """common.sft.continuation_logprobs (one prefix forward, its KV cache repeated, continuations
    right-padded) against sequence_logprobs (each prefix + continuation whole, masked), on random
    token ids and lengths, with a non-zero LoRA adapter (the cot_causal style probe's path)."""
    from common.sft import continuation_logprobs, sequence_logprobs
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tiny = policy or make_policy()      # non-zero LoRA
    vocab = len(tiny.tokenizer) - 50
    prefix = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
    conts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
             for _ in range(rng.randint(1, 70))]
    # a generation of another batch size first: Qwen2.5-VL keeps rope state between calls
    generate_ids(tiny, [Encoded(prefix[:3], [0] * len(prefix[:3]))] * rng.randint(2, 9),
                 max_new_tokens=2, temperature=0.0)
    got = continuation_logprobs(tiny, prefix, conts)
    want = sequence_logprobs(tiny, [Encoded(prefix + c, [0] * len(prefix) + [1] * len(c))
                                    for c in conts])
    # sequence_logprobs masks from the second token on: a one-token prefix still predicts c[0]
    for (g, n), (w, m) in zip(got, want):
        assert n == m and abs(g - w) < 1e-4 * max(1.0, abs(w)), (g, w)


@pytest.mark.slow
def test_continuation_logprobs_on_smollm2():
    """The same on SmolLM2 (a Llama, whose forward takes the cache as `cache` in transformers 5;
    the real model of the cot_causal style probe), with a non-zero LoRA adapter."""
    policy = load_policy("smollm2", seed=0)
    perturb_lora(policy, 0.01, seed=1)
    for seed in seeds(400, 2):
        test_continuation_logprobs_equal_sequence_logprobs(seed, policy)
