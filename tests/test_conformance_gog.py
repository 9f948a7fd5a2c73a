# Run: pytest tests/test_conformance_gog.py -q        (seconds; no model, no downloads)
"""gog.py's `--stage eval --predictions` scoring against numbers made by the official code
(tests/conformance/vqa/<benchmark>/: data slice, predictions, expected.json, README with the
commit). EVERY number in expected.json is either compared with ours (1e-6, on one scale: the
official fractions times 100 where ours is in %) or listed as a deviation that our result names.
"""
import json
from pathlib import Path

import pytest

import gog
from common.benchmarks.gog import numbers_in, token_f1
from gog import score_record

HERE = Path(__file__).resolve().parent / "conformance" / "vqa"


def numbers(obj, path=()):
    """{"a/b/0/c": number} for every int / float leaf of a JSON value (bools are not numbers)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, path + (key,)).items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj)
                for k, v in numbers(val, path + (str(i),)).items()}
    ok = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return {"/".join(path): obj} if ok else {}


def evaluate(tmp_path, name: str, data: str) -> tuple[dict, list[dict], dict, dict]:
    """(our results.json entry, records, {id: prediction}, expected.json) of one fixture folder,
    through `gog.py --stage eval --predictions` in this process."""
    folder = HERE / name.lower()
    path = str(folder / data)
    gog.main(["--stage", "eval", "--model", "tiny", "--out", str(tmp_path / "run"),
              "--predictions", str(folder / "predictions.jsonl"),
              "--benchmarks", f"{name}={path}"])
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    preds = gog.read_predictions(str(folder / "predictions.jsonl"))
    recs = gog.load_benchmark(name, path, None, images=False)
    return (res["benchmarks"][name], recs, preds,
            json.loads((folder / "expected.json").read_text()))


def check_all(expected: dict, ours: dict, named: dict, deviations: list[str]):
    """Every number of expected.json is compared (`ours`: path -> our value on the official
    scale) or named (`named`: path -> a phrase that one of our result's deviations contains)."""
    every = numbers(expected)
    assert set(every) - set(ours) - set(named) == set(), "numbers neither compared nor named"
    wrong = {p: (every[p], ours[p]) for p in ours if ours[p] != pytest.approx(every[p], abs=1e-6)}
    assert not wrong, f"official vs ours: {wrong}"
    unnamed = {p: why for p, why in named.items() if not any(why in d for d in deviations)}
    assert not unnamed, f"deviations our result does not name: {unnamed}"


def test_fvqa_em_subem_are_multimodal_search_r1s(tmp_path):
    res, recs, preds, exp = evaluate(tmp_path, "FVQA", "fvqa_test.parquet")
    assert "multimodal-search-r1@583c6b4" in res["source"]
    ours, named = {"n": res["n"]}, {}
    for k in ("EM", "SubEM"):
        ours[f"mean/{k}"] = res[k] / 100
        ours[f"mean_x100/{k}"] = round(res[k], 4)
        for cat, row in exp["by_category"].items():
            ours[f"by_category/{cat}/{k}"] = res["by_split"][cat][k] / 100
            ours[f"by_category/{cat}/n"] = res["by_split"][cat]["n"]
    for k in ("EM_strict", "SubEM_strict", "reward_EM", "reward_SubEM"):
        named[f"mean/{k}"] = "closed <answer>"
    for k in ("EM_strict", "SubEM_strict"):
        named[f"mean_x100/{k}"] = "closed <answer>"
    named.update({"val_score_EM": "closed <answer>", "val_score_SubEM": "closed <answer>"})
    by_id = {r["id"]: r for r in recs}
    for i, row in enumerate(exp["rows"]):
        rec = by_id[row["data_id"]]
        assert rec["golds"] == row["golds"] and preds[row["data_id"]] == row["answer"]
        score = score_record("mmsearch_r1", preds[rec["id"]], rec["golds"], None)
        ours.update({f"rows/{i}/EM": score["EM"], f"rows/{i}/SubEM": score["SubEM"]})
        named.update({f"rows/{i}/{k}": "closed <answer>" for k in
                      ("EM_strict", "SubEM_strict", "reward_EM", "reward_SubEM", "format_score")})
    check_all(exp, ours, named, res["deviations"])


def test_mmsearch_f1_is_caraj7_end2end_and_names_lmms_evals_denominator(tmp_path):
    res, recs, preds, exp = evaluate(tmp_path, "MMSearch", "end2end.parquet")
    assert "CaraJ7/MMSearch@d340f3f" in res["source"]
    answered = "F1 over answered samples (lmms-eval)"
    head, lmms = exp["summary"]["caraj7_head"], exp["summary"]["lmms_eval"]
    ours = {"end2end_f1/caraj7_head": res["F1"] / 100,
            # every doc yields a result in a real lmms-eval run: then both agree
            "end2end_f1/lmms_eval_missing_prediction_as_empty_string": res["F1"] / 100,
            "end2end_f1/lmms_eval": res[answered] / 100,
            "summary/caraj7_head/total_dict/total_length": res["n"],
            "summary/caraj7_head/total_dict/average": res["F1"] / 100,
            "summary/lmms_eval/total_dict/total_length": res["n"] - res["missing_answers"],
            "summary/lmms_eval/total_dict/average": res[answered] / 100}
    for group, by in (("area_dict", "by_split"), ("subfield_dict", "by_subfield")):
        for k in head[group]:
            ours[f"summary/caraj7_head/{group}/{k}/average"] = res[by][k]["F1"] / 100
            ours[f"summary/caraj7_head/{group}/{k}/length"] = res[by][k]["n"]
    # lmms-eval's groups: our per-sample F1 over the answered samples of each group
    scores = {r["id"]: score_record("token_f1", preds.get(r["id"]), r["golds"], None)["F1"]
              for r in recs}
    for group, field in (("area_dict", "split"), ("subfield_dict", "subfield")):
        for k in lmms[group]:
            got = [scores[r["id"]] for r in recs if r[field] == k and r["id"] in preds]
            ours[f"summary/lmms_eval/{group}/{k}/average"] = sum(got) / len(got)
            ours[f"summary/lmms_eval/{group}/{k}/length"] = len(got)
    named = {p: "gt_answer only" for p in numbers(exp)
             if "caraj7_5c5b1d5_gt_only" in p and not p.startswith("per_sample")}
    by_id = {r["id"]: r for r in recs}
    for i, row in enumerate(exp["per_sample"]):
        rec, pred = by_id[row["sample_id"]], row["prediction"]
        assert rec["golds"] == [row["gt_answer"], *row["alternative_gt_answers"]]
        assert preds.get(row["sample_id"]) == pred
        if pred is not None:
            f1 = score_record("token_f1", pred, rec["golds"], None)["F1"]
            ours.update({f"per_sample/{i}/f1_caraj7_head": f1, f"per_sample/{i}/f1_lmms_eval": f1,
                         f"per_sample/{i}/f1_caraj7_5c5b1d5_gt_only":
                             token_f1(pred, row["gt_answer"])})
    check_all(exp, ours, named, res["deviations"])


def test_infoseek_final_is_infoseek_evals(tmp_path):
    res, recs, preds, exp = evaluate(tmp_path, "InfoSeek", "infoseek_val.jsonl")
    assert "infoseek_eval@bec0c4c" in res["source"] and "harmonic" in res["aggregation"]
    ours = {"final_score": res["InfoSeek"], "result/final_score": res["InfoSeek"]}
    for split in ("unseen_question_score", "unseen_entity_score"):
        ours[split] = res[split]["score"]
        ours.update({f"result/{split}/{k}": res[split][k] for k in exp["result"][split]})
    by_id = {r["id"]: r for r in recs}
    assert [r["data_id"] for r in exp["per_row"] if not r["scored"]] == ["infoseek_val_09999999"]
    assert set(by_id) - set(preds) == set(exp["reference_rows_without_prediction"])
    for i, row in enumerate(exp["per_row"]):
        if not row["scored"]:
            continue
        rec = by_id[row["data_id"]]
        ours[f"per_row/{i}/correct"] = score_record("infoseek", row["prediction"], rec["golds"],
                                                    None)["InfoSeek"]
        if "parsed_prediction" in row:
            parsed = numbers_in(row["prediction"])
            for j, v in enumerate(parsed if isinstance(parsed, list) else [parsed]):
                key = f"per_row/{i}/parsed_prediction" + (f"/{j}" if isinstance(parsed, list)
                                                           else "")
                ours[key] = v
    check_all(exp, ours, {}, res["deviations"])
    assert res["n"] == 17 and res["missing_answers"] == 1
