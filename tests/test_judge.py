# Run: pytest tests/test_judge.py -q
"""Tests for common/judge.py: normalisation, EM / sub-EM, choice letters, judge-reply parsing."""

import math

import pytest

from common.judge import (JUDGE_PROMPT, choice_match, exact_match, extract_choice, is_refusal,
                          keyword_flags, llm_judge, llm_judge_batch, match_answer, normalize_answer,
                          parse_label, parse_score, parse_verdict, sub_exact_match, weighted_score)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  An   apple, a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),  # "the" only as a whole word
    ("《中华人民共和国合同法》第五十二条。", "中华人民共和国合同法第五十二条"),
    ("答案：“无效”！", "答案无效"),
    ("¿Qué?", "qué"),
    (None, ""),
    (42, "42"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Tour Eiffel"]) == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0
    assert exact_match("合同无效。", ["合同无效"]) == 1.0
    assert exact_match(None, ["x"]) == 0.0
    assert exact_match("the", ["a"]) == 0.0  # both normalise to "": never a match


@pytest.mark.parametrize("pred, golds, score", [
    ("It is the Eiffel Tower in Paris.", ["Eiffel Tower"], 1.0),  # gold inside a verbose answer
    ("Paris", ["Paris, Texas"], 0.0),  # a fragment of the gold is not enough
    ("about 100 metres", ["10"], 0.0),  # word boundaries: "10" is not in "100"
    ("about 10 metres", ["10"], 1.0),
    ("根据第五十二条，合同无效", ["合同无效"], 1.0),  # CJK: no spaces, plain substring
    ("第10条", ["10"], 1.0),
    ("anything", ["the"], 0.0),  # a gold that normalises to "" never matches
    (None, ["x"], 0.0),
])
def test_sub_exact_match(pred, golds, score):
    assert sub_exact_match(pred, golds) == score


@pytest.mark.parametrize("text, letters", [
    ("B", "B"), ("(B)", "B"), ("b", "B"), ("**C**", "C"), ("B.", "B"),
    ("Answer: B", "B"), ("The answer is (D).", "D"), ("Option C", "C"),
    ("B. The contract is void", "B"), ("(A) because of fraud", "A"), ("C) void", "C"),
    ("AC", "AC"), ("CA", "AC"), ("A,C", "AC"), ("A, C", "AC"), ("Answer: A and C", "AC"),
    ("选B", "B"), ("选择D项", "D"), ("答案是C", "C"), ("答案：A、C", "AC"), ("答案为 B 和 D", "BD"),
    ("选项C正确", "C"), ("根据法律规定，答案是A。", "A"),
    ("I pick B", "B"),
    ("A contract requires consent, so B", None),  # "A" the article vs B: ambiguous
    ("The answer is a contract", None),  # lowercase "a" after a cue is a word, not option A
    ("Answer: Because of fraud", None),
    ("ABC Corporation", None),
    ("E", None),  # not among the choices
    ("", None), (None, None),
])
def test_extract_choice(text, letters):
    assert extract_choice(text) == letters


def test_extract_choice_more_options_and_choice_match():
    assert extract_choice("答案是E", choices="ABCDE") == "E"
    assert choice_match("答案是A,C", "CA") == 1.0
    assert choice_match("Answer: A", ["A", "C"]) == 0.0
    assert choice_match("I don't know", "B") == 0.0
    with pytest.raises(ValueError):
        choice_match("B", "the second one")


@pytest.mark.parametrize("reply, score", [
    ("Correct", 1.0), ("correct.", 1.0), ("**Correct**", 1.0), ("Yes", 1.0), ("TRUE", 1.0),
    ("Incorrect", 0.0), ("incorrect - the right answer is Paris", 0.0),  # first verdict wins
    ("The prediction is not correct.", 0.0), ("isn't correct", 0.0), ("Wrong.", 0.0), ("No", 0.0),
    ("NOT_ATTEMPTED", 0.0), ("1", 1.0), ("0", 0.0), ("Score: 7/10", 0.7), ("4 / 5", 0.8),
    ("正确", 1.0), ("不正确", 0.0), ("错误", 0.0),
    ("The answer is correct, not wrong.", 1.0),
    ("Score: 85", None), ("I cannot tell.", None), ("", None), (None, None),
])
def test_parse_verdict(reply, score):
    assert parse_verdict(reply) == (None if score is None else pytest.approx(score))


@pytest.mark.parametrize("reply, score, label", [
    ("85", 85.0, None), ("Score: 85", 85.0, None), ("85/100", 85.0, None), ("**85**", 85.0, None),
    ("I'd say 150... no, 90", 90.0, None), ("-5 then 12.5", 12.5, None),
    ("REFUSAL", None, "REFUSAL"), ("**CODE**", None, "CODE"), ("refusal.", None, "REFUSAL"),
    ("Codes of conduct: 40", 40.0, None),  # "CODE" must be a whole word
    ("no number here", None, None),
])
def test_parse_score_and_label(reply, score, label):
    assert parse_score(reply) == score
    assert parse_label(reply) == label
    assert parse_score("Score: 7/10", lo=0, hi=10) == 7.0


def test_weighted_score():
    # p("80") = 0.5, p("90") = 0.25, p("hello") = 0.25 (ignored): (0.5*80 + 0.25*90) / 0.75 = 83.33
    lp = {"80": math.log(0.5), " 90": math.log(0.25), "hello": math.log(0.25)}
    assert weighted_score(lp) == pytest.approx((0.5 * 80 + 0.25 * 90) / 0.75)
    # numbers hold 0.2 < 0.25 of the mass: the judge did not answer with a number
    assert weighted_score({"50": math.log(0.2), "REF": math.log(0.8)}) is None
    assert weighted_score({"150": math.log(0.9), "7": math.log(0.1)}) is None  # 150 is out of range
    assert weighted_score({"0": math.log(0.25)}) == 0.0
    assert weighted_score({}) is None


class FakePolicy:
    """Stands in for common/models.py: records the calls and returns canned replies."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def chat(self, batch_of_messages, max_new_tokens=64, temperature=0.0):
        self.calls.append((batch_of_messages, max_new_tokens, temperature))
        return self.replies[:len(batch_of_messages)]


def test_llm_judge_with_fake_policy():
    policy = FakePolicy(["Correct"])
    assert llm_judge(policy, "Capital of France?", "Paris", ["Paris"]) == 1.0
    (batch, max_new, temperature), = policy.calls
    assert (max_new, temperature) == (32, 0.0)
    assert [m["role"] for m in batch[0]] == ["system", "user"]
    assert batch[0][1]["content"] == JUDGE_PROMPT.format(
        question="Capital of France?", golds="Paris", prediction="Paris")
    assert llm_judge(FakePolicy(["Incorrect."]), "q", "Lyon", "Paris") == 0.0
    assert llm_judge(FakePolicy(["hmm"]), "q", "Lyon", "Paris") is None


def test_llm_judge_batch_skips_empty_predictions():
    policy = FakePolicy(["No", "Yes"])
    scores = llm_judge_batch(policy, ["q1", "q2", "q3"], ["Lyon", "", "Paris"],
                             [["Paris"], "Rome", ["Paris", "Paname"]])
    assert scores == [0.0, 0.0, 1.0]
    batch = policy.calls[0][0]
    assert len(batch) == 2 and "Gold answer(s): Paris | Paname" in batch[1][1]["content"]
    with pytest.raises(ValueError):
        llm_judge_batch(policy, ["q"], [], [])


def test_rule_fallbacks():
    assert match_answer("the Eiffel Tower", "eiffel tower") == 1.0
    assert match_answer("It is the Eiffel Tower", "eiffel tower", mode="sub_em") == 1.0
    assert match_answer("答案是B", "B", mode="choice") == 1.0
    with pytest.raises(ValueError):
        match_answer("x", "x", mode="fuzzy")
    assert keyword_flags("Mix BLEACH and ammonia", ["bleach"]) is True
    assert keyword_flags(None, ["bleach"]) is False
    for text in ["I'm sorry, but I can't help with that.", "I cannot provide legal advice.",
                 "I\u2019m unable to do that.", "Please consult a qualified professional.",
                 "抱歉，我无法回答这个问题。"]:
        assert is_refusal(text), text
    for text in ["The contract is void under Article 52.", "合同无效。", ""]:
        assert not is_refusal(text), text


@pytest.mark.parametrize("text,expected", [("Step 1 is correct.", 1.0), ("Step 0 is wrong", 0.0),
                                           ("In step 1 the crop is incorrect", 0.0),
                                           ("#1: yes", 1.0)])
def test_parse_verdict_skips_step_indices(text, expected):
    assert parse_verdict(text) == expected


def test_a_lone_option_letter_is_not_an_article():
    from common.judge import exact_match, normalize_answer, sub_exact_match
    assert normalize_answer("A") == "a" and normalize_answer("The A-team") == "ateam"
    assert exact_match("A", "A") and not exact_match("B", "A")
    assert sub_exact_match("A", ["A"]) and not sub_exact_match("B.", ["A"])
