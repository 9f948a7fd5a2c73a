# Run: pytest tests/assignments/test_prm_bench.py -q     (seconds; docs/assignments/prm_bench.md)
"""Grader of the prm_bench assignment: PRMScore, ProcessBench's first-error prediction and F1,
VisualProcessBench's macro-F1, from step verdicts (True = judged correct, False = judged
incorrect, None = unparsed). Counts and values worked out by hand in the comments."""
import pytest

from prm_bench import first_error_prediction, prmscore, processbench, visualprocessbench

T, F = True, False


# ------------------------------------------------------------------------------------ prmscore
def test_prmscore_by_hand():
    # (gold correct, judged correct): TP 2, FN 1, TN 1, FP 1
    s = prmscore([(T, T), (T, T), (T, F), (F, F), (F, T)])
    assert s["f1"] == pytest.approx(4 / 6)                 # 2TP / (2TP + FP + FN)
    assert s["negative_f1"] == pytest.approx(2 / 4)        # 2TN / (2TN + FN + FP)
    assert s["PRMScore"] == pytest.approx((4 / 6 + 2 / 4) / 2) and s["n_steps"] == 5


def test_prmscore_undefined_and_zero_classes():
    # no incorrect step in gold or verdicts: F1(incorrect) is 0/0 -> None, and so is PRMScore
    s = prmscore([(T, T), (T, T)])
    assert s["f1"] == 1.0 and s["negative_f1"] is None and s["PRMScore"] is None
    # an incorrect verdict on a correct step: F1(incorrect) = 0 / (0 + 1) = 0, defined
    s = prmscore([(T, T), (T, F)])
    assert s["negative_f1"] == 0.0 and s["PRMScore"] == pytest.approx((2 / 3) / 2)
    # a judge that calls every step correct scores PRMScore 0.5 * F1(correct) at best
    s = prmscore([(T, T), (F, T), (F, T)])
    assert s["PRMScore"] == pytest.approx(0.5 * (2 / 4))


# ------------------------------------------------------------------------ first_error_prediction
@pytest.mark.parametrize("ps, n, want", [
    ([T, T, F, T], 4, 2),          # the first step judged incorrect
    ([T, T, T], 3, -1),            # every step judged correct
    ([F], 1, 0),
    ([T, None, F], 3, None),       # an unparsed step comes first: unparsable
    ([T], 3, None),                # an unscored step comes first
    ([T, F, None], 3, 1),          # an unparsed step after the first error does not matter
])
def test_first_error_prediction(ps, n, want):
    assert first_error_prediction(ps, n) == want


# -------------------------------------------------------------------------------- processbench
def test_processbench_by_hand():
    gold = [2, -1, 0, -1, 1]
    pred = [2, -1, 1, 0, None]
    s = processbench(gold, pred)
    # with an error: right at 2; wrong (1 for 0); unparsable (None for 1) -> 1/3
    # error-free: -1 right, 0 wrong -> 1/2; F1 = 2 * (1/3)(1/2) / (1/3 + 1/2) = 0.4
    assert s["acc_err"] == pytest.approx(1 / 3) and s["acc_corr"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(0.4) and (s["n_err"], s["n_corr"]) == (3, 2)


def test_processbench_undefined():
    assert processbench([1, -1], [0, 2])["f1"] is None             # both accuracies 0
    s = processbench([-1, -1], [-1, -1])                          # no sample with an error
    assert s["acc_err"] is None and s["acc_corr"] == 1.0 and s["f1"] is None


# -------------------------------------------------------------------------- visualprocessbench
def rec(source, *labels):
    return {"subcategory": source, "steps": [{"label": x} for x in labels]}


def test_visualprocessbench_by_hand():
    records = [rec("mathverse", "correct", "correct", "incorrect"),
               rec("mmmu", "correct", "neutral", "incorrect"),
               rec("mmmu", "incorrect", "correct")]
    pred = [[T, F, F], [T, T, T], [None, T]]
    s = visualprocessbench(records, pred)
    # neutral and unparsed steps dropped: TP 3, FN 1, TN 1, FP 1 over 6 steps
    assert s["f1_correct"] == pytest.approx(6 / 8) and s["f1_incorrect"] == pytest.approx(2 / 4)
    assert s["macro_f1"] == pytest.approx((6 / 8 + 2 / 4) / 2) and s["n_steps"] == 6
    mv, mm = s["per_data_source"]["mathverse"], s["per_data_source"]["mmmu"]
    # mathverse: TP 1, FN 1, TN 1 -> 2/3 and 2/3; mmmu: TP 2, FP 1 -> 4/5 and 0
    assert mv["macro_f1"] == pytest.approx(2 / 3) and mv["n_steps"] == 3
    assert (mm["f1_correct"], mm["f1_incorrect"]) == pytest.approx((0.8, 0.0))
    assert mm["macro_f1"] == pytest.approx(0.4) and mm["n_steps"] == 3
    assert sorted(s["per_data_source"]) == ["mathverse", "mmmu"]
