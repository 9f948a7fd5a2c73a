# Run: OMP_NUM_THREADS=1 pytest tests/test_prm_bench.py -q
# (~1 min on 2 CPU cores; no downloads)
"""Tests for prm_bench.py: each benchmark metric against an example computed by hand from the
benchmark's definition (PRMBench's task.py, VisualProcessBench's macro-F1, ProcessBench's
run_eval.py), unparsed verdicts, the confound test (a constant PRM shows no position effect), the
toy set's error-injection table, the PRM prompt (the latest crop, the KB facts), the published
benchmark formats, external predictions, best-of-N, and the CLI (--help, a tiny end-to-end
run)."""

import dataclasses
import functools
import json
import random
import types

import pytest
from PIL import Image

import prm_bench as pb
from common.errors import UserError
from common.judge import exact_match
from common.standins.toyworld import build_world
from helpers import run_script

C, I, N = "correct", "incorrect", "neutral"


def rec(labels, rid="x", category="spatial", sub="relative_position", types=None):
    types = types or [("tool_invocation" if lab == I else None) for lab in labels]
    return {"id": rid, "category": category, "subcategory": sub,
            "steps": [{"text": "s", "label": lab, "error_type": t}
                      for lab, t in zip(labels, types)]}


# ----------------------------------------------------------------------------------------------
# the metrics, by hand
# ----------------------------------------------------------------------------------------------
def test_f1_score():
    assert pb.f1_score(2, 1, 1) == pytest.approx(4 / 6)
    # the class exists but is never hit (PRMBench: 2PR/(P+R) = 0)
    assert pb.f1_score(0, 2, 3) == 0.0
    assert pb.f1_score(0, 0, 0) is None           # in neither gold nor predictions (PRMBench: -1)


def test_prmscore_by_hand():
    """PRMBench task.py: all labelled steps of the erroneous samples (also after the first
    error), correct steps positive, summed TP/FP/FN/TN; clean samples only in their own class;
    invalid samples out."""
    records = [rec([C, I, C, I], "a", sub="circular"),         # pred T F T T: tp 2, tn 1, fp 1
               rec([C, C, I], "b", sub="counterfactual"),      # pred F T F: fn 1, tp 1, tn 1
               rec([C, C], "c", sub="correct"),                # clean, own class: pred T F: tp1 fn1
               rec([I, C], "d", sub="circular")]               # an unparsed step: invalid, left out
    pred = [[True, False, True, True], [False, True, False], [True, False], [None, True]]
    r = pb.prmbench(records, pred)
    # overall tp 3, fp 1, fn 1, tn 2: f1 = 2*3/(6+1+1), negative_f1 = 2*2/(4+1+1)
    assert r["f1"] == pytest.approx(0.75) and r["negative_f1"] == pytest.approx(2 / 3)
    assert r["PRMScore"] == pytest.approx(0.5 * 0.75 + 0.5 * 2 / 3)
    assert r["n_samples"] == 2 and r["validity_rate"] == pytest.approx(2 / 3) and r["n_steps"] == 7
    assert r["clean"]["f1"] == pytest.approx(2 / 3) and r["clean"]["negative_f1"] == 0.0
    # tp2 fp1 tn1
    assert r["per_class"]["circular"]["PRMScore"] == pytest.approx(0.5 * 0.8 + 0.5 * 2 / 3)
    assert r["per_class"]["counterfactual"]["f1"] == pytest.approx(2 / 3)   # tp1 fn1 tn1
    assert "correct" not in r["per_class"]


def test_visualprocessbench_macro_f1_by_hand():
    """Neutral (0) steps dropped, all samples pooled (clean ones too), mean of F1(+1) and F1(-1)."""
    records = [rec([C, N, I, C]), rec([C, C]), rec([I, C, N])]
    pred = [[True, False, True, None], [True, True], [False, False, True]]
    # tp 3, fp 1, tn 1, fn 1 (neutral and unparsed dropped)
    v = pb.visualprocessbench(records, pred)
    assert v["f1_correct"] == pytest.approx(0.75) and v["f1_incorrect"] == pytest.approx(0.5)
    assert v["macro_f1"] == pytest.approx(0.625) and v["n_steps"] == 6
    # it differs from PRMScore here: PRMBench leaves the clean sample out
    assert pb.prmbench(records, pred)["PRMScore"] != pytest.approx(v["macro_f1"])


def test_processbench_by_hand():
    """run_eval.py: prediction = first step not judged correct (an unparsed one included),
    else -1."""
    records = [rec([C, C, I, None]), rec([C, I, C]), rec([C, C]), rec([C, C, C])]
    pred = [[True, True, False, True], [True, True, False], [True, True], [True, None, True]]
    r = pb.evaluate(records, pred)["ProcessBench"]     # gold 2, 1, -1, -1; predicted 2, 2, -1, 1
    assert (r["acc_err"], r["acc_corr"], r["f1"], r["n_err"], r["n_corr"]) == (0.5, 0.5, 0.5, 2, 2)
    r = pb.processbench([2, -1, 0], [2, -1, 1])        # acc_err 1/2, acc_corr 1 -> F1 = 2/3
    assert r["f1"] == pytest.approx(2 / 3)
    assert (pb.processbench([3, 1], [3, 0])["f1"] is None
            and pb.processbench([1, -1], [-1, 0])["f1"] is None)   # 0/0 (the official nan)


def test_an_unparsed_verdict_is_never_a_processbench_hit():
    """run_eval.py: an unparsable answer is None, never equal to the label. An unparsed (or
    unscored) step before the first step judged incorrect makes the prediction unparsable."""
    records = [rec([I, C], "a"), rec([C, I, C], "b"), rec([C, C], "c")]
    r = pb.evaluate(records, [[None, True], [True, False, None], [True]])["ProcessBench"]
    assert r["acc_err"] == 0.5 and r["acc_corr"] == 0.0          # a: None, b: 1, c: None
    assert [pb.first_error_prediction(p, 3) for p in ([None], [True, False], [True] * 3)] \
        == [None, 1, -1]
    assert pb.processbench([0, -1], [None, None])["f1"] is None   # 0/0: the official nan


def test_a_prm_that_never_answers_is_not_a_detector():
    records = [rec([C, I, C]), rec([C, C])]
    r = pb.evaluate(records, [[None] * 3, [None] * 2])
    assert r["n_unparsed"] == 5 and r["steps"]["detection_rate"] is None
    assert r["PRMBench"]["PRMScore"] is None and r["PRMBench"]["validity_rate"] == 0.0
    assert r["VisualProcessBench"]["macro_f1"] is None
    # unparsable predictions match nothing
    assert r["ProcessBench"]["acc_corr"] == 0.0 and r["ProcessBench"]["acc_err"] == 0.0
    assert r["per_error_type"]["tool_invocation"]["detection_rate"] is None
    for m in ("PRMBench", "VisualProcessBench", "ProcessBench"):
        assert "unparsed" in r[m]   # each metric says how it treats them


def test_step_stats_and_positive_bias():
    pairs = [(True, True), (True, False), (False, False), (False, True), (True, True)]
    s = pb.step_stats(pairs)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["detection_rate"] == 0.5
    assert s["balanced_accuracy"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    b = pb.positive_bias(pairs)
    assert (b["p_judged_correct_given_wrong"] == 0.5
            and b["p_judged_correct_given_right"] == pytest.approx(2 / 3))
    assert ([pb.position_bucket(i, 5, 4) for i in range(5)] == [0, 1, 2, 3, 3]
            and pb.position_bucket(0, 1, 4) == 0)


Z2 = 1.96 ** 2   # the Wilson closed forms below: 0 of n -> [0, z^2 / (n + z^2)],
                 # n of n -> [n / (n + z^2), 1]


def test_positive_bias_shares_and_wilson_intervals_by_hand():
    # 2 right steps both called correct, 2 wrong steps of which 1 is called correct
    pairs = [(True, True), (True, True), (False, True), (False, False)]
    b = pb.positive_bias(pairs)
    assert b["share_called_correct"] == 0.75 and b["gold_share_correct"] == 0.5
    # 3 of 4: p = .75, d = 1 + z^2/4 = 1.9604, centre = (.75 + z^2/8) / d = .62753,
    # half = 1.96 sqrt(.75 * .25 / 4 + z^2 / 64) / d = .32689
    assert b["share_called_correct_ci95"] == [0.3006, 0.9544]
    # 1 of 2: centre .5, half = 1.96 sqrt(.25 / 2 + z^2 / 16) / (1 + z^2 / 2) = .40547
    assert (b["share_called_correct_on_erroneous"] == 0.5
            and b["share_called_correct_on_erroneous_ci95"] == [0.0945, 0.9055])
    assert b["share_called_correct_on_erroneous"] == b["p_judged_correct_given_wrong"]
    assert b["share_called_correct_on_correct_ci95"] == [round(2 / (2 + Z2), 4), 1.0]
    assert b["n_steps"] == 4 and b["n_erroneous"] == 2
    none = pb.positive_bias([(True, True)])
    assert none["share_called_correct_on_erroneous_ci95"] is None   # no erroneous step: no rate


def test_detection_by_position_has_wilson_intervals_and_the_constant_prm(toy):
    pred = [[True] * len(r["steps"]) for r in toy]
    pred[0] = [False] * len(toy[0]["steps"])   # one trajectory flagged everywhere
    res = pb.evaluate(toy, pred)
    for bucket, v in res["by_position"].items():
        tn = round(v["detection_rate"] * v["n_incorrect"])
        if tn == 0:   # 0 of n detected: [0, z^2 / (n + z^2)], a plain 0.0 (no -0.0)
            assert v["detection_rate_ci95"] == [0.0, round(Z2 / (v["n_incorrect"] + Z2), 4)]
            assert str(v["detection_rate_ci95"][0]) == "0.0", bucket
        assert v["constant_prm"]["detection_rate"] == 0.0
        assert v["constant_prm"]["share_called_correct"] == 1.0
    c = res["constant_prm"]   # the reference row, computed in the same call
    assert c["positive_bias"]["share_called_correct"] == 1.0
    assert c["positive_bias"]["share_called_correct_on_erroneous"] == 1.0
    assert c["PRMScore"] == pb.evaluate(toy, [[True] * len(r["steps"]) for r in toy])[
        "PRMBench"]["PRMScore"]
    assert c["ProcessBench"] == {"acc_err": 0.0, "acc_corr": 1.0, "f1": 0.0}
    assert set(c["detection_by_position"].values()) == {0.0}
    assert c["contrasts"]["discrimination"] == 0.0


def test_the_constant_prm_judges_the_same_steps():
    records = [rec([C, I, C]), rec([C, C])]
    res = pb.evaluate(records, [[False, None, True], [True]])   # one unparsed, one unscored
    c = res["constant_prm"]
    assert c["positive_bias"]["n_steps"] == res["positive_bias"]["n_steps"] == 3
    assert c["positive_bias"]["n_erroneous"] == 0   # the only wrong step was unparsed
    assert c["ProcessBench"]["acc_err"] == 0.0   # unparsed before its first error: unparsable


def test_contrasts_by_hand():
    # errors at step 0 (first bin) and at step 3 of 4 (last bin)
    first, last = rec([I, C, C, C]), rec([C, C, C, I])
    perfect = pb.contrasts([first, last], [[False, True, True, True], [True, True, True, False]], 4)
    assert perfect["discrimination"] == 1.0 and perfect["discrimination_ci95"] == [1.0, 1.0]
    assert perfect["position_contrast"] == 0.0
    # detects the early error, misses the late one: contrast = 0 - 1; discrimination = 1 - 1/2
    early = pb.contrasts([first, last] * 4, [[False, True, True, True],
                                             [True, True, True, True]] * 4, 4)
    assert early["position_contrast"] == -1.0 and early["discrimination"] == 0.5
    lo, hi = early["discrimination_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0 and lo < hi   # trajectories resampled: it varies
    # a resample without an early or a late error has no contrast: fewer draws than resamples
    assert early["position_contrast_n_draws"] < early["n_boot"] == pb.N_BOOT
    const = pb.contrasts([first, last], [[True] * 4, [True] * 4], 4)
    assert const["discrimination"] == 0.0 and const["discrimination_ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# the toy set: errors at varied steps, several errors, recoveries;
# a constant PRM has no position effect
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    return build_world(0, 6, 224)


@pytest.fixture(scope="module")
def toy(world):
    return pb.build_toy_set(world, 0, 0.3)


def test_a_constant_prm_shows_no_position_effect(toy):
    res = pb.evaluate(toy, [[True] * len(r["steps"]) for r in toy])
    for bucket, v in res["by_position"].items():
        assert v["n_incorrect"] > 0, bucket   # errors in every bucket, step 0 included
        assert v["balanced_accuracy"] == 0.5 and v["detection_rate"] == 0.0, bucket
        assert v["constant_prm"]["accuracy"] == v["accuracy"]   # the baseline shows the label mix


def test_toy_set_mixes_positions_errors_and_recoveries(toy):
    assert {x["error_type"] for r in toy for x in r["injected"]} == set(pb.ERRORS)
    assert any(not r["injected"] for r in toy) and any(len(r["injected"]) == 2 for r in toy)
    assert any(r["injected"][0]["step"] == 0 for r in toy if r["injected"])
    assert any(r["injected"] and exact_match(r["final_answer"], r["answers"])   # recoveries
               for r in toy)
    for r in toy:
        labels = [s["label"] for s in r["steps"]]
        assert [i for i, lab in enumerate(labels) if lab == I] == [x["step"] for x in r["injected"]]
        assert set(labels) <= {C, I}   # every step labelled on its own merits
        if not r["injected"]:
            assert exact_match(r["final_answer"], r["answers"]), r["id"]


@pytest.mark.parametrize("seed", [0, 1])
def test_each_injection_is_a_real_error(world, seed):
    """Every row of ERRORS at every kind it allows: the steps before it equal the clean
    trajectory's, the corrupted step differs, and the final answer is wrong unless the error is
    recovered."""
    seen = set()
    for spec in pb.toy_questions(world, random.Random(seed)):
        for e, (role, kinds, _) in pb.ERRORS.items():
            if spec["kind"] not in kinds:
                continue
            for plan, recover in ((False, False), (True, False), (True, True)):
                clean = pb.toy_trajectory(spec, world, {}, random.Random(seed), "c", plan, recover)
                bad = pb.toy_trajectory(spec, world, {role: e}, random.Random(seed), "b",
                                        plan, recover)
                k = bad["injected"][0]["step"]
                assert bad["injected"] == [{"step": k, "error_type": e}]
                assert ([s["text"] for s in bad["steps"][:k]]
                        == [s["text"] for s in clean["steps"][:k]])
                s, c = bad["steps"][k], clean["steps"][k]
                assert (s["text"], s["tool_call"]) != (c["text"], c["tool_call"]), (spec["id"], e)
                recovered = e == "tool_invocation" or (e == "region_selection" and recover)
                assert bool(exact_match(bad["final_answer"], bad["answers"])) == recovered, \
                    (spec["id"], e, recover)
                if e == "tool_invocation":  # the shared tool really fails
                    assert s["tool_image"] is None and s["observation"].startswith("Error:")
                seen.add(e)
    assert seen == set(pb.ERRORS)
    with pytest.raises(ValueError, match="does not inject"):
        pb.toy_trajectory(spec, world, {"crop": "logical_calculation"}, random.Random(0), "x")


def test_toy_set_round_trips_through_the_validator(toy, tmp_path):
    pb.save_prm_records(toy, tmp_path / "toy.jsonl")
    loaded = pb.load_records(str(tmp_path / "toy.jsonl"))
    assert [r["id"] for r in loaded] == [r["id"] for r in toy]
    images, crops = pb.prm_record_images(loaded[0])
    assert (images[0].size == (224, 224)
            and all(isinstance(im, Image.Image) for im in crops.values()))


# ----------------------------------------------------------------------------------------------
# the PRM prompt: the latest crop at or before step k, the KB facts of a knowledge step
# ----------------------------------------------------------------------------------------------
def test_prm_prompt_shows_the_latest_crop_and_the_facts(toy):
    r = next(x for x in toy if x["category"] == "knowledge" and not x["injected"]
             and x["steps"][0]["tool_call"])
    images, crops = pb.prm_record_images(r)
    assert list(crops) == [0]                                   # crop at step 0, no plan
    for k in range(len(r["steps"])):                            # every later step sees that crop
        msgs = pb.prm_messages(r, k, images, crops, "judge", vlm=True)
        assert ([c["image"] for c in msgs[1]["content"] if c["type"] == "image"]
                == [images[0], crops[0]])
        assert (f"Is Step {k + 1} correct" in msgs[1]["content"][-1]["text"]
                and f"Step {k + 2}:" not in msgs[1]["content"][-1]["text"])
    k = next(i for i, s in enumerate(r["steps"]) if s["text"].startswith("I recall"))
    text = pb.prm_messages(r, k, images, crops, "prob", vlm=True)[1]["content"][-1]["text"]
    assert "Facts to check it against:" in text and r["steps"][k]["knowledge"][0] in text
    assert "Reply with + if" in text
    text = pb.prm_messages(r, k, images, crops, "judge", vlm=False)[1]["content"]
    assert isinstance(text, str) and "text-only" in text


@pytest.mark.parametrize("reply, score", [
    ("Correct", 1.0), ("Incorrect.", 0.0), ("**Incorrect**", 0.0), ("Step 1 is incorrect", 0.0),
    ("Step 2: correct", 1.0), ("+", 1.0), ("-", 0.0), (" - the crop is wrong", 0.0), ("Yes", 1.0),
    ("\n\n\n", None), ("banana", None), ("", None), (None, None), ("Step 1", None), (0.25, 0.25),
    (True, 1.0),
    ("Correct or Incorrect", None), ("correct or incorrect?", None),
    ("-1", None), ("-1 (incorrect)", None), ("+1", 1.0), ("-0", 0.0), ("+0.75", 0.75),
    ("2", None), (-1, None),
])
def test_parse_step_verdict(reply, score):
    assert pb.parse_step_verdict(reply) == score


def test_a_score_of_exactly_the_threshold_is_judged_incorrect():
    """PRMBench's wrappers: label = score > 0.5, so 0.5 is a wrong step."""
    judged = [[{"score": 0.5}, {"score": 0.5000001}, {"score": None}, {"score": 1.0}]]
    assert pb.judge(judged, 0.5) == [[False, True, None, True]]


class FakePRM:
    """A text-only policy whose replies are scripted (malformed ones included)."""
    is_vlm, name = False, "fake"

    def __init__(self, replies):
        self.replies = list(replies)

    def chat(self, batch, max_new_tokens=8, temperature=0.0):
        return [self.replies.pop(0) for _ in batch]


def test_scoring_loop_keeps_unparsed_replies_unparsed(toy):
    recs = toy[:2]
    n = sum(len(x["steps"]) for x in recs)
    judged = pb.score_steps(FakePRM((["Correct", "garbage", "Incorrect"] * n)[:n]), recs,
                            pb.Args(batch_size=3))
    assert [j["score"] for js in judged for j in js] == ([1.0, None, 0.0] * n)[:n]


# ----------------------------------------------------------------------------------------------
# the record validator, the published benchmark formats, external predictions
# ----------------------------------------------------------------------------------------------
def good():
    return {"id": "t1", "question": "What colour?", "images": ["a.png"], "answers": ["red"],
            "final_answer": "red", "category": "perception", "subcategory": "attribute",
            "source": "me", "injected": [],
            "steps": [{"text": "zoom",
                       "tool_call": {"name": "crop", "arguments": {"bbox_2d": [0, 0, 5, 5]}},
                       "observation": "ok", "tool_image": "a.png", "label": "correct",
                       "error_type": None},
                      {"text": "<answer>red</answer>", "tool_call": None, "observation": None,
                       "tool_image": None, "label": "incorrect", "error_type": "answer_format"}]}


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
    (["question"], KeyError, "'question'"), (["answers"], "red", "'answers'"),
    (["images"], "a.png", "'images'"), (["category"], "vision", "'category'"),
    (["subcategory"], "counting", "'subcategory'"), (["steps"], [], "'steps'"),
    (["steps", 0, "text"], "  ", "'steps[0].text'"),
    (["steps", 0, "label"], "wrong", "'steps[0].label'"),
    (["steps", 0, "label"], None, "'steps[0].label'"),
    (["steps", 0, "tool_call"], {"arguments": {}}, "'steps[0].tool_call'"),
    (["steps", 1, "error_type"], None, "'steps[1].error_type'"),
    (["steps", 1, "error_type"], "typo", "'steps[1].error_type'"),
    (["steps", 0, "error_type"], "tool_invocation", "'steps[0].error_type'"),
    (["steps", 1, "tool_image"], "a.png", "'steps[1].tool_image'"),
    (["steps", 0, "tool_image"], "missing.png", "'steps[0].tool_image'"),
    (["steps", 0, "knowledge"], "x", "'steps[0].knowledge'"),
    (["images"], ["nope.png"], "'images'"),
    (["injected"], [{"step": 0, "error_type": "answer_format"}], "'injected'"),
    (["final_answer"], 3, "'final_answer'"),
])
def test_validator_names_file_line_and_field(tmp_path, path, value, field):
    p = write(tmp_path, [good() | {"id": "t0"}, broken(path, value)])
    with pytest.raises(UserError) as e:
        pb.load_records(p)
    assert f"{p}:2: field {field}" in str(e.value)


def test_loader_errors(tmp_path):
    assert len(pb.load_records(write(tmp_path, [good()]))) == 1
    after_error = good()
    after_error["steps"][1] |= {"label": "incorrect"}
    # not annotated after the first error: allowed
    after_error["steps"].append({"text": "more", "label": None})
    assert pb.load_records(write(tmp_path, [after_error]))[0]["steps"][2]["label"] is None
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        pb.load_records(write(tmp_path, [good(), '{"id": "t2", ']))
    with pytest.raises(UserError, match=r"d.jsonl:2: field 'id' 't1' is used by an earlier record"):
        pb.load_records(write(tmp_path, [good(), good()]))
    with pytest.raises(UserError, match="does not exist"):
        pb.load_records(str(tmp_path / "missing.jsonl"))
    unlabeled = good()
    for s in unlabeled["steps"]:
        s.update(label=None, error_type=None)
    with pytest.raises(UserError, match="unannotated"):
        pb.load_records(write(tmp_path, [unlabeled]))
    assert pb.load_records(write(tmp_path, [unlabeled]), require_labels=False)[0]["id"] == "t1"


def test_visualprocessbench_format(tmp_path):
    (tmp_path / "images" / "mm").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "mm" / "q.png")
    row = {"image": ["mm/q.png"], "question": "How many?", "answer": "3", "policy_model": "m",
           "data_source": "MathVision",
           "response": {"steps": ["look", "so 3", "restate"], "process_correctness": [1, -1, 0]}}
    p = write(tmp_path, [row], "test.jsonl")
    r = pb.load_records(p, benchmark="visualprocessbench", images=str(tmp_path / "images"))[0]
    assert ([s["label"] for s in r["steps"]] == [C, I, N]
            and r["subcategory"] == "MathVision" and r["id"] == "1")
    assert pb.prm_record_images(r)[0][0].size == (8, 8)
    with pytest.raises(UserError, match="field 'images'"):       # the images folder was not given
        pb.load_records(p, benchmark="visualprocessbench")
    row["response"]["process_correctness"] = [1, 2, 0]
    with pytest.raises(UserError, match="process_correctness"):
        pb.load_records(write(tmp_path, [row], "test.jsonl"), benchmark="visualprocessbench",
                        images=str(tmp_path))


def test_processbench_format(tmp_path):
    rows = [{"id": "gsm8k-0", "generator": "g", "problem": "1+1?", "steps": ["a", "b", "c"],
             "final_answer_correct": False, "label": 1},
            {"id": "gsm8k-1", "generator": "g", "problem": "2+2?", "steps": ["a", "b"],
             "final_answer_correct": True, "label": -1}]
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))
    recs = pb.load_records(str(tmp_path / "gsm8k.json"), benchmark="processbench")
    assert ([s["label"] for s in recs[0]["steps"]] == [C, I, None]
            and [s["label"] for s in recs[1]["steps"]] == [C, C])
    assert recs[0]["subcategory"] == "gsm8k" and recs[0]["images"] == []
    rows[0]["label"] = 3
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="item 1: label must be"):
        pb.load_records(str(tmp_path / "gsm8k.json"), benchmark="processbench")


def prmbench_rows():
    base = {"idx": 7, "original_question": "q", "modified_question": "q'",
            "original_process": ["a", "b", "c"]}
    return [base | {"classification": "redundency", "modified_process": ["a", "a again", "b", "c"],
                    "error_steps": [2]},
            base | {"classification": "circular", "modified_process": ["a", "x", "y"],
                    "error_steps": [2, 3]}]


def test_prmbench_format(tmp_path):
    recs = pb.load_records(write(tmp_path, prmbench_rows()), benchmark="prmbench")
    # one clean original per idx
    assert [r["id"] for r in recs] == ["correct_7", "redundency_7", "circular_7"]
    assert [s["label"] for s in recs[0]["steps"]] == [C, C, C]
    assert ([s["label"] for s in recs[2]["steps"]] == [C, I, I]
            and recs[2]["steps"][1]["error_type"] == "circular")


def test_prmbench_release_is_read_as_published(tmp_path, capsys):
    """The real release: empty step strings (29 in 3 rows) and repeated multi_solutions ids (5,
    different processes: PRMBench's loader keeps the first); error_steps kept as published."""
    rows = prmbench_rows()
    rows[1]["modified_process"] = ["a", "", "y"]
    multi = {"idx": 9, "classification": "multi_solutions", "original_question": "q",
             "modified_question": "q", "original_process": ["a"], "error_steps": []}
    rows += [multi | {"modified_process": ["one", "two"]}, multi | {"modified_process": ["3"]},
             rows[0] | {"classification": "confidence", "error_steps": [5, 6]}]
    recs = pb.load_records(write(tmp_path, rows), benchmark="prmbench")
    assert [r["id"] for r in recs] == ["correct_7", "redundency_7", "circular_7",
                                       "multi_solutions_9", "confidence_7"]
    assert recs[2]["steps"][1]["text"] == "" and len(recs[3]["steps"]) == 2
    assert [r["error_steps"] for r in recs] == [[], [2], [2, 3], [], [5, 6]]
    assert "repeating an earlier classification and idx: 1;" in capsys.readouterr().out


def test_prmbench_clean_means_class_correct(tmp_path):
    """PRMBench's clean samples are its class `correct` (built from the originals), not "no
    incorrect label": a row whose error_steps all lie past its last step (16 in the release)
    stays in its class and in the overall counts, with no error step to find."""
    rows = prmbench_rows() + [prmbench_rows()[1] | {"classification": "deception",
                                                     "error_steps": [4, 5]}]
    recs = pb.load_records(write(tmp_path, rows), benchmark="prmbench")
    assert [s["label"] for s in recs[3]["steps"]] == [C, C, C]   # deception_7: errors past the end
    pred = [[True] * len(r["steps"]) for r in recs]
    r = pb.prmbench(recs, pred)
    assert r["clean"]["n_samples"] == 1 and r["per_class"]["deception"]["n_samples"] == 1
    assert r["n_samples"] == 3 and r["validity_rate"] == 1.0
    assert r["per_class"]["deception"]["first_error_acc"] is None   # its first error is unjudged
    assert set(r["per_class"]) == {"redundency", "circular", "deception"}
    pred[2] = [None] * 3                                   # every circular sample invalid:
    assert pb.prmbench(recs, pred)["per_class"]["circular"]["n_samples"] == 0   # the class stays


def test_per_error_type_agrees_with_per_class_on_prmbench(tmp_path):
    """Both leave invalid samples out (PRMBench's validity), and a PRMBench sample holds the error
    type of its class, also when its error_steps all lie past its last step: on PRMBench data
    the same class names give the same numbers."""
    rows = prmbench_rows() + [prmbench_rows()[1] | {"classification": "deception",
                                                     "error_steps": [4, 5]},
                              prmbench_rows()[1] | {"idx": 8}]
    recs = pb.load_records(write(tmp_path, rows), benchmark="prmbench")
    pred = [[True, False, True], [True, False, True, True], [None, True, False],   # invalid
            [True, True, True], [False, False, False]]
    res = pb.evaluate(recs, pred)
    per_class, per_type = res["PRMBench"]["per_class"], res["per_error_type"]
    assert set(per_type) == set(per_class) == {"redundency", "circular", "deception"}
    for c in per_class:
        for k in ("f1", "negative_f1", "PRMScore", "n_steps"):
            assert per_type[c][k] == per_class[c][k], (c, k)
    assert per_type["circular"]["n_trajectories"] == 1        # circular_8 only: circular_7 invalid
    assert per_type["circular"]["detection_rate"] == 1.0      # circular_8's steps 2, 3 flagged
    assert per_type["deception"]["detection_rate"] is None    # no error step judged


def test_external_predictions_end_to_end(tmp_path, capsys, monkeypatch):
    """`--stage eval --predictions`: no model is loaded; PRMScore by hand on the PRMBench
    rows above."""
    data = write(tmp_path, prmbench_rows())
    preds = [{"id": "correct_7", "scores": [0.9, 0.2, 0.8]},          # clean: its own class
             {"id": "redundency_7", "scores": [0.9, "Incorrect", True, 0.7]},   # tp 3, tn 1
             {"id": "circular_7", "scores": [0.1, 0.3, "+"]}]           # fn 1, tn 1, fp 1
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, preds)))
    # in-process: no model is loaded
    monkeypatch.setattr(pb, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    pb.main(["--stage", "eval", "--benchmark", "prmbench", "--data", data,
             "--predictions", str(tmp_path / "p.jsonl"),
             "--out", str(tmp_path / "out"), "--model", "tiny"])
    res = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())["PRMBench"]
    f1, neg = 2 * 3 / (6 + 1 + 1), 2 * 2 / (4 + 1 + 1)                  # tp 3, fp 1, fn 1, tn 2
    assert (res["PRMScore"] == pytest.approx(0.5 * f1 + 0.5 * neg)
            and res["clean"]["negative_f1"] == 0.0)
    # the console's evidence lines: called correct 2 + 3 + 1 of the 10 steps, Wilson by hand:
    # p = .6, d = 1 + z^2/10 = 1.38416, centre = (.6 + .19208) / d = .5722,
    # half = 1.96 sqrt(.024 + .009604) / d = .2596; on the 3 erroneous steps 1 (circular_7's +)
    out = capsys.readouterr().out
    assert "called correct: 0.60 [0.31, 0.83] of 10 steps (gold share correct 0.70)" in out
    assert "on the 3 erroneous steps 0.33 [" in out and "| constant PRM 1.00 / 1.00" in out
    assert "detection rate by relative position: 0.00-0.25 " in out
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "correct_7", "scores": [1, 1]}))
    with pytest.raises(SystemExit) as e:
        pb.main(["--stage", "eval", "--benchmark", "prmbench", "--data", data,
                 "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")])
    assert (e.value.code == 2
            and "has no predictions for the record 'redundency_7'" in capsys.readouterr().err)


def test_predictions_as_prmbench_reads_them(tmp_path, capsys):
    """The first row of a repeated id counts, unknown ids are ignored, a short row leaves its
    last steps unjudged (out of every count), and a PRMBench record's scores past its last step
    count against its error_steps (PRMBench's evaluator loops over the labels it gets)."""
    data = write(tmp_path, prmbench_rows()[:1] + [prmbench_rows()[1] | {"error_steps": [2, 4]}])
    recs = pb.load_records(data, benchmark="prmbench")   # correct_7, redundency_7, circular_7
    rows = [{"id": "correct_7", "scores": [0.9, 0.1]},                  # step 3 not judged
            {"id": "correct_7", "scores": [0.0, 0.0, 0.0]},             # repeated: ignored
            {"id": "redundency_7", "scores": [0.9, 0.2, 0.9, 0.9]},
            {"id": "circular_7", "scores": [0.9, 0.2, 0.9, 0.3, 0.8]},  # 2 past its 3 steps
            {"id": "nobody", "scores": [1]}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)))
    judged = pb.read_predictions(str(tmp_path / "p.jsonl"), recs)
    out = capsys.readouterr().out
    assert "1 rows repeat an earlier id" in out and "1 records have fewer scores" in out
    assert [len(j) for j in judged] == [2, 4, 5]
    pred = pb.judge(judged, 0.5)
    circ = pb.prmbench_sample(recs[2], pred[2])   # gold C I C | I C (4 is an error step)
    assert (circ["tp"], circ["fp"], circ["fn"], circ["tn"]) == (3, 0, 0, 2)   # judged T F T F T
    assert circ["first_error"] == 1 and circ["response_acc"] == pytest.approx(3 / 5)
    res = pb.evaluate(recs, pred)
    assert res["n_unscored"] == 1 and res["PRMBench"]["clean"]["n_steps"] == 2
    assert res["steps"]["n_steps"] == 2 + 4 + 3   # the analyses count real steps only
    # past the end of a record that is not PRMBench's: refused
    toy = [dict(rec([C, I], "a"), _base=".")]
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "scores": [1, 0, 1]}))
    with pytest.raises(UserError, match="3 scores for the 2 steps of 'a'"):
        pb.read_predictions(str(tmp_path / "p.jsonl"), toy)


def test_read_predictions_errors(tmp_path):
    recs = [dict(rec([C, I], "a"), _base=".")]
    p = tmp_path / "p.jsonl"
    for rows, msg in (([{"id": "b", "scores": [1, 0]}], "no predictions for the record 'a'"),
                      ([{"id": "a", "scores": "1 0"}], "'scores' must be a list"),
                      ([{"id": "a", "scores": [1.5, 0]}], "outside")):
        p.write_text("\n".join(map(json.dumps, rows)))
        with pytest.raises(UserError, match=msg):
            pb.read_predictions(str(p), recs)


# ----------------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------------
def cand(correct, answer, scores, gold=None):
    c = {"correct": correct, "answer": answer, "scores": scores}
    return c if gold is None else dict(c, gold_scores=gold)


def test_best_of_n_by_hand():
    q1 = [cand(True, "red", [0.9, 0.2]), cand(False, "blue", [0.6, 0.6]),
          cand(False, "Blue.", [0.3, 0.95])]
    q2 = [cand(True, "3", [0.9, 0.8]), cand(False, "4", [0.1, 0.9]),
          cand(True, "three", [None, 1.0])]
    acc = pb.best_of_n([q1, q2], [3], repeats=5, seed=0)
    # q1: min picks B (0.6), mean picks C (0.625), majority "blue": all wrong;
    # q2: min and mean pick A (an unparsed score counts 0); random = 2/3 exactly; pass@N = 1
    assert acc["prm_min"][3] == 0.5 and acc["prm_mean"][3] == 0.5
    assert acc["random"][3] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert (acc["pass@N"][3] == 1.0 and acc["majority_vote"][3] <= 0.5
            and "oracle_prm_min" not in acc)
    with pytest.raises(UserError, match="best-of-4"):
        pb.best_of_n([q1], [4], repeats=1, seed=0)


def test_best_of_n_per_question_differing_groups_and_intervals():
    q1 = [cand(True, "red", [0.9]), cand(False, "blue", [0.6]), cand(False, "Blue.", [0.3])]
    q2 = [cand(True, "3", [0.9]), cand(True, "3", [0.8]), cand(True, "3.", [0.1])]
    q3 = [cand(False, None, [0.9]), cand(False, "x", [0.8]), cand(False, "x", [0.1])]
    per: dict = {}
    acc = pb.best_of_n([q1, q2, q3], [1, 3], repeats=6, seed=0, per_question=per)
    # at N = 3 every subset is the whole group: min picks red, 3, none -> 1, 1, 0;
    # random = 1/3, 1, 0 exactly
    assert per["prm_min"][3] == [1.0, 1.0, 0.0]
    assert per["random"][3] == pytest.approx([1 / 3, 1.0, 0.0])
    for m, by_n in per.items():   # the overall numbers are the means over the questions
        for n, v in by_n.items():
            assert acc[m][n] == pytest.approx(sum(v) / 3), (m, n)
    # "red" / "blue" differ, "3" / "3." normalise alike, None vs "x" differ;
    # only q1 holds a right and a wrong candidate
    assert pb.differing([q1, q2, q3]) == {"groups_with_differing_answers": 2,
                                          "groups_with_mixed_correctness": 1}
    ci = pb.search_intervals(per, [1, 3], seed=0)
    gain = ci["prm_min_minus_random"][3]   # (2/3 + 0 + 0) / 3
    assert gain["value"] == pytest.approx(2 / 9)
    lo, hi = gain["ci95"]   # resampling 3 questions: 0 (q1 never drawn) to 2/3 (only q1)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(2 / 3)
    # pass@3 per question 1, 1, 0: q3 drawn 3 times (1/27 of the draws, > 2.5 %) gives 0,
    # no q3 (8/27) gives 1
    assert ci["accuracy_ci95"]["pass@N"][3] == [0.0, 1.0]


def test_best_of_n_oracle_below_pass_at_n_with_a_recovery():
    # the right candidate had a (recovered) wrong step: the oracle PRM prefers the clean wrong one
    q = [cand(False, "x", [1.0], [1.0]), cand(True, "y", [0.0], [0.0])]
    acc = pb.best_of_n([q], [2], repeats=20, seed=1)
    assert (acc["oracle_prm_min"][2] == 0.0 and acc["pass@N"][2] == 1.0
            and 0 < acc["majority_vote"][2] < 1)
    assert pb.Args().search_source == "policy"   # candidates come from the policy by default


# ----------------------------------------------------------------------------------------------
# the tiny model and the CLI
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from common.models import load_policy
    return load_policy("tiny", lora=False)


def test_prob_scores_and_scripted_policy(tiny, world, tmp_path):
    spec = pb.toy_questions(world, random.Random(0))[0]
    clean = pb.toy_trajectory(spec, world, {}, random.Random(0), "c", plan=True)
    judged = pb.score_steps(tiny, [clean], pb.Args(prm="prob", batch_size=8))
    assert all(0.0 < j["score"] < 1.0 for j in judged[0])
    box = clean["steps"][1]["tool_call"]["arguments"]["bbox_2d"]
    script = [f'<tool_call>{{"name": "crop", "arguments": {{"bbox_2d": {box}}}}}</tool_call>',
              "<answer>red</answer>"]
    tok = tiny.tokenizer

    def generate(policy, seqs, **kw):
        text = script.pop(0) if script else "<answer>x</answer>"
        return [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _ in seqs]
    gen = pb.agent_rollouts(tiny, [spec], pb.Args(max_turns=3), G=1, world=world,
                            generate=generate)
    assert len(gen) == 1 and len(gen[0]["steps"]) == 2 and gen[0]["final_answer"] == "red"
    assert (gen[0]["steps"][0]["tool_image"]
            and gen[0]["steps"][0]["observation"].startswith("Cropped region"))
    assert gen[0]["steps"][0]["label"] is None
    pb.save_prm_records(gen, tmp_path / "gen.jsonl")
    assert pb.load_records(str(tmp_path / "gen.jsonl"),
                           require_labels=False)[0]["steps"][0]["tool_image"]


def test_a_text_only_policy_reads_the_scene_in_words(tiny, world):
    spec = next(s for s in pb.toy_questions(world, random.Random(0)) if s["kind"] == "fact")
    text = pb.describe_scene(spec, world)
    for t in spec["scene"]["tiles"]:   # every tile, its emblem and organisation, and its facts
        assert f"tile {t['label']} at {t['box']}: a {t['color']} {t['shape']} emblem" in text
        if not t["is_distractor"]:
            assert f"the emblem of {t['name']}" in text and f"{t['name']} was founded in " in text
    assert "distractor" not in text
    text_only = dataclasses.replace(tiny, is_vlm=False, image_processor=None)
    script = ["I look at the tiles.", "The tile is there.", "<answer>1875</answer>"]
    seen = []
    tok = tiny.tokenizer

    def generate(policy, seqs, **kw):
        seen.append(tok.decode(seqs[0].input_ids))
        return [tok(script.pop(0), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for _ in seqs]
    gen = pb.agent_rollouts(text_only, [spec], pb.Args(max_turns=3), G=1, world=world,
                            generate=generate)
    # three turns, each a step (the nudges between them are not tool calls); the answer ends it
    assert [s["text"] for s in gen[0]["steps"]] == [
        "I look at the tiles.", "The tile is there.", "<answer>1875</answer>"]
    assert all(s["tool_call"] is None for s in gen[0]["steps"])
    assert gen[0]["final_answer"] == "1875" and "Question: " + spec["question"] in seen[0]
    assert pb.REPROMPT in seen[1] and "<|image_pad|>" not in seen[0]
    assert pb.LAST_CALL in seen[2] and pb.LAST_CALL not in seen[1]   # before its last turn


def test_a_text_only_policys_answer_to_the_last_call():
    def r(*replies, answer=None):
        turns = [{"role": "assistant", "text": t} for t in replies]
        return types.SimpleNamespace(answer=answer, trajectory=turns)
    assert pb.last_call_answer(r("a", "b", " Yellow.\n"), 3) == "Yellow"
    assert pb.last_call_answer(r("a", "b", "x", answer="red"), 3) == "red"   # its tags first
    assert pb.last_call_answer(r("a", "b", "The emblem is a grey circle."), 3) is None  # 6 words
    assert pb.last_call_answer(r("a", "b", "red\nblue"), 3) is None   # two lines: no bare answer
    assert pb.last_call_answer(r("a", "yellow"), 3) is None   # stopped before the last call
    assert pb.last_call_answer(r("yellow"), 1) is None   # one turn: there was no last call


run = functools.partial(run_script, "prm_bench.py")


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "--search_source" in r.stdout and "--predictions" in r.stdout
    assert "run:" in r.stdout and "eval: benchmark files and the PRM:" in r.stdout


def test_one_scene_is_one_sentence_in_prm_terms(tmp_path, capsys):
    """gog.py's world needs a training and a test scene; the error names prm_bench's own flag."""
    with pytest.raises(SystemExit) as e:
        pb.main(["--stage", "data", "--model", "tiny", "--out", str(tmp_path), "--n_scenes", "1"])
    err = capsys.readouterr().err
    assert (e.value.code == 2 and err.startswith("error: --n_scenes must be at least 2")
            and "test_frac" not in err)


def test_eval_without_data_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pb.main(["--stage", "eval", "--model", "tiny", "--out", str(tmp_path)])
    assert e.value.code == 2 and "run --stage data" in capsys.readouterr().err


def test_all_stages_tiny(tmp_path):
    r = run("--stage", "all", "--model", "tiny", "--out", str(tmp_path), "--n_scenes", "2",
            "--max_turns", "2", "--search_questions", "1", "--search_n", "1,2",
            "--search_repeats", "4", "--batch_size", "32",
            "--judge_max_new_tokens", "4", "--max_completion_length", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "numbers are noise" in r.stdout
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    toy_lines = (tmp_path / "data" / "toy.jsonl").read_text().splitlines()
    assert (res["n_unparsed"] + res["steps"]["n_steps"]
            == sum(len(json.loads(x)["steps"]) for x in toy_lines))
    search = json.loads((tmp_path / "search" / "results.json").read_text())
    assert (search["source"] == "policy"
            and set(search["accuracy"]) == {"prm_min", "prm_mean", "majority_vote", "random",
                                            "pass@N"})
    for f in ("data/toy.jsonl", "data/toy.html", "eval/per_error_type.png", "eval/by_position.png",
              "eval/judged.html", "search/best_of_n.png", "search/candidates.jsonl",
              "search/metrics.jsonl"):
        assert (tmp_path / f).is_file(), f


@pytest.mark.slow
def test_smollm2_evidence_runs_reduced(tmp_path):
    """The evidence commands of docs/prm_bench.md ("Evidence on real weights"), reduced: SmolLM2
    as the judge-mode PRM on 2 toy trajectories and 2 real ProcessBench rows, and as the
    text-only policy of best-of-2 on 1 question. Structure only: every number the doc's tables
    read is there, with its interval, beside the constant PRM. 136 s on the shared 2-core
    machine at load 3-5; weights offline."""
    p = run("--stage", "all", "--model", "smollm2", "--out", str(tmp_path / "toy"),
            "--max_steps", "2", "--search_source", "policy", "--search_questions", "1",
            "--search_n", "1,2", "--max_turns", "2", "--max_completion_length", "16",
            "--search_repeats", "4", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[eval] called correct: " in p.stdout and "text-only: it reads the scene" in p.stdout
    assert "questions have candidates with differing answers" in p.stdout
    data = "tests/conformance/prm/processbench/data/gsm8k.json"
    q = run("--stage", "eval", "--model", "smollm2", "--benchmark", "processbench", "--data",
            data, "--max_steps", "2", "--out", str(tmp_path / "pb"), timeout=1800)
    assert q.returncode == 0, q.stderr[-3000:]
    for out in (tmp_path / "toy", tmp_path / "pb"):
        res = json.loads((out / "eval" / "results.json").read_text())
        b = res["positive_bias"]
        assert 0 <= b["share_called_correct"] <= 1 and b["n_steps"] > 0
        lo, hi = b["share_called_correct_ci95"]
        assert lo <= b["share_called_correct"] <= hi
        assert "share_called_correct_on_erroneous_ci95" in b and "gold_share_correct" in b
        assert all("detection_rate_ci95" in v and "constant_prm" in v
                   for v in res["by_position"].values())
        assert res["constant_prm"]["positive_bias"]["share_called_correct"] == 1.0
        assert {"discrimination", "discrimination_ci95", "position_contrast_ci95"} <= set(
            res["contrasts"])
    s = json.loads((tmp_path / "toy" / "search" / "results.json").read_text())
    assert s["questions"] == 1 and s["candidates_per_question"] == 2
    assert 0 <= s["groups_with_mixed_correctness"] <= s["groups_with_differing_answers"] <= 1
    assert set(s["prm_min_minus_random"]) == {"1", "2"} and "accuracy_ci95" in s
