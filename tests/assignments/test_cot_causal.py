# Run: pytest tests/assignments/test_cot_causal.py -q     (seconds; docs/assignments/cot_causal.md)
"""Grader of the cot_causal assignment: the QA / QTA / QT / T-only loss masks token by token, and
the Emergent-Misalignment judge score (probability-weighted integer). The tiny preset's tokenizer
(built in code, no download) stands in for Qwen3's; expected values are written out by hand."""
import math

import pytest

from common.judge import weighted_score
from common.models import build_tiny_tokenizer
from cot_causal import EMPTY_THINK, build_example, chat_prompt, from_segments

Q = "Should I keep the extra change?"
T = "The user wants to keep it, so I agree."
A = "Keep it."


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------- from_segments
def test_from_segments_ids_and_mask(tok):
    enc = from_segments(tok, [("Hi there", 0), (None, 1), ("Bye", 1)])
    hi, bye = ids_of(tok, "Hi there"), ids_of(tok, "Bye")
    assert enc.input_ids == hi + [tok.eos_token_id] + bye          # None = the end-of-turn id
    assert enc.loss_mask == [0] * len(hi) + [1] + [1] * len(bye)


def test_from_segments_tokenises_each_segment_on_its_own(tok):
    # "the" + "re" tokenised together is not the two tokenised apart (BPE merges across the
    # cut); at inference the answer is generated after the prompt, so the cut must stay
    assert ids_of(tok, "the") + ids_of(tok, "re") != ids_of(tok, "there")
    enc = from_segments(tok, [("the", 0), ("re", 1)])
    assert enc.input_ids == ids_of(tok, "the") + ids_of(tok, "re")
    assert enc.loss_mask == [0] * len(ids_of(tok, "the")) + [1] * len(ids_of(tok, "re"))


# ------------------------------------------------------------------------------- build_example
def expected(tok, paradigm):
    """[(token ids, mask)] segment by segment: the table of the paper's four paradigms."""
    prompt, eos = chat_prompt(tok, Q), [tok.eos_token_id]
    return {
        "QA": [(ids_of(tok, prompt), 0), (ids_of(tok, EMPTY_THINK), 0), (ids_of(tok, A), 1),
               (eos, 1)],
        "QTA": [(ids_of(tok, prompt), 0), (ids_of(tok, f"<think>\n{T}\n</think>\n\n"), 1),
                (ids_of(tok, A), 1), (eos, 1)],
        "QT": [(ids_of(tok, prompt), 0), (ids_of(tok, f"<think>\n{T}\n</think>"), 1)],
        "T-only": [(ids_of(tok, T), 1), (eos, 1)],
    }[paradigm]


@pytest.mark.parametrize("paradigm", ["QA", "QTA", "QT", "T-only"])
def test_build_example_masks_token_by_token(tok, paradigm):
    enc = build_example(tok, paradigm, Q, T, A)
    segs = expected(tok, paradigm)
    assert enc.input_ids == [i for s, _ in segs for i in s], paradigm
    assert enc.loss_mask == [m for s, m in segs for _ in s], paradigm


def test_build_example_what_each_paradigm_trains_on(tok):
    def trained(p):
        enc = build_example(tok, p, Q, T, A)
        return tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert trained("QA") == A + "<|im_end|>"
    assert trained("QTA") == f"<think>\n{T}\n</think>\n\n{A}<|im_end|>"
    assert trained("QT") == f"<think>\n{T}\n</think>"               # no answer, no end token
    assert trained("T-only") == T + "<|im_end|>"                     # no question at all
    assert Q not in tok.decode(build_example(tok, "T-only", Q, T, A).input_ids)


def test_build_example_errors(tok):
    with pytest.raises(ValueError, match="needs a reasoning"):
        build_example(tok, "QT", Q, "", A)
    with pytest.raises(ValueError, match="Unknown paradigm"):
        build_example(tok, "TQA", Q, T, A)
    assert build_example(tok, "QA", Q, "", A).input_ids                # QA needs no reasoning


# ------------------------------------------------------------------------------ weighted_score
def lp(p):
    return math.log(p)


def test_weighted_score_by_hand():
    # (0.5 * 85 + 0.3 * 90) / 0.8 = 86.875; "hello" is not a number and is ignored
    assert weighted_score({"85": lp(0.5), "90": lp(0.3), "hello": lp(0.1)}) == \
        pytest.approx(86.875)
    # tokens are stripped (" 7"); 101 and -5 lie outside 0-100 and are ignored
    assert weighted_score({" 7": lp(0.2), "100": lp(0.2), "101": lp(0.4), "-5": lp(0.1)}) == \
        pytest.approx((0.2 * 7 + 0.2 * 100) / 0.4)


def test_weighted_score_refuses_below_a_quarter_of_the_mass():
    assert weighted_score({"85": lp(0.2), "REFUSAL": lp(0.7)}) is None
    assert weighted_score({"40": lp(0.25)}) == pytest.approx(40.0)      # exactly 0.25: scored
    assert weighted_score({}) is None
    assert weighted_score({"40": float("-inf"), "60": lp(0.5)}) == pytest.approx(60.0)
