# Run: pytest tests/test_prm_bench.py -q        (~1 min on 2 CPU cores; no downloads)
"""Tests for prm_bench.py: every metric on hand-computed cases (empty classes, all-correct
trajectories), the toy set's injected errors (right step, right type, really wrong), the record
validator's messages, the PRM reply parser and scoring loop, best-of-N, and a tiny end-to-end run."""

import functools
import json
import random

import pytest
from PIL import Image

import prm_bench as pb
from common.cli import UserError
from common.judge import exact_match
from gog import build_world
from helpers import run_script



# ----------------------------------------------------------------------------------------------
# metrics, by hand
# ----------------------------------------------------------------------------------------------
def test_f1_score_and_macro():
    assert pb.f1_score(2, 1, 1) == pytest.approx(4 / 6)
    assert pb.f1_score(0, 2, 3) == 0.0           # the class exists but is never hit
    assert pb.f1_score(0, 0, 0) is None           # the class is absent from gold and predictions
    assert pb.macro(0.5, None) == 0.5 and pb.macro(None, None) is None and pb.macro(0.2, 0.4) == pytest.approx(0.3)


def test_processbench():
    # gold first errors [-1, 2, 0, -1]; predicted [-1, 2, 1, 0]
    r = pb.processbench([-1, 2, 0, -1], [-1, 2, 1, 0])
    assert (r["acc_err"], r["acc_corr"], r["f1"]) == (0.5, 0.5, 0.5)
    assert (r["n_err"], r["n_corr"]) == (2, 2)
    r = pb.processbench([3, 1], [3, 0])           # acc_err 0.5, acc_corr undefined
    assert r["acc_err"] == 0.5 and r["acc_corr"] is None and r["f1"] is None
    r = pb.processbench([-1, -1], [-1, -1])       # all-correct trajectories, all right
    assert r["acc_err"] is None and r["acc_corr"] == 1.0 and r["f1"] is None
    r = pb.processbench([1, -1], [-1, 0])         # both accuracies 0 -> F1 0, not undefined
    assert (r["acc_err"], r["acc_corr"], r["f1"]) == (0.0, 0.0, 0.0)
    r = pb.processbench([2, -1, 0], [2, -1, 1])   # acc_err 1/2, acc_corr 1 -> F1 = 2/3
    assert r["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert pb.first_error(["correct", "neutral", "incorrect", "incorrect"]) == 2
    assert pb.first_error(["correct", "neutral"]) == -1
    assert pb.first_flagged([True, True, False]) == 2 and pb.first_flagged([True]) == -1


LABELS = ["correct", "correct", "incorrect", "neutral", "incorrect", "correct"]
PRED = [True, False, False, True, True, True]  # neutral dropped: tp 2, fn 1, tn 1, fp 1


def test_step_metrics_prmbench_visualprocessbench():
    assert pb.confusion(LABELS, PRED) == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    r = pb.prmbench(LABELS, PRED)
    assert r["f1"] == pytest.approx(2 / 3) and r["f1_neg"] == pytest.approx(0.5)
    assert r["PRMScore"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.5)
    v = pb.visualprocessbench(LABELS, PRED)
    assert v["macro_f1"] == pytest.approx(7 / 12) and v["n_steps"] == 5
    s = pb.step_stats(LABELS, PRED)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["detection_rate"] == pytest.approx(0.5)
    b = pb.positive_bias(LABELS, PRED)
    assert b["p_judged_correct_given_wrong"] == 0.5 and b["p_judged_correct_given_right"] == pytest.approx(2 / 3)
    assert b["judged_correct_rate"] == pytest.approx(3 / 5)


def test_step_metrics_empty_classes():
    # all-correct steps all judged correct: F1 = 1, the negative class is absent -> None
    r = pb.prmbench(["correct"] * 3, [True] * 3)
    assert r == {"f1": 1.0, "f1_neg": None, "PRMScore": 1.0}
    assert pb.visualprocessbench(["correct"] * 3, [True] * 3)["macro_f1"] == 1.0
    assert pb.positive_bias(["correct"] * 3, [True] * 3)["p_judged_correct_given_wrong"] is None
    # all-correct steps, one flagged: the negative class exists in predictions only -> F1_neg 0
    r = pb.prmbench(["correct"] * 2, [True, False])
    assert r["f1"] == pytest.approx(2 / 3) and r["f1_neg"] == 0.0 and r["PRMScore"] == pytest.approx(1 / 3)
    # only neutral steps: nothing to score
    r = pb.visualprocessbench(["neutral", "neutral"], [True, False])
    assert r["macro_f1"] is None and r["n_steps"] == 0
    assert pb.step_stats([], [])["accuracy"] is None


def test_position_buckets():
    assert [pb.position_bucket(i, 5, 4) for i in range(5)] == [0, 1, 2, 3, 3]
    assert pb.position_bucket(0, 1, 4) == 0
    assert [pb.position_bucket(i, 3, 2) for i in range(3)] == [0, 1, 1]


def rec(labels, types=None, category="spatial", sub="relative_position"):
    types = types or [None] * len(labels)
    return {"id": "x", "category": category, "subcategory": sub,
            "steps": [{"text": "s", "label": lab, "error_type": t} for lab, t in zip(labels, types)]}


def test_evaluate_by_hand():
    records = [rec(["correct", "incorrect", "neutral"], [None, "tool_invocation", None]),
               rec(["correct", "correct", "incorrect", "neutral"], [None, None, "relationship_understanding", None],
                   "perception", "attribute"),
               rec(["correct", "correct"], category="perception", sub="attribute")]
    pred = [[True, False, True], [True, True, True, False], [True, False]]
    r = pb.evaluate(records, pred, n_buckets=2)
    # ProcessBench: gold first errors (1, 2, -1), predicted (1, 3, 1)
    assert r["ProcessBench"] == {"acc_err": 0.5, "acc_corr": 0.0, "f1": 0.0, "n_err": 2, "n_corr": 1}
    # steps without neutral: (c,T) (i,F) | (c,T) (c,T) (i,T) | (c,T) (c,F) -> tp 4, fn 1, tn 1, fp 1
    assert r["PRMBench"]["f1"] == pytest.approx(8 / 10) and r["PRMBench"]["f1_neg"] == pytest.approx(2 / 4)
    assert r["VisualProcessBench"]["macro_f1"] == pytest.approx(0.65)
    assert r["step_accuracy"] == pytest.approx(5 / 7)
    tool, rel = r["per_error_type"]["tool_invocation"], r["per_error_type"]["relationship_understanding"]
    assert tool["detection_rate"] == 1.0 and tool["accuracy"] == 1.0 and tool["n_trajectories"] == 1
    assert rel["detection_rate"] == 0.0 and rel["accuracy"] == pytest.approx(2 / 3)
    assert "visual_perception" not in r["per_error_type"]          # absent types are left out
    assert r["per_category"]["perception"]["accuracy"] == pytest.approx(3 / 5)
    assert r["per_subcategory"]["spatial/relative_position"]["accuracy"] == 1.0
    # buckets (2): first half gets rel. positions < 0.5: steps 0 of each and step 1 of the 4-step one
    assert r["by_position"]["0.00-0.50"]["n_steps"] == 4 and r["by_position"]["0.50-1.00"]["n_steps"] == 3
    assert r["by_position"]["0.50-1.00"]["accuracy"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------------
def cand(correct, answer, scores, gold=None):
    c = {"correct": correct, "answer": answer, "scores": scores}
    return c if gold is None else dict(c, gold_scores=gold)


def test_best_of_n_by_hand():
    q1 = [cand(True, "red", [0.9, 0.2]), cand(False, "blue", [0.6, 0.6]), cand(False, "Blue.", [0.3, 0.95])]
    q2 = [cand(True, "3", [0.9, 0.8]), cand(False, "4", [0.1, 0.9]), cand(True, "three", [None, 1.0])]
    acc = pb.best_of_n([q1, q2], [3], repeats=5, seed=0)
    # q1: min picks B (0.6), mean picks C (0.625), majority "blue" (2 votes): all wrong
    # q2: min picks A (0.8), mean picks A (0.85; None counts 0 -> C 0.5): right; majority tie 3 / 4 /
    #     three -> random, so only bounds; random = 2/3 exactly; pass@N = 1
    assert acc["prm_min"][3] == 0.5 and acc["prm_mean"][3] == 0.5
    assert acc["random"][3] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert acc["pass@N"][3] == 1.0 and acc["majority_vote"][3] <= 0.5
    assert "oracle_prm_min" not in acc
    with pytest.raises(UserError, match="best-of-4"):
        pb.best_of_n([q1], [4], repeats=1, seed=0)


def test_best_of_n_oracle_and_no_answers():
    q = [cand(False, None, [1.0], [0.0]), cand(True, "x", [0.0], [1.0])]
    acc = pb.best_of_n([q], [1, 2], repeats=50, seed=1)
    assert acc["oracle_prm_min"][2] == 1.0 and acc["prm_min"][2] == 0.0
    assert acc["majority_vote"][2] == 1.0          # the only vote
    assert acc["random"][1] == pytest.approx(acc["random"][1]) and 0.2 < acc["random"][1] < 0.8
    q = [cand(False, None, [0.5]), cand(False, None, [0.5])]
    assert pb.best_of_n([q], [2], repeats=3, seed=0)["majority_vote"][2] == 0.0  # nobody voted


# ----------------------------------------------------------------------------------------------
# the toy set: injected errors land on the stated step with the stated type, and are real errors
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    return build_world(0, 6, 224)


@pytest.fixture(scope="module")
def toy(world):
    return pb.build_toy_set(world, 0, 0.3)


def test_toy_set_labels_are_exact(toy):
    assert {r["injected"]["error_type"] for r in toy if r["injected"]} == set(pb.ERROR_TYPES)
    assert any(r["injected"] is None for r in toy)
    for r in toy:
        labels = [s["label"] for s in r["steps"]]
        if r["injected"] is None:
            assert labels == ["correct"] * len(labels)
            assert exact_match(r["final_answer"], r["answers"]), r["id"]
            continue
        k, t = r["injected"]["step"], r["injected"]["error_type"]
        assert labels == ["correct"] * k + ["incorrect"] + ["neutral"] * (len(labels) - k - 1), r["id"]
        assert r["steps"][k]["error_type"] == t
        assert pb.first_error(labels) == k
        role = pb.KINDS[next(kd for kd, (cs, _) in pb.KINDS.items() if cs == (r["category"], r["subcategory"]))][1][k]
        assert t in pb.ROLE_ERRORS[role]
        assert not exact_match(r["final_answer"], r["answers"]), (r["id"], t)  # the error changes the outcome


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_injected_step_differs_from_the_clean_trajectory(world, seed):
    specs = pb.toy_questions(world, random.Random(seed))
    seen = set()
    for spec in specs:
        roles = pb.KINDS[spec["kind"]][1]
        for t in sorted({t for r in roles for t in pb.ROLE_ERRORS[r]}):
            clean = pb.toy_trajectory(spec, world, None, random.Random(seed), "c")
            bad = pb.toy_trajectory(spec, world, t, random.Random(seed), "b")
            k = bad["injected"]["step"]
            assert roles[k] in [r for r in roles if t in pb.ROLE_ERRORS[r]]
            for i in range(k):  # everything before the error is the clean trajectory
                assert bad["steps"][i]["text"] == clean["steps"][i]["text"]
                assert bad["steps"][i]["tool_call"] == clean["steps"][i]["tool_call"]
            s, c = bad["steps"][k], clean["steps"][k]
            assert (s["text"], s["tool_call"]) != (c["text"], c["tool_call"]), (spec["id"], t)
            if t == "tool_invocation":  # the shared tool really fails
                assert s["tool_image"] is None and s["observation"].startswith("Error:")
            if t == "region_selection":  # a valid crop, of another box
                assert k in bad["_pil"]["steps"] and s["tool_call"]["arguments"] != c["tool_call"]["arguments"]
            if t == "answer_format":
                assert bad["final_answer"] is None or "<answer>" in s["text"]
            seen.add(t)
    assert seen == set(pb.ERROR_TYPES)


def test_toy_set_round_trips_through_the_validator(toy, tmp_path):
    pb.save_records(toy, tmp_path / "toy.jsonl")
    loaded = pb.load_records(str(tmp_path / "toy.jsonl"))
    assert [r["id"] for r in loaded] == [r["id"] for r in toy]
    images, crops = pb.record_images(loaded[0])
    assert images[0].size == (224, 224) and all(isinstance(im, Image.Image) for im in crops.values())


# ----------------------------------------------------------------------------------------------
# the validator and the loader
# ----------------------------------------------------------------------------------------------
def good():
    return {"id": "t1", "question": "What colour?", "images": ["a.png"], "answers": ["red"], "final_answer": "red",
            "category": "perception", "subcategory": "attribute", "source": "me", "injected": None,
            "steps": [{"text": "zoom", "tool_call": {"name": "crop", "arguments": {"bbox_2d": [0, 0, 5, 5]}},
                       "observation": "ok", "tool_image": "a.png", "label": "correct", "error_type": None},
                      {"text": "<answer>red</answer>", "tool_call": None, "observation": None, "tool_image": None,
                       "label": "incorrect", "error_type": "answer_format"}]}


def write(tmp_path, rows, name="d.jsonl"):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def broken(path, value):
    r = good()
    *head, last = path
    obj = r
    for k in head:
        obj = obj[k]
    if value is KeyError:
        del obj[last]
    else:
        obj[last] = value
    return r


@pytest.mark.parametrize("path, value, field", [
    (["question"], KeyError, "'question'"),
    (["answers"], [], "'answers'"),
    (["images"], "a.png", "'images'"),
    (["category"], "vision", "'category'"),
    (["subcategory"], "counting", "'subcategory'"),
    (["steps"], [], "'steps'"),
    (["steps", 0, "text"], "  ", "'steps[0].text'"),
    (["steps", 0, "label"], "wrong", "'steps[0].label'"),
    (["steps", 0, "tool_call"], {"arguments": {}}, "'steps[0].tool_call'"),
    (["steps", 1, "error_type"], None, "'steps[1].error_type'"),
    (["steps", 1, "error_type"], "typo", "'steps[1].error_type'"),
    (["steps", 0, "error_type"], "tool_invocation", "'steps[0].error_type'"),
    (["steps", 1, "tool_image"], "a.png", "'steps[1].tool_image'"),
    (["steps", 0, "tool_image"], "missing.png", "'steps[0].tool_image'"),
    (["images"], ["nope.png"], "'images'"),
    (["injected"], {"step": 0, "error_type": "answer_format"}, "'injected'"),
    (["final_answer"], 3, "'final_answer'"),
])
def test_validator_names_file_line_and_field(tmp_path, path, value, field):
    p = write(tmp_path, [good() | {"id": "t0"}, broken(path, value)])
    with pytest.raises(UserError) as e:
        pb.load_records(p)
    assert f"{p}:2: field {field}" in str(e.value)


def test_loader_errors(tmp_path):
    assert len(pb.load_records(write(tmp_path, [good()]))) == 1
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        pb.load_records(write(tmp_path, [good(), '{"id": "t2", ']))
    with pytest.raises(UserError, match=r"d.jsonl:2: field 'id' 't1' is used by an earlier record"):
        pb.load_records(write(tmp_path, [good(), good()]))
    with pytest.raises(UserError, match="holds no records"):
        pb.load_records(write(tmp_path, [""]))
    with pytest.raises(UserError, match="does not exist"):
        pb.load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"d.jsonl:item 1: expected a JSON object"):
        pb.load_records(write(tmp_path, ["[1, 2]"]))
    unlabeled = good()
    for s in unlabeled["steps"]:
        s.update(label=None, error_type=None)
    with pytest.raises(UserError, match="unannotated"):
        pb.load_records(write(tmp_path, [unlabeled]))
    assert pb.load_records(write(tmp_path, [unlabeled]), require_labels=False)[0]["id"] == "t1"


# ----------------------------------------------------------------------------------------------
# the PRM: reply parsing, prompts, scoring loop with malformed replies
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, score", [
    ("Correct", 1.0), ("Incorrect.", 0.0), ("**Incorrect**", 0.0), ("Step 1 is incorrect", 0.0),
    ("Step 2: correct", 1.0), ("+", 1.0), ("-", 0.0), (" - the crop is wrong", 0.0), ("The step is not correct", 0.0),
    ("Yes", 1.0), ("\n\n\n", None), ("banana", None), ("", None), (None, None), ("Step 1", None),
])
def test_parse_step_verdict(reply, score):
    assert pb.parse_step_verdict(reply) == score


class FakePRM:
    """A text-only policy whose replies are scripted (malformed ones included)."""
    is_vlm, name = False, "fake"

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def chat(self, batch, max_new_tokens=8, temperature=0.0):
        self.seen += batch
        return [self.replies.pop(0) for _ in batch]


def test_prm_prompt_and_scoring_loop(toy):
    r = next(x for x in toy if x["steps"][1]["tool_image"])
    images, crops = pb.record_images(r)
    msgs = pb.prm_messages(r, 2, images, crops, "judge", vlm=True)
    text = msgs[1]["content"][-1]["text"]
    assert "Step 1:" in text and "Step 3:" in text and "Step 4:" not in text and "Is Step 3 correct" in text
    assert sum(c["type"] == "image" for c in msgs[1]["content"]) == 1          # step 3 made no image
    msgs = pb.prm_messages(r, 1, images, crops, "prob", vlm=True)
    assert sum(c["type"] == "image" for c in msgs[1]["content"]) == 2          # + the crop of step 2
    assert "Reply with + if" in msgs[1]["content"][-1]["text"]
    recs = toy[:2]
    n = sum(len(x["steps"]) for x in recs)
    fake = FakePRM((["Correct", "garbage", "Incorrect", "+"] * n)[:n])
    judged = pb.score_steps(fake, recs, pb.Args(batch_size=3))
    assert [j["score"] for js in judged for j in js] == ([1.0, None, 0.0, 1.0] * n)[:n]
    assert isinstance(fake.seen[0][1]["content"], str) and "text-only" in fake.seen[0][1]["content"]


# ----------------------------------------------------------------------------------------------
# the tiny model: prob scores, policy trajectories through the shared crop tool, CLI
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from common.models import load_policy
    return load_policy("tiny", lora=False)


def test_prob_scores_and_scripted_policy(tiny, world, tmp_path):
    spec = pb.toy_questions(world, random.Random(0))[0]
    clean = pb.toy_trajectory(spec, world, None, random.Random(0), "c")
    judged = pb.score_steps(tiny, [clean], pb.Args(prm="prob", batch_size=8))
    assert all(0.0 < j["score"] < 1.0 for j in judged[0])
    box = clean["steps"][1]["tool_call"]["arguments"]["bbox_2d"]
    script = [f'<tool_call>{{"name": "crop", "arguments": {{"bbox_2d": {box}}}}}</tool_call>',
              "<answer>red</answer>"]
    tok = tiny.tokenizer

    def generate(policy, seqs, **kw):
        text = script.pop(0) if script else "<answer>x</answer>"
        return [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _ in seqs]
    gen = pb.policy_trajectories(tiny, [spec], pb.Args(max_turns=3), G=1, generate=generate)
    assert len(gen) == 1 and len(gen[0]["steps"]) == 2 and gen[0]["final_answer"] == "red"
    assert gen[0]["steps"][0]["tool_image"] and gen[0]["steps"][0]["observation"].startswith("Cropped region")
    assert gen[0]["steps"][0]["label"] is None
    pb.save_records(gen, tmp_path / "gen.jsonl")
    assert pb.load_records(str(tmp_path / "gen.jsonl"), require_labels=False)[0]["steps"][0]["tool_image"]


run = functools.partial(run_script, "prm_bench.py")


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "--search_source" in r.stdout and "--prm" in r.stdout


def test_eval_without_data_says_what_to_do(tmp_path):
    r = run("--stage", "eval", "--model", "tiny", "--out", str(tmp_path))
    assert r.returncode != 0 and "run --stage data" in r.stderr


def test_all_stages_tiny(tmp_path):
    r = run("--stage", "all", "--model", "tiny", "--out", str(tmp_path), "--n_scenes", "2",
            "--n_policy_questions", "1", "--num_generations", "1", "--max_turns", "2",
            "--search_questions", "2", "--search_n", "1,2", "--search_repeats", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in ("ProcessBench", "PRMBench", "VisualProcessBench", "per_error_type", "per_category",
                "positive_bias", "by_position", "unparsed_rate"):
        assert key in res
    assert set(res["ProcessBench"]) >= {"acc_err", "acc_corr", "f1"} and "PRMScore" in res["PRMBench"]
    search = json.loads((tmp_path / "search" / "results.json").read_text())
    assert set(search["accuracy"]) >= {"prm_min", "prm_mean", "majority_vote", "random", "oracle_prm_min"}
    for f in ("data/toy.jsonl", "data/generated.jsonl", "data/toy.html", "eval/per_error_type.png",
              "eval/judged.html", "search/best_of_n.png", "search/metrics.jsonl"):
        assert (tmp_path / f).is_file(), f
