# Run: pytest tests/test_gog_benchmarks.py -q        (seconds; no downloads, no model)
"""The six benchmarks of gog.py in their published schemas (tiny files built here): records load,
a right answer scores 1 and a wrong one 0 under each benchmark's own rule, hand-computed
aggregates (token F1, InfoSeek's harmonic mean), `--stage eval --predictions` and Avg in %."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import gog
from common.benchmarks.gog import (em_check, extract_answer, infoseek_score, subem_check,
                                   token_f1)
from common.errors import UserError
from gog import parse_benchmarks, score_record, summarize_benchmark


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return buf.getvalue()


def write_fvqa(d):
    rows = [{"data_id": f"fvqa-{i}", "category": "search_required",
             "images": [{"bytes": png(), "path": None}],
             "prompt": [{"role": "system", "content": "s"},
                        {"role": "user", "content": f"<image>Which tower {i}?"}],
             "reward_model": {"ground_truth": "Eiffel Tower",
                              "candidate_answers": json.dumps(["La tour Eiffel"])}}
            for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), d / "fvqa_test.parquet")
    return d / "fvqa_test.parquet"


def write_infoseek(d):
    (d / "oven").mkdir(exist_ok=True)
    Image.new("RGB", (56, 56)).save(d / "oven" / "oven_0001.jpg")
    rows = [{"data_id": "val_0", "image_id": "oven_0001", "question": "What country?",
             "answer": ["Germany"], "answer_eval": ["Germany", "Federal Republic of Germany"],
             "data_split": "val_unseen_question"},
            {"data_id": "val_1", "image_id": "oven_0001", "question": "When built?",
             "answer": ["1932"], "answer_eval": [{"wikidata": 1932.0, "range": [1922.4, 1941.6]}],
             "data_split": "val_unseen_entity"},
            {"data_id": "val_2", "image_id": "oven_0001", "question": "Which river?",
             "answer": ["Rhine"], "answer_eval": ["Rhine"], "data_split": "val_unseen_entity"},
            {"data_id": "val_3", "image_id": "oven_0001", "question": "Which sea?",
             "answer": ["North Sea"], "answer_eval": ["North Sea"],
             "data_split": "val_unseen_question"}]
    (d / "infoseek_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "infoseek_val.jsonl"


def write_mmsearch(d):
    rows = [{"sample_id": "m0", "query": "Which tower is in the news?",
             "query_image": {"bytes": png(), "path": None},
             "gt_answer": "Eiffel Tower Paris", "alternative_gt_answers": [], "area": "news",
             "subfield": "x"},
            {"sample_id": "m1", "query": "Who won?", "query_image": None, "gt_answer": "Alice",
             "alternative_gt_answers": ["Alice B."], "area": "sports", "subfield": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), d / "end2end.parquet")
    return d / "end2end.parquet"


def write_simplevqa(d):
    rows = [{"data_id": i, "image": {"bytes": png(), "path": None}, "question": "What is shown?",
             "answer": a, "language": "EN"}
            for i, a in enumerate(["a red square", "Mount Fuji"])]
    pq.write_table(pa.Table.from_pylist(rows), d / "simplevqa.parquet")
    return d / "simplevqa.parquet"


def write_livevqa(d):
    (d / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (56, 56)).save(d / "imgs" / "a.png")
    qa = {"question": "Which city?", "options": ["A. Paris", "B. Rome"], "Ground_Truth": "A",
          "Ground_Truth_List": ["Paris"]}
    rows = [{"id": 7, "img_path": "imgs/a.png", "level1_qa": qa,
             "level2_qa": dict(qa, Ground_Truth_List=["Rome"])}]
    (d / "benchmark.json").write_text(json.dumps(rows))
    return d / "benchmark.json"


def write_dynvqa(d):
    rows = [{"image_url": "https://example.org/pics/q1.jpg?x=1", "question": "Who is the CEO?",
             "question_id": "d1", "answer": ["Alice", "爱丽丝"]}]
    (d / "DynVQA_en.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in rows))
    return d / "DynVQA_en.jsonl"


RIGHT_WRONG = {  # (benchmark, writer, {id: answer}, expected headline %)
    "FVQA": (write_fvqa, {"fvqa-0": "la tour eiffel", "fvqa-1": "Big Ben"}, 50.0),
    "InfoSeek": (write_infoseek,
                 {"val_0": "Federal Republic of Germany", "val_1": "about 1930", "val_2": "Danube",
                  "val_3": "the North Sea"},
                 # unseen_question 100 %, unseen_entity 50 %: harmonic mean 66.67 (rounded to 2
                 # places, as infoseek_eval), not 75
                 66.67),
    "MMSearch": (write_mmsearch, {"m0": "Eiffel Tower in Paris", "m1": "Bob"},
                 100 * (2 * 3 / 7) / 2),   # F1 6/7, 0
    "SimpleVQA": (write_simplevqa, {"0": "A red square.", "1": "Kilimanjaro"}, 50.0),
    "LiveVQA": (write_livevqa, {"7-level1_qa": "Paris", "7-level2_qa": "Paris"}, 50.0),
}


@pytest.mark.parametrize("name", list(RIGHT_WRONG))
def test_benchmark_loads_and_scores_right_1_wrong_0(name, tmp_path):
    writer, preds, expected = RIGHT_WRONG[name]
    path = writer(tmp_path)
    recs = gog.load_benchmark(name, str(path),
                              str(tmp_path / "oven") if name == "InfoSeek" else None)
    assert sorted(r["id"] for r in recs) == sorted(preds) and all(r["question"] for r in recs)
    assert all(r["image"] is not None for r in recs if r["id"] != "m1")
    rule = gog.BENCHMARKS[name]["score"]
    scores = [score_record(rule, preds[r["id"]], r["golds"], None) for r in recs]
    summary = summarize_benchmark(name, recs, scores)
    assert summary[summary["headline"]] == pytest.approx(expected)


def test_each_rule_on_hand_computed_cases():
    assert token_f1("the Eiffel Tower", "Eiffel Tower Paris") == pytest.approx(0.8)
    # range inside
    assert infoseek_score("between 1925 and 1935", [{"range": [1922.4, 1941.6]}]) == 1.0
    assert infoseek_score("1900-1930", [{"range": [1920, 1940]}]) == 0.0   # IoU 10 / 40
    assert infoseek_score("1915-1940", [{"range": [1920, 1940]}]) == 1.0   # IoU 20 / 25
    assert infoseek_score("1,950", [{"range": [1922.4, 1941.6]}]) == 0.0
    em = score_record("mmsearch_r1", "It is the Eiffel Tower", ["Eiffel Tower"], None)
    assert em == {"EM": 0.0, "SubEM": 1.0}
    # MMSearch-R1's checks: ASCII punctuation only, SubEM a plain substring, the last <answer>
    assert subem_check("United States", ["ES"]) == 1.0 and em_check("“Portugal”", ["Portugal"]) == 0
    assert extract_answer("<answer>Lyon</answer> no, <answer> Paris </answer>") == "Paris"
    assert extract_answer("<answer>Danube") is None
    assert score_record("mmsearch_r1", "<reason>r</reason><answer>Paris</answer>",
                        ["Paris", 3], None) == {"EM": 1.0, "SubEM": 1.0}
    assert token_f1("", "") == 1.0 and token_f1(None, "x") == 0.0   # get_f1_score; no answer
    assert score_record("llm_judge", "x", ["y"], 1.0)["LLM judge"] == 1.0


def test_remote_images_need_a_folder(tmp_path):
    path = write_dynvqa(tmp_path)
    with pytest.raises(UserError, match="DynVQA_en.jsonl:1: .*remote.*--image_dir"):
        gog.load_benchmark("DynVQA", str(path))
    (tmp_path / "dl").mkdir()
    Image.new("RGB", (56, 56)).save(tmp_path / "dl" / "q1.jpg")
    [rec] = gog.load_benchmark("DynVQA", str(path), str(tmp_path / "dl"))
    assert rec["image"].size == (56, 56) and rec["answers"] == ["Alice", "爱丽丝"]


def test_broken_rows_name_file_and_row(tmp_path):
    rows = [{"data_id": "x", "prompt": [{"role": "user", "content": "q"}],
             "images": [{"bytes": png()}],
             "reward_model": {"ground_truth": "", "candidate_answers": "[]"}, "category": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet:row 1: no gold answer"):
        gog.load_benchmark("FVQA", str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match="NAME=FILE"):
        parse_benchmarks("NotABench=x.jsonl", gog.BENCHMARKS)


def test_eval_scores_a_predictions_file_avg_over_real_benchmarks_in_percent(tmp_path):
    fvqa, mms = write_fvqa(tmp_path), write_mmsearch(tmp_path)
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "answer": a}) for i, a in [])
                     + "\n".join(json.dumps({"id": i, "answer": a})
                                 for i, a in [("fvqa-0", "Eiffel Tower"),
                                              ("fvqa-1", "Eiffel Tower"), ("m0", "Bob")])
                     + "\n")
    gog.main(["--stage", "eval", "--model", "tiny", "--out", str(tmp_path / "run"),
              "--predictions", str(preds), "--benchmarks", f"FVQA={fvqa},MMSearch={mms}"])
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert res["benchmarks"]["FVQA"]["EM"] == 100.0 and res["benchmarks"]["MMSearch"]["F1"] == 0.0
    assert res["benchmarks"]["MMSearch"]["missing_answers"] == 1
    assert res["Avg"] == 50.0 and isinstance(res["toy"], str)   # the toy set is not in Avg


class FakeJudge:
    """A judge model that replies with the given texts, in order."""
    def __init__(self, replies):
        self.replies = replies

    def chat(self, batch, **kw):
        return self.replies[:len(batch)]


@pytest.mark.parametrize("replies", [["hmm?", "correct"], ["correct", "hmm?"]])
def test_unparsable_judge_verdict_is_counted_apart_and_the_metric_stays(replies, tmp_path):
    """An unparsable reply was a KeyError (second) or dropped the judge metric (first)."""
    recs = gog.load_benchmark("SimpleVQA", str(write_simplevqa(tmp_path)))
    res = gog.score_benchmarks([("SimpleVQA", recs)], {"SimpleVQA": ["a red square", "Fuji"]},
                               gog.BENCHMARKS, judge=FakeJudge(replies))["SimpleVQA"]
    assert res["headline"] == "LLM judge" and res["LLM judge"] == 50.0   # unparsable = wrong
    assert res["judge_unparsable"] == 1


def test_infoseek_one_split_names_its_aggregation(tmp_path):
    recs = [r for r in gog.load_benchmark("InfoSeek", str(write_infoseek(tmp_path)),
                                          str(tmp_path / "oven"))
            if r["split"] == "val_unseen_entity"]
    scores = [score_record("infoseek", a, r["golds"], None)
              for a, r in zip(["1930", "Elbe"], recs)]
    res = summarize_benchmark("InfoSeek", recs, scores)
    assert res["InfoSeek"] == 50.0 and "unseen_entity split only" in res["aggregation"]
    assert "question-type file" in " ".join(res["deviations"])   # time / string need it
    assert res["unseen_entity_score"] == {"score": 50.0, "n": 2, "score_num": 100.0}


def test_infoseek_question_types_must_agree_with_the_golds(tmp_path):
    path = write_infoseek(tmp_path)
    (tmp_path / "infoseek_val_qtype.jsonl").write_text("".join(
        json.dumps({"data_id": f"val_{i}", "question_type": t}) + "\n"
        for i, t in enumerate(["String", "String", "String", "String"])))
    with pytest.raises(UserError, match="says 'String' for 'val_1', but its answer_eval holds"):
        gog.load_benchmark("InfoSeek", str(path), images=False)


def test_all_wrong_run_prints_avg_0(tmp_path, capsys):
    """InfoSeek's harmonic mean of two zero splits is 1e-12: it printed `Avg 3.33e-13 %`."""
    fvqa, info = write_fvqa(tmp_path), write_infoseek(tmp_path)
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "answer": "Danube"}) + "\n"
                             for i in ["fvqa-0", "fvqa-1", "val_0", "val_1", "val_2", "val_3"]))
    gog.main(["--stage", "eval", "--model", "tiny", "--out", str(tmp_path / "run"),
              "--predictions", str(preds), "--image_dir", str(tmp_path / "oven"),
              "--benchmarks", f"FVQA={fvqa},InfoSeek={info},InfoSeek={info}"])
    assert "Avg 0.000 (0-1)" in capsys.readouterr().out      # the console gives rates in 0-1


def test_livevqa_gold_option_letter_counts(tmp_path):
    recs = gog.load_benchmark("LiveVQA", str(write_livevqa(tmp_path)))
    for judge, key in ((None, "SubEM (rule stand-in for the LLM grader)"),
                       (FakeJudge(["incorrect"] * 2), "LLM judge")):
        res = gog.score_benchmarks([("LiveVQA", recs)], {"LiveVQA": ["(a)", "B"]},
                                   gog.BENCHMARKS, judge=judge)["LiveVQA"]
        assert res[key] == 50.0   # both golds are option A; "B" is wrong
    assert score_record("llm_judge", "A. Paris", ["Paris"], letter="A")[
        "SubEM (rule stand-in for the LLM grader)"] == 1.0
