# Run: pytest tests/test_lras.py -q        (the smollm2 eval run: pytest tests/test_lras.py -q -m slow)
"""lras.py: toy legal world, loaders (MCQ / short answer / Chinese / broken rows), pruning,
the <information> mask in SFT samples, the difficulty filter and sampler, the reward, the search
statistics, the agent loop on scripted (malformed) outputs, and a tiny end-to-end smoke run."""
import functools
import json
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import lras
from common.cli import UserError
from common.grpo import sample_prompts
from common.models import build_tiny_tokenizer
from common.rollout import Rollout
from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "lras"
ARGS = lras.Args()


@pytest.fixture(scope="module")
def world():
    return lras.build_world(0)


@pytest.fixture(scope="module")
def tok_policy():
    """Enough of a policy for encoding (no model weights)."""
    return SimpleNamespace(tokenizer=build_tiny_tokenizer(), image_processor=None)


# ---------------------------------------------------------------------------------------------
# toy world and oracle
# ---------------------------------------------------------------------------------------------
def test_world_is_deterministic_and_split_by_charge(world):
    again = lras.build_world(0)
    assert again.questions == world.questions and again.docs == world.docs
    assert lras.build_world(1).questions != world.questions
    train, test = lras.split_world(world)
    assert {q["id"].split("-")[0] for q in train}.isdisjoint({q["id"].split("-")[0] for q in test})
    assert {q["hops"] for q in world.questions} == {0, 1, 2}
    assert {q["type"] for q in world.questions} == {"mcq", "short"}
    assert len({q["id"] for q in world.questions}) == len(world.questions)


def test_clean_oracle_is_correct_well_formed_and_every_search_contributes(world):
    rng = random.Random(0)
    for q in world.questions:
        turns, answer = lras.oracle_trajectory(world, q, rng)
        assert lras.score(answer, q) == 1.0
        assert lras.lras_reward(turns, answer, q)["reward"] == pytest.approx(1.1)
        pruned, dropped = lras.prune_trajectory(turns, q["support"])
        assert pruned == turns and dropped == 0, q["id"]
        assert sum(t["role"] == "tool" for t in turns) == q["hops"]


def test_noisy_oracle_error_model_and_boundary_filter(world):
    train, _ = lras.split_world(world)
    args = lras.Args(teacher_samples=8, teacher_error=0.1, teacher_detour=0.0)
    samples = lras.teacher_samples(args, world, train)
    rate = {h: [] for h in (0, 1, 2)}
    for q, ss in zip(train, samples):
        rate[q["hops"]] += [lras.score(a, q) for _, a in ss]
        for turns, a in ss:   # a wrong answer is always a closed-loop one: no search
            if lras.score(a, q) == 0:
                assert not any(t["role"] == "tool" for t in turns)
    mean = {h: sum(v) / len(v) for h, v in rate.items()}
    assert mean[0] > mean[1] > mean[2]          # error = 0.1 * (1 + hops)
    assert abs(mean[2] - 0.7) < 0.1
    never_wrong = lras.Args(teacher_samples=8, teacher_error=0.0, teacher_detour=0.0)
    assert all(lras.score(a, q) == 1 for q, ss in zip(train, lras.teacher_samples(never_wrong, world, train))
               for _, a in ss)


# ---------------------------------------------------------------------------------------------
# pruning on hand-written trajectories
# ---------------------------------------------------------------------------------------------
def obs(*titles):
    return "\n".join(f"Doc {i}(Title: {t}) text of {t}" for i, t in enumerate(titles, 1))


def search_turns(query, observation):
    return [{"role": "assistant", "text": f"<think>t</think><search>{query}</search>"},
            {"role": "tool", "name": "text_search", "args": {"query": query}, "observation": observation}]


ANSWER = [{"role": "assistant", "text": "<think>done</think><answer>B</answer>"}]


def test_pruning_drops_useless_redundant_and_invalid_turns():
    useless = search_turns("salt smuggling", obs("Article 12", "Case 2011-100"))
    case = search_turns("Case 2019-014", obs("Case 2019-014", "Case 2019-222"))
    art = search_turns("grain hoarding", obs("Article 237", "Case 2019-014"))
    again = search_turns("grain hoarding penalty", obs("Article 237"))   # nothing new: redundant
    invalid = [{"role": "assistant", "text": "hmm"},
               {"role": "tool", "name": "reprompt", "args": {}, "observation": lras.REPROMPT}]
    turns = useless + case + invalid + art + again + ANSWER
    pruned, dropped = lras.prune_trajectory(turns, ["Case 2019-014", "Article 237"])
    assert pruned == case + art + ANSWER
    assert dropped == 3
    # "Article 23" is not "Article 237": titles match whole
    assert lras.contributes(obs("Article 237"), ["Article 23"]) == set()


def test_pruning_rejects_lucky_guesses_and_keeps_direct_answers():
    turns = search_turns("salt", obs("Article 12")) + ANSWER
    assert lras.prune_trajectory(turns, ["Article 237"]) == (None, 1)     # never retrieved the support
    assert lras.prune_trajectory(turns, []) == (ANSWER, 1)                 # hops 0: the search was unneeded
    assert lras.prune_trajectory(ANSWER, []) == (ANSWER, 0)


# ---------------------------------------------------------------------------------------------
# SFT sample: <information> tokens masked
# ---------------------------------------------------------------------------------------------
def test_sft_sample_masks_information_exactly(world, tok_policy):
    q = next(q for q in world.questions if q["hops"] == 2)
    turns, _ = lras.oracle_trajectory(world, q, random.Random(0))
    enc = lras.sft_sample(tok_policy, q, turns)
    tok = tok_policy.tokenizer
    assert len(enc.input_ids) == len(enc.loss_mask)
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
    untrained = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert "<information>" not in trained and "Doc 1(Title:" not in trained
    assert untrained.count("<information>Doc 1(Title:") == 2   # (the system prompt names the tag too)
    assert "You are a legal assistant" in untrained and q["question"][:30] in untrained
    assert trained.replace("<|im_end|>", "") == "".join(t["text"] for t in turns if t["role"] == "assistant")
    assert enc.input_ids[-1] == tok.eos_token_id and enc.loss_mask[-1] == 1
    # the whole sequence is prompt + assistant + inline observation, nothing else
    full = tok.decode(enc.input_ids)
    assert full.count("<|im_start|>assistant") == 1 and "</information>\n<think>" in full


# ---------------------------------------------------------------------------------------------
# difficulty filter and sampler on a fake pass-rate table
# ---------------------------------------------------------------------------------------------
def test_difficulty_filter_and_weighted_sampler():
    rates = {"solved": 1.0, "failed": 0.0, "easy": 0.75, "mid": 0.5, "hard": 0.25}
    table = lras.difficulty_table(rates)
    assert table == {"easy": 0.25, "mid": 0.5, "hard": 0.75}
    ids = list(table)
    w = lras.sampling_weights(ids, table, uniform=False)
    assert w == [0.25, 0.5, 0.75]
    assert lras.sampling_weights(ids, table, uniform=True) is None
    draws = Counter(i for s in range(600) for i in sample_prompts(len(ids), 2, s, seed=0, weights=w))
    freq = [draws[i] / 1200 for i in range(3)]                     # expected 1/6, 2/6, 3/6
    assert freq[0] < freq[1] < freq[2]
    assert all(abs(f - e) < 0.05 for f, e in zip(freq, (1 / 6, 2 / 6, 3 / 6)))
    assert lras.difficulty_table({"a": 0.0, "b": 1.0}) == {}


# ---------------------------------------------------------------------------------------------
# reward and eval statistics
# ---------------------------------------------------------------------------------------------
MCQ = {"type": "mcq", "rule": "choice", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "B",
       "golds": ["B"]}
SHORT = {"type": "short", "rule": "closed", "options": {}, "answer": "2 to 5 years", "golds": ["2 to 5 years"]}


def test_reward_terms():
    good = [{"role": "assistant", "text": "<think>a</think><search>q</search>"},
            {"role": "tool", "name": "text_search", "args": {"query": "q"}, "observation": "o"},
            {"role": "assistant", "text": "<think>b</think><answer>B</answer>"}]
    assert lras.lras_reward(good, "B", MCQ) == {"reward": 1.1, "acc": 1.0, "format": 1.0}
    assert lras.lras_reward(good, "C", MCQ) == {"reward": pytest.approx(0.1), "acc": 0.0, "format": 1.0}
    no_think = [{"role": "assistant", "text": "<answer>2 to 5 years</answer>"}]
    assert lras.lras_reward(no_think, "2 to 5 years", SHORT) == {"reward": 1.0, "acc": 1.0, "format": 0.0}
    malformed = [{"role": "assistant", "text": "<think>x</think><search>oops"},
                 {"role": "tool", "name": "error", "args": {}, "observation": "Error: unclosed"}]
    assert lras.lras_reward(malformed, None, SHORT) == {"reward": 0.0, "acc": 0.0, "format": 0.0}
    assert lras.score("The term is 2 to 5 years of imprisonment", SHORT) == 1.0
    assert lras.score(" ".join(["2 to 5 years"] * 5), SHORT, max_answer_words=12) == 0.0   # lists do not pay
    assert lras.score("答案是B", MCQ) == 1.0


def fake_rollout(searches, answer, example):
    return Rollout(prompt_ids=[], tool_calls={"text_search": searches} if searches else {}, answer=answer,
                   turns=searches + 1, example=example)


def test_search_stats_by_hand():
    rs = [fake_rollout(0, "B", MCQ), fake_rollout(0, "C", MCQ), fake_rollout(0, None, MCQ),
          fake_rollout(1, "B", MCQ), fake_rollout(2, "A", MCQ)]
    accs = [lras.score(r.answer, MCQ) for r in rs]
    assert accs == [1, 0, 0, 1, 0]
    s = lras.search_stats(rs, accs)
    assert s["search_rate"] == pytest.approx(2 / 5)
    assert s["searches_per_question"] == pytest.approx(3 / 5)
    assert s["multi_search_rate"] == pytest.approx(1 / 5)
    assert s["accuracy_searched"] == pytest.approx(1 / 2)
    assert s["accuracy_not_searched"] == pytest.approx(1 / 3)
    assert s["failures_without_search"] == pytest.approx(2 / 3)   # the paper's 71.3 % statistic
    assert s["answer_rate"] == pytest.approx(4 / 5)
    assert lras.search_stats(rs[:1], accs[:1])["failures_without_search"] is None


# ---------------------------------------------------------------------------------------------
# the agent loop on scripted, partly malformed outputs (no model weights)
# ---------------------------------------------------------------------------------------------
def test_agent_loop_reprompts_and_searches(world, tok_policy):
    q = next(q for q in world.questions if q["task"] == "article" and q["split"] == "test")
    art = q["support"][0]
    name = next(c["name"] for c in world.charges if c["article"] == art)
    script = ["I am not sure.", "<search>unclosed", f"<think>look up</think><search>{name} article</search>",
              f"<think>found</think><answer>{q['answer']}</answer>"]
    calls = []

    def gen(policy, seqs, **kw):
        calls.append(kw["max_new_tokens"])
        return [policy.tokenizer(script[len(calls) - 1], add_special_tokens=False)["input_ids"] for _ in seqs]
    args = lras.Args(max_completion_length=4096)
    [r] = lras.agent_rollouts(tok_policy, [q], args, world.search, 1, 1.0, generate=gen)
    assert [t.get("name") for t in r.trajectory if t["role"] == "tool"] == ["reprompt", "error", "text_search"]
    assert r.answer == q["answer"] and r.tool_calls == {"text_search": 1}
    assert lras.score(r.answer, q) == 1.0 and not lras.format_ok(r.trajectory)
    assert f"(Title: {art})" in r.trajectory[-2]["observation"]
    text = tok_policy.tokenizer.decode(r.ids)
    assert text.count("<information>") == 3 and lras.REPROMPT in text
    gen_text = tok_policy.tokenizer.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert "<information>" not in gen_text


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def test_load_mcq_jsonl_with_letter_lists():
    rows = lras.load_benchmark(str(FIX / "mcq.jsonl"), ARGS)
    assert [r["type"] for r in rows] == ["mcq", "mcq"]
    assert rows[0]["answer"] == "B" and rows[0]["options"]["B"] == "Article 237"
    assert rows[1]["answer"] == "AC" and rows[1]["options"] == {"A": "theft", "B": "fraud", "C": "bribery", "D": "forgery"}
    assert lras.score("AC", rows[1]) == 1.0


def test_load_chinese_jecqa_json_with_field_flags():
    rows = lras.load_benchmark(str(FIX / "jecqa_zh.json"), ARGS)
    assert rows[0]["question"].startswith("甲盗窃") and rows[0]["answer"] == "A"
    assert rows[1]["answer"] == "AC" and rows[1]["options"]["C"] == "拘役"
    assert rows[0]["task"] == "jecqa_zh"
    assert lras.score("答案是A", rows[0]) == 1.0
    assert "A. 盗窃罪" in lras.make_messages(rows[0])[1]["content"]


def test_load_short_answer_csv_chinese_and_option_columns():
    rows = lras.load_benchmark(str(FIX / "short_zh.csv"), ARGS)
    assert [r["type"] for r in rows] == ["short", "short"]
    assert rows[0]["golds"] == ["三年以下有期徒刑"] and rows[0]["task"] == "penalty"
    assert rows[1]["question"].endswith("in marks?")         # quoted comma survives
    assert lras.score("处三年以下有期徒刑", rows[0]) == 1.0
    assert lras.score("4,200 marks", rows[1]) == 1.0
    [mc] = lras.load_benchmark(str(FIX / "mcq_columns.csv"), ARGS)
    assert mc["type"] == "mcq" and mc["answer"] == "C" and mc["options"]["D"] == "Article 4"


@pytest.mark.parametrize("name, line, words", [
    ("bad_answer.jsonl", "3", "not option letter"),
    ("bad_json.jsonl", "2", "not valid JSON"),
    ("bad_missing.csv", "3", "question"),
    ("bad_record.json", "item 2", "answer"),
])
def test_broken_rows_name_file_and_line(name, line, words):
    with pytest.raises(UserError, match=re.escape(f"{name}:{line}:") + ".*" + words):
        lras.load_benchmark(str(FIX / name), ARGS)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no benchmark file"):
        lras.load_benchmark(str(tmp_path / "nope.jsonl"), ARGS)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        lras.load_benchmark(str(tmp_path / "empty.jsonl"), ARGS)


# ---------------------------------------------------------------------------------------------
# CLI: --help, a bad request, and the tiny smoke run
# ---------------------------------------------------------------------------------------------
run = functools.partial(run_script, "lras.py", timeout=240)


def test_help():
    p = run("--help")
    assert p.returncode == 0 and "--difficulty_k" in p.stdout and "Deviations" in p.stdout


def test_data_stage_validates_user_file(tmp_path):
    p = run("--stage", "data", "--out", str(tmp_path), "--data_file", str(FIX / "jecqa_zh.json"),
            "--field_question", "statement", "--field_options", "option_list")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["data_file"]["records"] == 2
    bad = run("--stage", "data", "--out", str(tmp_path), "--data_file", str(FIX / "bad_answer.jsonl"))
    assert bad.returncode != 0 and "bad_answer.jsonl:3:" in bad.stderr


def test_smoke_all_tiny(tmp_path):
    p = run("--stage", "all", "--model", "tiny", "--out", str(tmp_path), "--n_charges", "6", "--test_charges", "2",
            "--difficulty_k", "2", "--max_steps", "1", "--ablate_steps", "1",
            "--num_generations", "2", "--prompts_per_step", "1", "--eval_questions", "4", "--ablate_questions", "2",
            "--max_new_tokens", "12", "--max_completion_length", "64", "--sft_max_steps", "2", "--max_turns", "3",
            "--data_file", str(FIX / "short_zh.csv"), "--corpus_file", str(FIX / "corpus.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in ("search_rate", "searches_per_question", "accuracy_searched", "accuracy_not_searched",
                "failures_without_search", "multi_search_rate"):
        assert key in res["search"]["toy"]
    assert "toy" in res["score"] and "short_zh" in res["score"] and "short_zh/penalty" in res["score"]
    sft = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert sft["data"]["trajectories"] > 0 and (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    assert "difficulty" in json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert "starting from the adapter" in p.stdout and "sft/adapter" in p.stdout
    abl = json.loads((tmp_path / "ablate" / "results.json").read_text())["table"]
    assert set(abl) == {"base", "SFT", "SFT+RL difficulty", "SFT+RL uniform"}


def test_eval_on_user_file_without_corpus_is_one_clear_error(tmp_path):
    p = run("--stage", "eval", "--model", "tiny", "--out", str(tmp_path), "--data_file", str(FIX / "short_zh.csv"))
    assert p.returncode != 0 and "--corpus_file" in p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_smollm2_eval_runs(tmp_path):
    p = run("--stage", "eval", "--model", "smollm2", "--out", str(tmp_path), "--eval_questions", "8",
            "--max_new_tokens", "64", "--max_completion_length", "512", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n"]["toy"] == 8 and 0.0 <= res["score"]["toy"] <= 1.0
