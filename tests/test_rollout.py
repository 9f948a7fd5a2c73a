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
    turns = ['I glance.<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 90, 70]}}</tool_call>',
             "Now the fact.<text_search>Zorblat founded</text_search>",
             "<answer>1901</answer><|im_end|>"]
    gen = scripted([turns])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=prompt("When?", img), tools=make_tools(img),
                        max_turns=5, generate=gen)
    tok = policy.tokenizer
    gen_text = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert gen_text == "".join(turns)
    obs_text = tok.decode([i for i, m in zip(r.ids, r.mask) if not m])
    assert "Cropped region" in obs_text and "1901" in obs_text and "<|im_start|>user" in obs_text
    assert r.answer == "1901" and not r.truncated and r.turns == 3
    assert len(r.images) == 2 and r.images[1].size != img.size          # prompt image, then the crop
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
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=msgs, tools=make_tools(None),
                        max_turns=4, max_tool_calls={"text_search": 2}, generate=gen)
    obs = [t["observation"] for t in r.trajectory if t["role"] == "tool"]
    assert "limit" in obs[2] and r.answer is None and r.truncated
    gen = scripted([["thinking...", "<answer>x</answer>"]])
    (r,) = run_rollouts(policy, [{"k": 0}], num_generations=1, make_messages=msgs, tools=make_tools(None),
                        max_turns=3, observation_style="inline", reprompt="Search or answer.", generate=gen)
    assert r.answer == "x" and r.trajectory[1]["name"] == "reprompt"
    assert "<information>Search or answer.</information>" in policy.tokenizer.decode(r.ids)


def test_malformed_outputs_never_crash_the_loop(policy):
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<answer>", "</answer>", "<tool_call>", "</tool_call>",
              '{"name": "crop", "arguments": {"bbox_2d": [', "1e999", "-5", "NaN", "]}}", "{", '"',
              "<text_search>", "</text_search>", "<image_search>", "</image_search>", "ü字😀", "\\u0000",
              '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [5, 5, 5, 5]}}', "x" * 50, "<|im_end|>"]
    img = Image.new("RGB", (64, 64), (10, 200, 10))
    scripts = [["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(3)]
               for _ in range(1000)]
    tools = make_tools(img)
    tools["image_search"] = lambda a, r: ("Error: no image KB in this test.", None)
    rs = run_rollouts(policy, [{"k": k} for k in range(1000)], num_generations=1,
                      make_messages=prompt("?", img), tools=tools, max_turns=3,
                      max_total_tokens=4096, generate=scripted(scripts))
    kinds = {"answer": 0, "tool_or_error": 0, "stop": 0}
    for k, r in enumerate(rs):
        assert r.done and 1 <= r.turns <= 3
        # the mask counts exactly the scripted (generated) tokens of the turns taken
        assert sum(r.mask) == sum(len(policy.tokenizer(x, add_special_tokens=False)["input_ids"])
                                  for x in scripts[k][: r.turns])
        kinds["answer" if r.answer is not None else "tool_or_error" if len(r.trajectory) > r.turns else "stop"] += 1
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
