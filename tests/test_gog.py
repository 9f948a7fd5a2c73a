# Run: pytest tests/test_gog.py -q        (about a minute on 2 CPU cores; no downloads)
"""Tests for gog.py: the GoG reward on hand-written trajectories, the toy world (deterministic,
oracle trajectories replayed through the real parser and tools score reward 1), the levels
split, the benchmark loader, and a subprocess smoke run of every stage on the tiny model."""
import functools
import json
import random
import re

import pytest
import torch

import gog
from common.models import load_policy
from common.rollout import Rollout, run_rollouts
from common.standins.toyworld import build_world, to_seen
from helpers import run_script
from test_gog_benchmarks import write_mmsearch



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
    ("malformed turn, then correct",
     [turn("<text_search>Kalo founded"), obs("error", "Error: unclosed"),
      turn("<answer>1901</answer>")], "1901",
     {"reward": 0.9, "acc": 1.0, "format": 0.0}),
    ("no answer at all", [turn("I think it is 1901.")], None,
     {"reward": 0.0, "acc": 0.0, "format": 0.0}),
    ("correct without search (no tool bonus or penalty)",
     [turn("<reason>glance</reason><answer>1901</answer>")],
     "1901", {"reward": 1.0, "acc": 1.0, "format": 1.0}),
    ("answer too long (sub-EM would reward lists)", [turn("<answer>x</answer>")],
     "1899 1900 1901 1902 1903 1904 1905 1906 1907 1908 1909",
     {"reward": 0.1, "acc": 0.0, "format": 1.0}),
])
def test_reward_on_hand_written_trajectories(name, trajectory, answer, expected):
    got = gog.gog_reward(trajectory, answer, ["1901"], lam=0.1, max_answer_words=10)
    assert got == pytest.approx(expected), name


# ---------------------------------------------------------------------------------------------
# the toy world: held out for real, an honest oracle, a world that needs gaze
# ---------------------------------------------------------------------------------------------
def world_fingerprint(w):
    return ([q for q in w.questions], w.text_kb,
            [(s["id"], s["tiles"], s["image"].tobytes()) for s in w.scenes],
            [(e["name"], e["caption"], e["image"].tobytes()) for e in w.image_kb])


def test_world_is_deterministic_for_a_seed():
    a, b, c = build_world(3, 2, 224), build_world(3, 2, 224), build_world(4, 2, 224)
    assert world_fingerprint(a) == world_fingerprint(b)
    assert world_fingerprint(a) != world_fingerprint(c)
    assert {q["kind"] for q in a.questions} == {"glance", "text", "image", "gaze"}
    for s in a.scenes:  # the contract prm_bench.py relies on
        assert s["image"].size == (224, 224)
        for t in s["tiles"]:
            assert (set(t) >= {"name", "box", "color", "shape", "is_distractor", "label"}
                    and len(t["box"]) == 4)


def training_texts(world, args):
    """Every text SFT and RL see: train questions + answers, oracle trajectories with
    observations."""
    train, _ = gog.split_world(world)
    texts = [q["question"] + " " + q["answers"][0] for q in train]
    for _, turns in gog.oracle_data(world, train, args):
        texts += [t.get("text") or t.get("observation") for t in turns]
    return "\n".join(texts)


def test_test_entities_and_pairs_never_reach_training_data():
    world, args = build_world(0, 16, 224), gog.Args(reflect_frac=1.0)
    train, test = gog.split_world(world)
    assert train and test
    pairs = {(q["question"], a) for q in train for a in q["answers"]}
    assert not [q["id"] for q in test if any((q["question"], a) in pairs for a in q["answers"])]
    text = training_texts(world, args)
    held_out = [e for e in world.entities if e["split"] == "test"]
    assert held_out and not [e["name"] for e in held_out if e["name"] in text or e["label"] in text]
    assert not [s["place"] for s in world.scenes if s["split"] == "test" and s["place"] in text]
    # the check can hit
    assert {e["name"] for e in world.entities if e["split"] == "train"} & set(text.split())


def replay(tokenizer, texts):
    """A scripted `generate` for run_rollouts: turn i of the (single) rollout emits texts[i]."""
    state = {"i": 0}

    def generate(policy, seqs, **kw):
        text = texts[state["i"]]
        state["i"] += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [ids + ([tokenizer.eos_token_id] if "<answer>" in text else [])]
    return generate


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", lora=False)


def test_oracle_replays_through_the_real_loop_and_states_only_what_it_saw(tiny):
    world = build_world(1, 4, 224)
    names = [e["name"] for e in world.entities] + [s["place"] for s in world.scenes]
    labels = [t["label"] for s in world.scenes for t in s["tiles"]]
    rng = random.Random(0)
    cases = ([(q, False, "gaze oracle") for q in world.questions]
             + [(q, refl, "whole-image oracle") for q in world.questions if q["kind"] == "gaze"
                for refl in (False,)]
             + [(q, True, "gaze oracle") for q in world.questions if q["kind"] == "gaze"])
    for q, reflective, policy in cases:
        turns, answer = gog.scripted_episode(world, q, policy, reflective, rng)
        texts = [t["text"] for t in turns if t["role"] == "assistant"]
        [r] = run_rollouts(tiny, [world.example(q)], num_generations=1,
                           make_messages=gog.make_messages,
                           tools=gog.make_tools(*world.searchers(q["split"]), 3),
                           grammar=gog.GRAMMAR, max_turns=6,
                           max_tool_calls={"crop": 3, "image_search": 2, "text_search": 2},
                           max_new_tokens=512, max_total_tokens=8192,
                           generate=replay(tiny.tokenizer, texts))
        seen = [t["observation"] for t in r.trajectory if t["role"] == "tool"]
        # SFT == RL view
        assert seen == [t["observation"] for t in turns if t["role"] == "tool"], q["id"]
        if policy == "gaze oracle":
            assert gog.gog_reward(r.trajectory, r.answer, q["answers"])["reward"] == 1.0, q["id"]
        # honesty: a name is stated only after the question or an observation showed it;
        # a tile label and a name together only after a crop search
        known, linked = q["question"], ""
        for t in r.trajectory:
            if t["role"] == "assistant":
                assert not [n for n in names
                            if n in t["text"] and n not in known], (q["id"], policy, t["text"])
                for sentence in re.split(r"[.;]\s", t["text"]):
                    pairs = [n for n in names if n in sentence
                             and any(lb in sentence for lb in labels)]
                    assert not [n for n in pairs if n not in linked], (q["id"], policy, sentence)
            else:
                known += " " + t["observation"]
                linked += (t["observation"] if t["observation"].startswith("Searched with crop")
                           else "")
        if q["kind"] == "gaze" and policy == "gaze oracle":
            stats = gog.tool_use_stats([r])
            assert stats["gaze_rate"] == 100.0 and stats["mixed_search_rate"] == 100.0
            assert stats["reflection_after_wrong_crop_rate"] == (100.0 if reflective else None)
            assert stats["decision_accuracy"] == 100.0


def test_whole_image_search_stays_available_after_a_crop():
    world = build_world(1, 2, 224)
    scene, q = world.scenes[0], world.questions[3]
    tile = next(t for t in scene["tiles"] if t["name"] == q["target"])
    tools = gog.make_tools(*world.searchers("train"), 3)
    r = Rollout(prompt_ids=[], images=[scene["image"]])
    r.images.append(tools["crop"]({"bbox_2d": to_seen(tile["cell"], scene["image"])}, r)[1])
    whole, on_crop = tools["image_search"]({}, r)[0], tools["image_search"]({"image": "crop"}, r)[0]
    assert whole.startswith("Searched with the whole image.") and "Photo of the" in whole
    assert (on_crop.startswith("Searched with crop 1.")
            and f"The emblem of {tile['name']}" in on_crop)


def test_scripted_policies_show_that_the_world_needs_gaze():
    table = gog.policy_table(build_world(0, 40, 224), gog.Args())
    assert table["gaze oracle"]["all"] == 100.0
    assert (table["gaze oracle"]["gaze/cluttered"]
            - table["whole-image oracle"]["gaze/cluttered"] >= 50)
    assert table["never search"]["gaze"] < 30 and table["never search"]["glance"] == 100.0


def test_scripted_table_intervals_and_chance_levels():
    """Each cell's Wilson interval holds its value; the guessing policies' expected gaze accuracy:
    the whole-image oracle picks 1 of 2 (sparse) or 5 (cluttered) emblems, at least 1/2 and 1/5
    (more when a wrong emblem shares the asked fact); never search 1/10 for a city, 1/196 a year."""
    world = build_world(0, 40, 224)
    table = gog.policy_table(world, gog.Args())
    spread, chance = gog.table_intervals(world, table), gog.gaze_chance(world)
    assert spread["n"]["gaze"] == spread["n"]["gaze/sparse"] + spread["n"]["gaze/cluttered"] == 10
    for p, row in spread["ci95"].items():
        for c, (lo, hi) in row.items():
            assert lo <= table[p][c] <= hi and (hi - lo) > 0
    whole, never = chance["whole-image oracle"], chance["never search"]
    assert 50 <= whole["gaze/sparse"] <= 100 and 20 <= whole["gaze/cluttered"] < 50
    assert 100 / 196 <= never["gaze"] <= 10


def test_search_k_and_max_answer_words_are_used():
    world = build_world(1, 2, 224)
    q = next(q for q in gog.split_world(world)[0] if q["kind"] == "text")
    # the oracle's text search shows --search_k hits (2 documents exist per entity)
    for k in (1, 3):
        [(_, turns)] = gog.oracle_data(world, [q], gog.Args(search_k=k))
        assert turns[1]["observation"].count("Doc ") == min(k, 2)
    rs = [Rollout(prompt_ids=[], answer="in the year 1901",
                  example={"question": "?", "answers": ["1901"]})]
    assert gog.rollout_accs(rs, gog.Args(max_answer_words=4)) == [1.0]
    assert gog.rollout_accs(rs, gog.Args(max_answer_words=3)) == [0.0]


def test_judge_flag_reaches_every_accuracy(monkeypatch):
    class FakeJudge:
        def chat(self, batch, **kw):
            return ["correct"] * len(batch)
    monkeypatch.setattr(gog, "load_judge", lambda name: FakeJudge() if name else None)
    rs = [Rollout(prompt_ids=[], answer="wrong", example={"question": "?", "answers": ["1901"]})]
    assert (gog.rollout_accs(rs, gog.Args()) == [0.0]
            and gog.rollout_accs(rs, gog.Args(judge="x")) == [1.0])


@pytest.mark.parametrize("box, right", [([-6, -6, 18, 18], True),  # the tile grown 1.5x: IoU 0.44
                                        ([0, 0, 12, 12], True),
                                        ([0, 0, 40, 40], False),   # 11x the area
                                        ([3, 0, 15, 12], False),   # 75 % of the tile
                                        ([20, 20, 32, 32], False)])
def test_gaze_correctness_rule(box, right):
    assert gog.crop_is_right(box, [0, 0, 12, 12]) is right


# ---------------------------------------------------------------------------------------------
# levels
# ---------------------------------------------------------------------------------------------
def test_levels_are_disjoint_and_expansion_says_from_where():
    rates = {"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.75, "e": 1.0, "f": 0.0, "g": 1.0}
    l1, l2, expanded = gog.split_levels(rates, level2_max=0.25, level1_max=0.75)
    assert l1 == ["c", "d"] and l2 == ["a", "b", "f"] and expanded["level1"]["added"] == 0
    # Level 1 filled from neither level
    l1, l2, expanded = gog.split_levels(rates, 0.25, 0.75, min_size=3)
    assert not set(l1) & set(l2)
    assert l1 == ["c", "d", "e"] and expanded["level1"] == {"added": 1, "pass_rates": [1.0]}


def test_level2_top_up_takes_the_lowest_pass_rates():
    """Level 2 under min_size is filled from the next lowest pass rates (Level 1's hardest), not
    from questions the SFT model always solves; Level 1 then refills nearest 0.5."""
    rates = {"a": 0.375, "b": 0.5, "c": 0.625, "d": 1.0, "e": 1.0, "f": 0.875}
    l1, l2, expanded = gog.split_levels(rates, 0.25, 0.75, min_size=2)
    assert l2 == ["a", "b"] and expanded["level2"] == {"added": 2, "pass_rates": [0.375, 0.5]}
    assert l1 == ["c", "f"] and expanded["level1"] == {"added": 1, "pass_rates": [0.875]}
    assert max(rates[q] for q in l2) <= min(rates[q] for q in l1 + ["d", "e"])


# ---------------------------------------------------------------------------------------------
# CLI and the whole pipeline
# ---------------------------------------------------------------------------------------------
run_gog = functools.partial(run_script, "gog.py", timeout=600)


def test_help():
    p = run_gog("--help", timeout=120)
    assert p.returncode == 0 and "--num_generations" in p.stdout and "lambda" in p.stdout


def test_stage_all_tiny_smoke(tmp_path):
    out = tmp_path / "run"
    bench = write_mmsearch(tmp_path)
    p = run_gog("--stage", "all", "--model", "tiny", "--out", str(out), "--n_scenes", "4",
                "--image_size", "112", "--max_new_tokens", "8", "--max_steps", "1",
                "--sft_max_steps", "1", "--levels_k", "2", "--filter_k", "2",
                "--num_generations", "2", "--prompts_per_step", "1", "--max_turns", "2",
                "--max_completion_length", "96", "--benchmarks", f"MMSearch={bench}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| gaze oracle |" in p.stdout and "[ablate] reuses" in p.stdout
    res = json.loads((out / "eval" / "results.json").read_text())
    assert ({"glance", "text", "image", "gaze"} <= set(res["toy"]["by_kind"])
            and res["Avg"] == res["benchmarks"]["MMSearch"]["F1"])
    assert set(res["toy"]["tool_use"]) >= {"no_search_rate", "single_type_rate",
                                           "mixed_search_rate", "gaze_rate",
                                           "reflection_after_wrong_crop_rate",
                                           "decision_accuracy", "format_rate"}
    for f in ["data/oracle_trajectories.html", "data/scripted_policies.json",
              "sft/adapter/adapter_config.json", "levels/level2.jsonl", "rl/metrics.jsonl",
              "rl/summary.json", "eval/trajectories.html", "ablate/ablate.png"]:
        assert (out / f).is_file(), f
    rl = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "rewards/acc", "rewards/format"} <= set(rl[0])
    table = json.loads((out / "ablate" / "results.json").read_text())["table"]
    assert set(table) == {"GoG-SFT", "SFT w/o gaze", "RL Level 1", "RL Level 2"}


def test_full_sft_base_weights_travel_with_the_adapter(tmp_path):
    """--full_sft: the trained base weights are saved in the adapter folder and load with it, and a
    policy loaded from that adapter (RL after full SFT) saves them again with its own adapter."""
    args = gog.Args(model="tiny")
    policy = gog.get_policy(args)
    policy.train_all_weights()
    name, weight = next((n, p) for n, p in policy.model.named_parameters() if "embed_tokens" in n)
    assert weight.requires_grad
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    policy.save_adapter(str(tmp_path / "sft" / "adapter"))
    rl = gog.get_policy(args, str(tmp_path / "sft" / "adapter"))
    again = dict(rl.model.named_parameters())[name]
    assert torch.equal(again, weight) and not torch.equal(again, before) and not again.requires_grad
    rl.save_adapter(str(tmp_path / "rl" / "adapter"))
    final = dict(gog.get_policy(args, str(tmp_path / "rl" / "adapter"))
                 .model.named_parameters())[name]
    assert torch.equal(final, weight)
    plain = dict(gog.get_policy(args).model.named_parameters())[name]
    assert torch.equal(plain, before)   # a fresh load does not see them


def test_sft_fields_reach_the_sft_config_and_the_help():
    """gog's Args takes the SFT fields from common/sft.py's SFTArgs; sft_config maps them
    one to one."""
    from common.cli import field_groups
    from common.sft import sft_config
    cfg = sft_config(gog.Args(sft_learning_rate=3e-3, sft_epochs=8.0, sft_batch_size=5,
                              sft_max_steps=7, micro_batch_size=2, seed=11))
    assert (cfg.learning_rate, cfg.epochs, cfg.batch_size, cfg.max_steps, cfg.micro_batch_size,
            cfg.seed) == (3e-3, 8.0, 5, 7, 2, 11)
    groups = field_groups(gog.Args)
    assert (groups["sft_epochs"] == groups["full_sft"] == "SFT"
            and groups["beta"] == "GRPO (TRL names)")


def test_markdown_table_of_the_scripted_policies():
    from common.runlog import markdown_table
    table = {"gaze oracle": {"glance": 100.0, "gaze": None},
             "never search": {"glance": 87.25, "gaze": 12.5}}
    assert markdown_table(table, "policy").splitlines() == [
        "| policy | glance | gaze |", "|---|---|---|", "| gaze oracle | 100.0 | - |",
        "| never search | 87.2 | 12.5 |"]
