# Run: pytest tests/test_gog.py -q        (about a minute on 2 CPU cores; no downloads)
"""Tests for gog.py: the GoG reward on hand-written trajectories, the toy world (deterministic,
oracle trajectories replayed through the real parser and tools score reward 1), the levels
split, the benchmark loader, and a subprocess smoke run of every stage on the tiny model."""
import functools
import json
import random

import pytest

import gog
from common.cli import UserError
from common.models import load_policy
from common.rollout import run_rollouts
from helpers import run_script



# ---------------------------------------------------------------------------------------------
# the reward: r = (1 - lambda) * acc + lambda * fmt, lambda = 0.1
# ---------------------------------------------------------------------------------------------
def turn(text):
    return {"role": "assistant", "text": text}


def obs(name, text):
    return {"role": "tool", "name": name, "args": {}, "observation": text, "image": None}


SEARCHED = [turn("<reason>need the year</reason>\n<text_search>Kalo founded</text_search>"),
            obs("text_search", "Doc 1(Title: e0-year) Kalo was founded in 1901."),
            turn("<reason>found it</reason>\n<answer>1901</answer>")]


@pytest.mark.parametrize("name, trajectory, answer, expected", [
    ("correct with search", SEARCHED, "1901", {"reward": 1.0, "acc": 1.0, "format": 1.0}),
    ("wrong answer", SEARCHED[:2] + [turn("<answer>1899</answer>")], "1899",
     {"reward": 0.1, "acc": 0.0, "format": 1.0}),
    ("correct, verbose", SEARCHED[:2] + [turn("<answer>in 1901</answer>")], "in 1901",
     {"reward": 1.0, "acc": 1.0, "format": 1.0}),
    ("malformed turn, then correct", [turn("<text_search>Kalo founded"), obs("error", "Error: unclosed"),
                                      turn("<answer>1901</answer>")], "1901",
     {"reward": 0.9, "acc": 1.0, "format": 0.0}),
    ("no answer at all", [turn("I think it is 1901.")], None, {"reward": 0.0, "acc": 0.0, "format": 0.0}),
    ("correct without search (no tool bonus or penalty)", [turn("<reason>glance</reason><answer>1901</answer>")],
     "1901", {"reward": 1.0, "acc": 1.0, "format": 1.0}),
    ("answer too long (sub-EM would reward lists)", [turn("<answer>x</answer>")],
     "1899 1900 1901 1902 1903 1904 1905 1906 1907 1908 1909", {"reward": 0.1, "acc": 0.0, "format": 1.0}),
])
def test_reward_on_hand_written_trajectories(name, trajectory, answer, expected):
    got = gog.gog_reward(trajectory, answer, ["1901"], lam=0.1, max_answer_words=10)
    assert got == pytest.approx(expected), name


# ---------------------------------------------------------------------------------------------
# the toy world
# ---------------------------------------------------------------------------------------------
def world_fingerprint(w):
    return ([q for q in w.questions], w.text_kb, [(s["id"], s["tiles"], s["image"].tobytes()) for s in w.scenes],
            [(e["name"], e["caption"], e["image"].tobytes()) for e in w.image_kb])


def test_world_is_deterministic_for_a_seed():
    a, b, c = gog.build_world(3, 2, 224), gog.build_world(3, 2, 224), gog.build_world(4, 2, 224)
    assert world_fingerprint(a) == world_fingerprint(b)
    assert world_fingerprint(a) != world_fingerprint(c)
    assert {q["level"] for q in a.questions} == {"glance", "text", "image", "gaze"}
    for s in a.scenes:  # the contract prm_bench.py relies on
        assert s["image"].size == (224, 224)
        for t in s["tiles"]:
            assert set(t) >= {"name", "box", "color", "shape", "is_distractor"} and len(t["box"]) == 4


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", lora=False)


def replay(tokenizer, texts):
    """A scripted `generate` for run_rollouts: turn i of the (single) rollout emits texts[i]."""
    state = {"i": 0}

    def generate(policy, seqs, **kw):
        text = texts[state["i"]]
        state["i"] += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [ids + ([tokenizer.eos_token_id] if "<answer>" in text else [])]
    return generate


def test_oracle_trajectories_score_reward_one_through_real_tools(tiny):
    world = gog.build_world(1, 2, 224)
    tools = gog.make_tools(world.text_search, world.image_search, 3)
    rng = random.Random(0)
    cases = [(q, False) for q in world.questions] + [(q, True) for q in world.questions if q["level"] == "gaze"]
    for q, reflective in cases:
        msgs = gog.oracle_trajectory(world, q, reflective, rng)
        texts = [m["content"] for m in msgs if m["role"] == "assistant"]
        [r] = run_rollouts(tiny, [gog.as_example(world, q)], num_generations=1, make_messages=gog.make_messages,
                           tools=tools, max_turns=6, max_tool_calls=gog.tool_limits(gog.Args()),
                           max_new_tokens=512, max_total_tokens=8192, generate=replay(tiny.tokenizer, texts))
        assert gog.gog_reward(r.trajectory, r.answer, q["answers"])["reward"] == 1.0, q["id"]
        seen = [t["observation"] for t in r.trajectory if t["role"] == "tool"]
        assert seen == [m["content"][-1]["text"] for m in msgs[2:] if m["role"] == "user"]  # SFT == RL view
        if q["level"] == "gaze":  # image search on the crop really names the target entity
            assert any(o.startswith(f"Image 1(Title: {q['target']})") for o in seen), seen
            stats = gog.tool_use_stats([r])
            assert stats["gaze_rate"] == 1.0 and stats["mixed_search_rate"] == 1.0
            assert stats["reflection_after_wrong_crop_rate"] == (1.0 if reflective else None)


def test_no_gaze_oracle_uses_no_crop():
    world = gog.build_world(1, 1, 224)
    gaze_q = next(q for q in world.questions if q["level"] == "gaze")
    msgs = gog.oracle_trajectory(world, gaze_q, gaze=False)
    text = " ".join(m["content"] for m in msgs if m["role"] == "assistant")
    assert "<tool_call>" not in text and "<image_search>" in text


# ---------------------------------------------------------------------------------------------
# levels and data loading
# ---------------------------------------------------------------------------------------------
def test_levels_split_on_a_fake_pass_rate_table():
    rates = {"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.75, "e": 1.0, "f": 0.0}
    l1, l2, expanded = gog.split_levels(rates, level2_max=0.25, level1_max=0.75)
    assert l1 == ["c", "d"] and l2 == ["a", "b", "f"] and expanded == {"level1": 0, "level2": 0}
    l1, l2, expanded = gog.split_levels(rates, 0.25, 0.75, min_size=3)  # Level 1 filled nearest 0.5
    assert l1 == ["c", "d", "b"] and expanded == {"level1": 1, "level2": 0}


def test_benchmark_loader_names_file_and_line(tmp_path):
    gog.build_world(0, 1, 112).scenes[0]["image"].save(tmp_path / "x.png")
    good = {"image": "x.png", "question": "Who?", "answers": ["Kalo"]}
    path = tmp_path / "fvqa.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(dict(good, answers="Kalo")) + "\n")
    rows = gog.load_benchmark(str(path))
    assert [r["answers"] for r in rows] == [["Kalo"], ["Kalo"]] and rows[0]["level"] == "fvqa"
    for bad, msg in [("{not json", "not valid JSON"), (json.dumps({"image": "x.png", "question": "q"}), "answers"),
                     (json.dumps(dict(good, answers=[])), "answers"), (json.dumps(dict(good, image="no.png")), "no.png")]:
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=rf"fvqa.jsonl:2: .*{msg}"):
            gog.load_benchmark(str(path))
    with pytest.raises(UserError, match="missing.jsonl"):
        gog.load_benchmark(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------
# CLI and the whole pipeline
# ---------------------------------------------------------------------------------------------
run_gog = functools.partial(run_script, "gog.py", timeout=600)


def test_help():
    p = run_gog("--help", timeout=120)
    assert p.returncode == 0 and "--num_generations" in p.stdout and "lambda" in p.stdout


def test_stage_all_tiny_smoke(tmp_path):
    out, bench = tmp_path / "run", tmp_path / "toy_test.jsonl"
    gog.build_world(0, 1, 112).scenes[0]["image"].save(tmp_path / "x.png")
    bench.write_text(json.dumps({"image": "x.png", "question": "Who?", "answers": ["Kalo"]}) + "\n")
    p = run_gog("--stage", "all", "--model", "tiny", "--out", str(out), "--n_scenes", "2",
                   "--image_size", "112", "--max_new_tokens", "8", "--max_steps", "1", "--sft_max_steps", "1",
                   "--levels_k", "2", "--filter_k", "2", "--num_generations", "2", "--prompts_per_step", "1",
                   "--max_turns", "2", "--max_completion_length", "96",
                   "--benchmarks", str(bench))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert {"toy", "toy/gaze", "toy_test"} <= set(res["accuracy"]) and "Avg" in res
    assert set(res["tool_use"]["toy"]) >= {"no_search_rate", "single_type_rate", "mixed_search_rate", "gaze_rate",
                                           "reflection_after_wrong_crop_rate", "mean_turns"}
    for f in ["data/oracle_trajectories.html", "sft/adapter/adapter_config.json", "levels/level2.jsonl",
              "rl/metrics.jsonl", "rl/summary.json", "eval/trajectories.html", "ablate/ablate.png"]:
        assert (out / f).is_file(), f
    rl = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "rewards/acc", "rewards/format"} <= set(rl[0])
    table = json.loads((out / "ablate" / "results.json").read_text())["table"]
    assert set(table) == {"GoG-SFT", "SFT w/o gaze", "RL Level 1", "RL Level 2"}
