# Run: pytest tests/test_rollout.py -q
"""The agent loop with a scripted policy: loss masks across turns, images in order, the
training forward on crops, malformed outputs, and the trajectory page."""
import random
import re

import pytest
import torch
from PIL import Image

from common.grpo import completion_logprobs
from common.models import load_policy
from common.rollout import rollout_batch, run_rollouts
from common.runlog import trajectory_html
from common.tools import TextSearch, crop, seen_size
from helpers import all_tags_grammar

GRAMMAR = all_tags_grammar()


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny")


def scripted(scripts):
    """A fake `generate`: the t-th call for rollout k (named by "#k" in its prompt) returns
    scripts[k][t] as token ids."""
    turn = {}

    def gen(policy, seqs, **kw):
        out = []
        for s in seqs:
            k = int(re.search(r"#(\d+)", policy.tokenizer.decode(s.input_ids)).group(1))
            t = turn.get(k, 0)
            turn[k] = t + 1
            out.append(policy.tokenizer(scripts[k][t], add_special_tokens=False)["input_ids"])
        return out
    return gen


def prompt(text, image=None):
    def make(e):
        c = ([{"type": "image", "image": image}] if image is not None else [])
        return [{"role": "user", "content": c + [{"type": "text", "text": f"#{e['k']} {text}"}]}]
    return make


def make_tools(image):
    kb = TextSearch([{"id": "d1", "text": "Zorblat was founded in 1901 in Quux City."},
                     {"id": "d2", "text": "The red circle is the emblem of Zorblat."}])

    def crop_tool(args, r):
        im, obs = crop(r.images[0], args.get("bbox_2d"), seen_size=seen_size(r.images[0]))
        return obs, im

    return {"crop": crop_tool, "text_search": lambda a, r: (kb.observe(a.get("query", "")), None)}


def test_masks_are_one_exactly_on_generated_tokens(policy):
    img = Image.new("RGB", (200, 120), (240, 240, 240))
    turns = ['I glance.<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, '
             '90, 70]}}</tool_call>',
             "Now the fact.<text_search>Zorblat founded</text_search>",
             "<answer>1901</answer><|im_end|>"]
    gen = scripted([turns])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("When?", img),
                        tools=make_tools(img), grammar=GRAMMAR,
                        max_turns=5, generate=gen)
    tok = policy.tokenizer
    gen_text = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert gen_text == "".join(turns)
    obs_text = tok.decode([i for i, m in zip(r.ids, r.mask) if not m])
    assert "Cropped region" in obs_text and "1901" in obs_text and "<|im_start|>user" in obs_text
    assert r.answer == "1901" and not r.truncated and r.turns == 3
    # prompt image, then the crop
    assert len(r.images) == 2 and r.images[1].size != img.size
    assert [t["name"] for t in r.trajectory if t["role"] == "tool"] == ["crop", "text_search"]
    # the training forward sees the same images: image tokens == patches / 4 across prompt + crop
    b = rollout_batch([r], tok)
    assert int(b["mm_token_type_ids"].sum()) == int(b["image_grid_thw"].prod(-1).sum()) // 4
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model, b)
    assert lp.shape == (1, len(r.ids)) and torch.isfinite(lp).all()


def test_limits_budget_and_reprompt(policy):
    msgs = prompt("q")
    gen = scripted([["<text_search>a</text_search>"] * 4])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=msgs,
                        tools=make_tools(None), grammar=GRAMMAR,
                        max_turns=4, max_tool_calls={"text_search": 2}, generate=gen)
    obs = [t["observation"] for t in r.trajectory if t["role"] == "tool"]
    assert ("limit" in obs[2] and r.answer is None and r.stop_reason == "max_turns"
            and not r.truncated)
    gen = scripted([["thinking...", "<answer>x</answer>"]])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=msgs,
                        tools=make_tools(None), grammar=GRAMMAR,
                        max_turns=3, observation_style="inline", reprompt="Search or answer.",
                        generate=gen)
    assert r.answer == "x" and r.trajectory[1]["name"] == "reprompt"
    assert "<information>Search or answer.</information>" in policy.tokenizer.decode(r.ids)


def test_malformed_outputs_never_crash_the_loop(policy):
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<answer>", "</answer>", "<tool_call>", "</tool_call>",
              '{"name": "crop", "arguments": {"bbox_2d": [', "1e999", "-5", "NaN", "]}}", "{", '"',
              "<text_search>", "</text_search>", "<image_search>", "</image_search>", "ü字😀",
              "\\u0000",
              '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [5, 5, 5, 5]}}', "x" * 50,
              "<|im_end|>"]
    img = Image.new("RGB", (64, 64), (10, 200, 10))
    scripts = [["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(3)]
               for _ in range(1000)]
    tools = make_tools(img)
    tools["image_search"] = lambda a, r: ("Error: no image KB in this test.", None)
    rs = run_rollouts(policy, [{"k": k} for k in range(1000)], num_generations=1,
                      make_messages=prompt("?", img), tools=tools, grammar=GRAMMAR, max_turns=3,
                      max_total_tokens=4096, generate=scripted(scripts))
    kinds = {"answer": 0, "tool_or_error": 0, "stop": 0}
    for k, r in enumerate(rs):
        assert r.done and 1 <= r.turns <= 3
        # the mask counts exactly the scripted (generated) tokens of the turns taken, each turn
        # cut at its budget (max_new_tokens = 128; max_total_tokens never binds here)
        assert sum(r.mask) == sum(min(128,
                                      len(policy.tokenizer(x,
                                                           add_special_tokens=False)["input_ids"]))
                                  for x in scripts[k][: r.turns])
        kinds["answer" if r.answer is not None else "tool_or_error" if len(r.trajectory) > r.turns
              else "stop"] += 1
        for t in r.trajectory:
            if t["role"] == "tool" and t["name"] == "error":
                assert t["observation"].startswith("Error")
        assert len(r.pixel_values) == len(r.images) == len(r.grids)
    assert all(v >= 10 for v in kinds.values()), kinds   # the fuzz reaches every outcome


def test_trajectory_page(tmp_path, policy):
    img = Image.new("RGB", (100, 80), (200, 0, 0))
    item = {"title": "q1", "images": [img], "rewards": {"acc": 1.0, "format": 1.0},
            "trajectory": [{"role": "assistant", "text": "<tool_call>...</tool_call>"},
                           {"role": "tool", "name": "crop", "args": {"bbox_2d": [0, 0, 10, 10]},
                            "observation": "Cropped <ok>", "image": img.crop((0, 0, 50, 50))}]}
    path = trajectory_html([item], str(tmp_path / "t.html"))
    page = open(path).read()
    assert page.count("<img") == 2 and "acc=1" in page and "Cropped &lt;ok&gt;" in page


def test_each_rollout_keeps_its_own_token_budget(policy):
    """One rollout near its limit must not cut another's answer (it did when the turn budget was
    the minimum over all live rollouts)."""
    tok = policy.tokenizer
    long_call = "<text_search>" + "x " * 20 + "</text_search>"
    answer = "<answer>the answer is 1901 in Quux City</answer>"
    seen = []

    def gen(policy, seqs, *, max_new_tokens, **kw):
        seen.append(list(max_new_tokens))
        out = []
        for s in seqs:
            k = int(re.search(r"#(\d+)", tok.decode(s.input_ids)).group(1))
            n_turn = tok.decode(s.input_ids).count("<|im_start|>assistant")
            text = [long_call, "<text_search>y</text_search>"][n_turn - 1] if k == 0 else \
                ["<text_search>Zorblat</text_search>", answer][n_turn - 1]
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        return out

    n_long = len(tok(long_call, add_special_tokens=False)["input_ids"])
    n_short = len(tok("<text_search>Zorblat</text_search>", add_special_tokens=False)["input_ids"])
    n_obs = len(tok("<|im_end|>\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False)["input_ids"])
    rs = run_rollouts(policy, [{"k": 0}, {"k": 1}], num_generations=1, make_messages=prompt("q"),
                      tools={"text_search": lambda a, r: ("ok", None)}, grammar=GRAMMAR,
                      max_turns=2, max_new_tokens=64,
                      max_total_tokens=n_long + n_obs + 10, generate=gen)
    # turn 2: each row its own budget
    assert seen[1] == [10, n_long - n_short + 10]
    assert rs[1].answer == "the answer is 1901 in Quux City" and rs[1].stop_reason == "answer"
    assert len(rs[0].ids) <= n_long + n_obs + 10 and rs[0].trajectory[-2]["cut"] and rs[0].truncated


def test_observation_that_cannot_fit_ends_the_rollout_with_a_reason(policy, capsys):
    big = {"text_search": lambda a, r: ("word " * 400, None)}
    gen = scripted([["<text_search>a</text_search>", "<answer>x</answer>"]] * 4)
    rs = run_rollouts(policy, [{"k": k} for k in range(4)], num_generations=1,
                      make_messages=prompt("q"),
                      tools=big, grammar=GRAMMAR, max_turns=2, max_total_tokens=200, generate=gen)
    assert all(r.stop_reason == "observation_overflow" and r.truncated and r.answer is None
               for r in rs)
    out = capsys.readouterr().out
    assert out.count("warning: 4 of 4 rollouts ended because an observation did not fit") == 1


def test_next_user_turn_hook_runs_a_dialogue(policy):
    """The per-turn hook: user turns (text, then an image) spliced with mask 0, replies kept per
    turn, a cut reply closed with <|im_end|>, None ends the dialogue, max_turns bounds it."""
    tok = policy.tokenizer
    img = Image.new("RGB", (56, 56), (0, 0, 255))
    users = ["second question",
             [{"type": "image", "image": img}, {"type": "text", "text": "third"}]]
    calls = []

    def hook(r, t):
        calls.append(t)
        return users[t - 1] if t - 1 < len(users) else None

    replies = ["first reply<|im_end|>", "a very long reply " * 10,
               "<answer>done</answer><|im_end|>"]
    gen = scripted([replies])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("first"),
                        max_turns=5, max_new_tokens=12, generate=gen, next_user_turn=hook)
    said = [t for t in r.trajectory if t["role"] == "assistant"]
    assert len(said) == 3 and said[1]["cut"] and not said[2]["cut"] and calls == [1, 2, 3]
    assert r.stop_reason == "dialogue_end" and r.answer == "done" and not r.truncated
    assert [t["observation"] for t in r.trajectory if t["role"] == "tool"] == ["second question",
                                                                               "third"]
    assert len(r.images) == 1 and len(r.pixel_values) == 1          # the user turn's image
    gen_text = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    n_cut = len(tok(replies[1], add_special_tokens=False)["input_ids"][:12])
    assert sum(r.mask) == (len(tok(replies[0], add_special_tokens=False)["input_ids"]) + n_cut
                           + len(tok(replies[2], add_special_tokens=False)["input_ids"]))
    assert gen_text.startswith("first reply<|im_end|>")
    obs = tok.decode([i for i, m in zip(r.ids, r.mask) if not m])
    assert obs.count("<|im_start|>user") == 2 and obs.startswith("\n<|im_start|>user\nsecond "
                                                                 "question")
    assert "<|im_end|>\n<|im_start|>user" in tok.decode(r.ids)      # the cut reply was closed
    b = rollout_batch([r], tok)                                      # the image reaches training
    assert int(b["mm_token_type_ids"].sum()) == int(b["image_grid_thw"].prod(-1).sum()) // 4
    # max_turns: the hook is not asked for a turn that would never be answered
    calls.clear()
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("first"),
                        max_turns=2, max_new_tokens=12, generate=scripted([replies]),
                        next_user_turn=hook)
    # 2nd was cut
    assert calls == [1] and r.stop_reason == "max_turns" and r.turns == 2 and r.truncated


def test_generate_ids_per_row_budgets_and_sampler_logps(policy):
    """The real sampler: each row stops at its own budget; greedy rows are prefixes of the same
    rows with a larger budget; sampled log-probs are the model's log softmax(logits / T)."""
    from common.generate import generate_ids, vision_token_ids
    tok = policy.tokenizer
    from common.chat import encode
    seqs = [encode(tok, None, [{"role": "user", "content": t}], add_generation_prompt=True)
            for t in ("hello there", "the quick brown fox jumps")]
    policy.model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    a = generate_ids(policy, seqs, max_new_tokens=[3, 10], temperature=0.0)
    b = generate_ids(policy, seqs, max_new_tokens=[10, 10], temperature=0.0)
    assert len(a[0]) <= 3 and a[0] == b[0][:len(a[0])] and a[1] == b[1]
    torch.manual_seed(0)
    ids, lps = generate_ids(policy, seqs, max_new_tokens=[4, 9], temperature=0.7,
                            return_logprobs=True)
    assert [len(x) for x in ids] == [len(x) for x in lps] and len(ids[0]) <= 4 and len(ids[1]) <= 9
    vision = vision_token_ids(tok)                 # the sampler suppresses these (a VLM)
    for s, i, lp in zip(seqs, ids, lps):
        with torch.no_grad():
            # (L, V)
            logits = policy.model(input_ids=torch.tensor([s.input_ids + i])).logits[0].float()
        z = logits[len(s.input_ids) - 1: -1] / 0.7                                        # (n, V)
        z[:, vision] = -float("inf")
        want = z.log_softmax(-1).gather(-1, torch.tensor(i)[:, None]).squeeze(-1)
        assert torch.allclose(want, torch.tensor(lp), atol=1e-4)


def test_checkpoint_generation_config_does_not_leak_into_sampling():
    """A checkpoint's generation_config (repetition_penalty, top_k, min_new_tokens, n-gram and
    bad-word bans) must not change what the sampler draws from: softmax(logits / T)."""
    from common.chat import encode
    from common.generate import generate_ids, vision_token_ids
    p = load_policy("tiny", lora=False, seed=4)
    tok = p.tokenizer
    gc = p.model.generation_config
    gc.repetition_penalty, gc.top_k, gc.min_new_tokens, gc.no_repeat_ngram_size = 1.3, 3, 6, 1
    gc.bad_words_ids = [[tok.convert_tokens_to_ids("<|im_end|>")]]
    seqs = [encode(tok, None, [{"role": "user", "content": "a a a a"}], add_generation_prompt=True)]
    torch.manual_seed(0)
    ids, lps = generate_ids(p, seqs, max_new_tokens=8, temperature=1.0, return_logprobs=True)
    with torch.no_grad():
        n = len(seqs[0].input_ids)
        z = p.model(input_ids=torch.tensor([seqs[0].input_ids + ids[0]])).logits[0, n - 1: -1]
    z[:, vision_token_ids(tok)] = -float("inf")
    want = z.float().log_softmax(-1).gather(-1, torch.tensor(ids[0])[:, None]).squeeze(-1)
    assert (want - torch.tensor(lps[0])).abs().max() < 1e-4


def test_stops_on_the_generation_configs_eos_list(policy):
    """TRL stops on the tokenizer's EOS and every id in generation_config.eos_token_id."""
    from common.chat import encode
    from common.generate import generate_ids
    tok = policy.tokenizer
    seqs = [encode(tok, None, [{"role": "user", "content": "hello there"}],
                   add_generation_prompt=True)]
    free = generate_ids(policy, seqs, max_new_tokens=6, temperature=0.0)[0]
    first = free[0]
    saved = policy.model.generation_config.eos_token_id
    policy.model.generation_config.eos_token_id = [tok.eos_token_id, first]
    try:
        assert generate_ids(policy, seqs, max_new_tokens=6, temperature=0.0)[0] == [first]
    finally:
        policy.model.generation_config.eos_token_id = saved


def test_truncation_is_trls_rule(policy):
    """truncated = the completion was cut by a token limit (its last token is neither EOS nor
    pad nor the end of a closed action), or its observation did not fit; running out of turns
    without an answer is not truncation (a separate metric, ended_without_answer)."""
    single = scripted([["one two three four five six seven"], ["one<|im_end|>"],
                       ["one<|endoftext|>"]])
    rs = run_rollouts(policy, [{"k": k} for k in range(3)], num_generations=1,
                      make_messages=prompt("q"),
                      max_new_tokens=3, generate=single)
    assert [r.truncated for r in rs] == [True, False, False]
    assert [r.stop_reason for r in rs] == ["cut", "end", "end"]
    agent = scripted([["<text_search>a</text_search>"] * 2, ["<answer>x</answer>"],
                      ["<text_search>a</text_search>", "<answer>yy" + " z" * 40]])
    rs = run_rollouts(policy, [{"k": k} for k in range(3)], num_generations=1,
                      make_messages=prompt("q"),
                      tools=make_tools(None), grammar=GRAMMAR, max_turns=2, max_new_tokens=16,
                      generate=agent)
    assert [r.truncated for r in rs] == [False, False, True]
    assert [r.answer is None for r in rs] == [True, False, True]
    assert [r.stop_reason for r in rs] == ["max_turns", "answer", "max_turns"]


def test_tools_without_a_grammar_is_refused_in_one_sentence(policy):
    with pytest.raises(ValueError, match="needs grammar="):
        run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("q"),
                     tools={"text_search": lambda a, r: ("ok", None)}, max_turns=2)


def test_an_inline_observation_with_an_image_is_one_clear_error(policy):
    """observation_style="inline" (Search-R1 / LRAS) splices text inside the assistant turn; a
    tool that returns an image there was a TypeError deep in the loop, now one sentence."""
    img = Image.new("RGB", (200, 120), (240, 240, 240))
    turns = ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 90, '
             '70]}}</tool_call>', "<answer>x</answer>"]
    with pytest.raises(ValueError) as e:
        run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("q", img),
                     tools=make_tools(img), grammar=GRAMMAR, max_turns=3,
                     observation_style="inline", generate=scripted([turns]))
    msg = str(e.value)
    assert msg.startswith("inline observations carry text only;") and "\n" not in msg
    assert "'crop'" in msg and "user_turn" in msg
    # a text tool inline is unaffected
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("q", img),
                        tools=make_tools(img), grammar=GRAMMAR, max_turns=3,
                        observation_style="inline",
                        generate=scripted([["<text_search>Zorblat</text_search>",
                                            "<answer>1901</answer>"]]))
    assert r.answer == "1901" and "<information>" in policy.tokenizer.decode(r.ids)


def test_a_dialogue_without_tools_reads_no_tool_tags(policy):
    """A dialogue (no tools) whose reply happens to hold tool-like tags goes on to the next user
    turn: without tools only <answer> means something (before the per-script grammar, a stray
    `<search>x</search>` or `<tool_call>` parsed as a tool call and ended the whole dialogue as
    "end"/"cut")."""
    users = ["second question", "third"]

    def hook(r, t):
        return users[t - 1] if t - 1 < len(users) else None
    replies = ["I will <search>x</search> nothing<|im_end|>", "<tool_call>{}</tool_call><|im_end|>",
               "<answer>done</answer><|im_end|>"]
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("first"),
                        max_turns=5, max_new_tokens=32, generate=scripted([replies]),
                        next_user_turn=hook)
    assert [t["role"] for t in r.trajectory] == ["assistant", "tool", "assistant", "tool",
                                                 "assistant"]
    assert r.stop_reason == "dialogue_end" and r.answer == "done"
