# Run: OMP_NUM_THREADS=1 pytest tests/test_conformance_prm.py -q     (~15 s; no downloads)
"""prm_bench.py's `--stage eval --predictions` path against the official PRM benchmark code.

tests/conformance/prm/<benchmark>/ holds a data slice (real rows for PRMBench and ProcessBench),
predictions in the format the official evaluator reads, and expected.json: what the official
code computed on them (its README names the official command and commit). Each test converts the
predictions to prm_bench's --predictions rows, runs `--stage eval` in this process, and compares
EVERY number of expected.json with ours (1e-6): the aggregates from eval/results.json, the
per-sample and per-row numbers from the functions stage_eval uses on the same records and
verdicts. PRMBench's -1 and ProcessBench's nan (0/0) are our null. Where ours differs on purpose,
the difference must be one of DEVIATIONS and prm_bench.py's docstring must name it.
VisualProcessBench has no official evaluator (expected.json lists where it was searched): the
test checks that our metric says it is ours, and its numbers by hand.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import prm_bench as pb

HERE = Path(__file__).resolve().parent / "conformance" / "prm"
TOL = 1e-6
DOC = " ".join(pb.__doc__.split())
# named deviations: what differs -> the words of prm_bench.py's docstring that name it
DEVIATIONS = {
    "f1 with P = R = 0": "PRMBench's code returns -1 where precision and recall are both 0",
    "PRMScore from a -1": "PRMBench's notebooks add the -1",
}


class Numbers:
    """Collects every comparison: mismatches, and the differences a named deviation explains."""

    def __init__(self):
        self.n, self.bad, self.named = 0, [], Counter()

    def check(self, where: str, theirs, ours, deviation: str | None = None):
        self.n += 1
        if isinstance(theirs, bool) or isinstance(ours, bool):
            same = theirs == ours
        elif theirs is None or ours is None:
            same = theirs is None and ours is None
        else:
            same = abs(theirs - ours) <= TOL
        if same:
            return
        if deviation is not None:
            assert DEVIATIONS[deviation] in DOC, deviation
            self.named[deviation] += 1
        else:
            self.bad.append(f"{where}: official {theirs!r}, ours {ours!r}")

    def assert_ok(self):
        assert not self.bad, f"{len(self.bad)} of {self.n} numbers differ:\n" + "\n".join(self.bad)


def undefined(v):
    """PRMBench's -1 and ProcessBench's nan (a string in expected.json) -> None."""
    return None if v == -1 or (isinstance(v, str) and "nan" in v) else v


def run_eval(tmp_path: Path, name: str, benchmark: str, data: Path, rows: list[dict]):
    """`prm_bench.py --stage eval --benchmark B --data D --predictions P` -> (results, P)."""
    pred = tmp_path / f"{name}.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / name
    pb.main(["--stage", "eval", "--benchmark", benchmark, "--data", str(data),
             "--predictions", str(pred), "--out", str(out)])
    return json.loads((out / "eval" / "results.json").read_text()), pred


def eval_in_memory(benchmark: str, data: Path, rows: list[dict], tmp_path: Path, name: str):
    """The same path without the plots (stage_eval's eval_results): -> (results, records,
    verdicts)."""
    pred = tmp_path / f"{name}.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = pb.Args(stage="eval", benchmark=benchmark, data=str(data), predictions=str(pred))
    records = pb.load_benchmark(args)
    judged = pb.read_predictions(str(pred), records)
    return (pb.eval_results(args, records, judged, "x"), records,
            pb.judge(judged, args.threshold))


# ----------------------------------------------------------------------------------------------
# PRMBench
# ----------------------------------------------------------------------------------------------
PRMB = HERE / "prmbench"
PRMB_DATA = PRMB / "data" / "prmbench_preview.jsonl"
PRMB_EXP = json.loads((PRMB / "expected.json").read_text())
# evaluate_function's names -> ours (correct_step_acc IS the recall of the correct steps, ...)
PRMB_KEYS = {"correct_step_acc": "recall", "wrong_step_acc": "negative_recall",
             "total_step_acc": "accuracy"}


def prmbench_records():
    return pb.load_records(str(PRMB_DATA), benchmark="prmbench")


def prmbench_rows(run: str, records: list[dict]) -> list[dict]:
    """The official checkpoint file -> --predictions rows. The scores (prm_bench judges a step
    correct when score > 0.5, the rule the file's labels were made with); on a redundency /
    circular item a ReasonEval-style record's step_level_redundancy_labels, negated (what the
    evaluator reads there); `validity: false` -> null per step (our invalid sample); an item
    without a record -> a row of nulls (prm_bench wants a row per record; the official counts
    the missing item as invalid too: same numbers for an erroneous item)."""
    steps = {r["id"]: r for r in records}
    rows = []
    for line in (PRMB / "predictions" / f"{run}.jsonl").read_text().splitlines():
        res = json.loads(line)["results"]
        rec, sc = steps.get(res["idx"]), res["scores"]
        if res.get("validity") is False:
            scores = [None] * len(rec["steps"] if rec else [None])
        elif (rec and rec["subcategory"] in ("redundency", "circular")
              and "step_level_redundancy_labels" in sc):
            scores = [not x for x in sc["step_level_redundancy_labels"]]
        else:
            scores = sc["step_level_validity_scores"]
        rows.append({"id": res["idx"], "scores": scores})
    given = {r["id"] for r in rows}
    for r in records:
        if r["id"] not in given:
            assert r["subcategory"] != "correct", "a missing clean item changes the denominator"
            rows.append({"id": r["id"], "scores": [None] * len(r["steps"])})
    return rows


def test_prmbench_release_is_read_as_the_official_loader_reads_it():
    """The official loader's meta items: ids, classes, step counts, error_steps, in order."""
    records = prmbench_records()
    nums = Numbers()
    assert [r["id"] for r in records] == [m["idx"] for m in PRMB_EXP["meta_items"]]
    for r, m in zip(records, PRMB_EXP["meta_items"]):
        assert r["subcategory"] == m["classification"], r["id"]
        nums.check(f"{m['idx']} n_steps", m["n_steps"], len(r["steps"]))
        assert r.get("error_steps", []) == m["error_steps"], r["id"]
        for k in m["error_steps"]:
            nums.check(f"{m['idx']} error step {k}", k, k)
    nums.assert_ok()


def sentinel(h: dict, cls: str | None, metric: str) -> str | None:
    """The deviation behind an official f1 / negative_f1 of -1 that is not 0/0 (TP = 0 with
    FP, FN > 0: precision = recall = 0), or None."""
    neg = "negative_" if metric.startswith("negative") else ""
    get = (lambda m: h[m]) if cls is None else (lambda m: h[m][cls])
    if get(metric) == -1 and get(f"{neg}precision") == 0 and get(f"{neg}recall") == 0:
        return "f1 with P = R = 0"
    return None


def prmscore_deviation(out: dict, cls: str | None) -> str | None:
    """A PRMScore the notebooks computed with a -1 f1 or negative_f1 in the sum."""
    h = out["total_hallucination_results"] if cls is None else {
        m: v[cls] for m, v in out["hallucination_type_results"].items()}
    used = ("f1",) if cls == "multi_solutions" else ("f1", "negative_f1")
    return "PRMScore from a -1" if any(h[m] == -1 for m in used) else None


def compare_sample(nums: Numbers, log: dict, rec: dict, ps: list, judged: list[dict]):
    """One detailed_logs entry against prm_bench's per-sample numbers of the same item."""
    i = log["idx"]
    if log["results"] is None:                      # validity false: out of every count
        assert None in ps, i
        return
    nums.check(f"{i} error_steps", len(log["error_steps"]), len(rec.get("error_steps", [])))
    for a, b in zip(log["error_steps"], rec.get("error_steps", [])):
        nums.check(f"{i} error step", a, b)
    sc = log["prediction"]["scores"]
    used = ([not x for x in sc["step_level_redundancy_labels"]]
            if "step_level_redundancy_labels" in sc and log["classifcation"] in
            ("redundency", "circular") else sc["step_level_validity_labels"])
    assert len(used) == len(ps), i                  # the labels the evaluator read = ours
    for k, (a, b) in enumerate(zip(used, ps)):
        nums.check(f"{i} label {k}", a, b)
    if used is sc["step_level_validity_labels"]:    # the input scores, as our reader read them
        for k, (a, j) in enumerate(zip(sc["step_level_validity_scores"], judged)):
            nums.check(f"{i} score {k}", a, j["score"])
    s = pb.prmbench_sample(rec, ps)
    ours, res = pb.prmbench_scores([s]), log["results"]
    for k in ("correct_step_acc", "wrong_step_acc", "total_step_acc"):
        nums.check(f"{i} {k}", undefined(res[k]), ours[PRMB_KEYS[k]])
    nums.check(f"{i} first_error_acc", res["first_error_acc"], s["first_error"])
    nums.check(f"{i} model_response_acc", undefined(res["model_response_acc"]), s["response_acc"])
    for k in ("TP", "FP", "TN", "FN"):
        nums.check(f"{i} {k}", res["f1_matrix"][k], s[k.lower()])
    tp, fp, fn, tn = s["tp"], s["fp"], s["fn"], s["tn"]
    # the 0/1 lists, through their sums and lengths (the order of the steps does not count)
    for k, hits, n in (("correct_step_acc", tp, tp + fn), ("wrong_step_acc", tn, tn + fp),
                       ("total_step_acc", tp + tn, tp + fp + fn + tn)):
        nums.check(f"{i} {k}_list sum", sum(res[f"{k}_list"]), hits)
        nums.check(f"{i} {k}_list len", len(res[f"{k}_list"]), n)
    nums.check(f"{i} first_error_acc_list", sum(res["first_error_acc_list"]), s["first_error"] or 0)
    nums.check(f"{i} first_error_acc_list len", len(res["first_error_acc_list"]),
               int(s["first_error"] is not None))
    nums.check(f"{i} model_response_acc_list", sum(res["model_response_acc_list"]),
               s["response_acc"] or 0)


@pytest.mark.parametrize("run", list(PRMB_EXP["runs"]))
def test_prmbench_matches_the_official_evaluator(run, tmp_path):
    records = prmbench_records()
    res, pred = run_eval(tmp_path, run, "prmbench", PRMB_DATA, prmbench_rows(run, records))
    ours, exp, nums = res["PRMBench"], PRMB_EXP["runs"][run], Numbers()
    out = exp["evaluate_output"]
    tot, per = out["total_hallucination_results"], out["hallucination_type_results"]
    for k, v in tot.items():
        nums.check(f"total {k}", undefined(v), ours[PRMB_KEYS.get(k, k)],
                   sentinel(tot, None, k) if "f1" in k else None)
    for k, by_cls in per.items():
        for cls, v in by_cls.items():
            mine = ours["clean"] if cls == "correct" else ours["per_class"][cls]
            nums.check(f"{cls} {k}", undefined(v), mine[PRMB_KEYS.get(k, k)],
                       sentinel(per, cls, k) if "f1" in k else None)
    nums.check("validitiy_rate", out["validitiy_rate"], ours["validity_rate"])
    for variant in ("prmscore_main_table", "prmscore_appendix_unclamped"):
        sc = exp[variant]
        nums.check(f"{variant} overall", sc["overall"], ours["PRMScore"],
                   prmscore_deviation(out, None))
        for cls, v in sc["per_class"].items():
            nums.check(f"{variant} {cls}", v, ours["per_class"][cls]["PRMScore"],
                       prmscore_deviation(out, cls))
        for g, v in sc["groups"].items():
            dev = [prmscore_deviation(out, c) for c in pb.PRMBENCH_GROUPS[g]]
            nums.check(f"{variant} {g}", v, ours["groups"][g], next(filter(None, dev), None))
    assert list(sc["groups"]) == list(pb.PRMBENCH_GROUPS)
    # our per-error-type analysis: on PRMBench data its types are the classes, same numbers
    assert set(res["per_error_type"]) == set(ours["per_class"]) - {"multi_solutions"}
    for c, v in res["per_error_type"].items():
        for k in ("f1", "negative_f1", "PRMScore", "n_steps"):
            assert v[k] == ours["per_class"][c][k], (c, k)
    # every sample the official evaluator logged, against ours
    judged = pb.read_predictions(str(pred), records)
    by_id = {r["id"]: (r, ps, js)
             for r, ps, js in zip(records, pb.judge(judged, pb.Args().threshold), judged)}
    for log in out["detailed_logs"]:
        compare_sample(nums, log, *by_id[log["idx"]])
    nums.assert_ok()
    # the deviations this fixture shows, all named
    assert dict(nums.named) == ({"f1 with P = R = 0": 1, "PRMScore from a -1": 4}
                                if run == "random" else {}), dict(nums.named)


# ----------------------------------------------------------------------------------------------
# ProcessBench
# ----------------------------------------------------------------------------------------------
PB = HERE / "processbench"
PB_EXP = json.loads((PB / "expected.json").read_text())
SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")


def boxed(text: str) -> str | None:
    """The critic's answer as run_eval.py reads it: the last \\boxed{...} (no nested braces),
    stripped; None without one."""
    found = re.findall(r"\\boxed\{([^}]*)\}", text)
    return found[-1].strip() if found else None


def as_int(s: str | None) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def critic_first_error(text) -> int | None:
    """run_eval.py's prediction from one critique, or from 8 (--use_voting: the most common
    answer STRING, first seen on a tie, then int); None = unparsable."""
    if isinstance(text, str):
        return as_int(boxed(text))
    votes = [a for a in map(boxed, text) if a is not None]
    return as_int(Counter(votes).most_common(1)[0][0]) if votes else None


def step_scores(first: int | None, n: int) -> list:
    """A first-error prediction -> per-step scores: steps before it correct (1.0), it incorrect
    (0.0), later steps not scored; -1 -> every step correct; unparsable -> null per step."""
    if first == -1:
        return [1.0] * n
    if first is None or not 0 <= first < n:
        return [None] * n
    return [1.0] * first + [0.0]


def processbench_rows(run: str, split: str, data: list[dict]) -> list[dict]:
    """The official inputs -> --predictions rows: the critic's text read as run_eval.py reads it
    (then per-step scores), or the PRM's 1-token replies as run_eval_prm_rlhflow.py reads them
    (correct iff .strip().lower() starts with '+')."""
    n = {r["id"]: len(r["steps"]) for r in data}
    rows = []
    for line in (PB / "predictions" / f"{run}.jsonl").read_text().splitlines():
        p = json.loads(line)
        if p["split"] != split:
            continue
        if "step_judgments" in p:
            scores = [float(j.strip().lower().startswith("+")) for j in p["step_judgments"]]
        else:
            scores = step_scores(critic_first_error(p["generated_critique"]), n[p["id"]])
        rows.append({"id": p["id"], "scores": scores})
    return rows


@pytest.mark.parametrize("run", list(PB_EXP["runs"]))
def test_processbench_matches_the_official_scripts(run, tmp_path):
    """Per split (one --data file each); the first split through prm_bench.main, the others
    through the functions stage_eval calls (the plots take most of a run's second)."""
    nums = Numbers()
    for split in SPLITS:
        data = PB / "data" / f"{split}.json"
        exp = PB_EXP["runs"][run]["splits"][split]
        rows = processbench_rows(run, split, json.loads(data.read_text()))
        res, records, judged = eval_in_memory("processbench", data, rows, tmp_path, split)
        if split == SPLITS[0]:
            res_cli, _ = run_eval(tmp_path, f"{run}-{split}", "processbench", data, rows)
            assert res_cli["ProcessBench"] == res["ProcessBench"]
        ours = res["ProcessBench"]
        for k, mine in (("acc1_error", "acc_err"), ("acc2_correct", "acc_corr"), ("f1", "f1")):
            theirs = undefined(exp[k])
            nums.check(f"{split} {k}", None if theirs is None else theirs / 100, ours[mine])
        nums.check(f"{split} n_error", exp["n_error"], ours["n_err"])
        nums.check(f"{split} n_correct", exp["n_correct"], ours["n_corr"])
        for f, v in exp["written_files_lines"].items():
            nums.check(f"{split} {f}", v, ours["n_err" if f.endswith("_error.jsonl") else "n_corr"])
        printed = re.findall(r"(?:acc|f1): ([\d.]+|nan)", exp["printed"])   # rounded
        assert printed == [("nan" if x is None else f"{100 * x:.1f}")
                           for x in (ours["acc_err"], ours["acc_corr"], ours["f1"])], split
        for rec, ps, row in zip(records, judged, exp["rows"]):
            assert rec["id"] == row["id"]
            gold, mine = pb.gold_first_error(rec), pb.first_error_prediction(ps, len(rec["steps"]))
            nums.check(f"{row['id']} label", row["label"], gold)
            nums.check(f"{row['id']} prediction", row["prediction"], mine)
            nums.check(f"{row['id']} match", row["match"], mine == gold)
            if "prm_calls" in row:   # the PRM script stops at the first step judged wrong
                nums.check(f"{row['id']} prm_calls", row["prm_calls"],
                           len(rec["steps"]) if mine == -1 else mine + 1)
    nums.assert_ok()
    assert not nums.named


# ----------------------------------------------------------------------------------------------
# VisualProcessBench: no official evaluator
# ----------------------------------------------------------------------------------------------
def test_visualprocessbench_names_its_metric_as_ours(tmp_path):
    vpb = HERE / "visualprocessbench"
    exp = json.loads((vpb / "expected.json").read_text())
    assert exp["official"] == "not found" and exp["computed"] is None   # no number to compare
    preds = [json.loads(x)
             for x in (vpb / "predictions" / "prm_scores.jsonl").read_text().splitlines()]
    rows = [{"id": str(p["index"] + 1), "scores": p["step_scores"]} for p in preds]  # line ids
    res, _ = run_eval(tmp_path, "vpb", "visualprocessbench", vpb / "test.jsonl", rows)
    ours = res["VisualProcessBench"]
    assert ours["metric"] == ("macro_f1 as VisualPRM's paper describes; "
                              "official evaluator not found")
    assert "official evaluator not found" in DOC
    # by hand: per data_source, neutral (0) steps and unscored steps out, score > 0.5 correct
    counts = {}
    data = [json.loads(x) for x in (vpb / "test.jsonl").read_text().splitlines()]
    for row, p in zip(data, preds):
        c = counts.setdefault(row["data_source"], Counter())
        for mark, score in zip(row["response"]["process_correctness"], p["step_scores"]):
            if mark != 0:
                c[(mark == 1, score > 0.5)] += 1
    pooled = sum(counts.values(), Counter())
    for src, c in [*counts.items(), (None, pooled)]:
        tp, fp, fn, tn = c[(True, True)], c[(False, True)], c[(True, False)], c[(False, False)]
        f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fp + fn else None
        macro = None if f1_pos is None or f1_neg is None else (f1_pos + f1_neg) / 2
        mine, nums = ours if src is None else ours["per_data_source"][src], Numbers()
        nums.check(f"{src} f1_correct", f1_pos, mine["f1_correct"])
        nums.check(f"{src} f1_incorrect", f1_neg, mine["f1_incorrect"])
        nums.check(f"{src} macro_f1", macro, mine["macro_f1"])
        nums.assert_ok()
    assert set(ours["per_data_source"]) == {"MMMU", "MathVision", "MathVerse", "DynaMath",
                                            "WeMath"}
