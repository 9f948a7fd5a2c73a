# Run: pytest tests/assignments/test_lras.py -q     (seconds; docs/assignments/lras.md)
"""Grader of the LRAS assignment: trajectory pruning (Sec. 3.2: keep a search only if it found a
new supporting document) and difficulty-aware sampling (d = 1 - p). Values worked out by hand."""
import pytest

from lras import difficulty_sampling, prune_trajectory


def said(text):
    return {"role": "assistant", "text": text}


def found(*titles, name="text_search"):
    docs = " ".join(f"Doc {i + 1}(Title: {t}) ..." for i, t in enumerate(titles))
    return {"role": "tool", "name": name, "args": {}, "observation": docs}


Q1, Q2, Q3, ANS = said("<search>q1</search>"), said("<search>q2</search>"), \
    said("<search>q3</search>"), said("<answer>B</answer>")


# --------------------------------------------------------------------------- prune_trajectory
def test_prune_trajectory_drops_a_search_with_nothing_new():
    turns = [Q1, found("art 1", "noise"), Q2, found("art 1"), Q3, found("art 7"), ANS]
    kept, dropped = prune_trajectory(turns, ["art 1", "art 7"])
    assert kept == [Q1, turns[1], Q3, turns[5], ANS] and dropped == 1


def test_prune_trajectory_drops_irrelevant_and_failed_searches():
    turns = [Q1, found("noise"), Q2, found("art 1", name="error"), Q3, found("art 1"), ANS]
    kept, dropped = prune_trajectory(turns, ["art 1"])
    # an observation of another tool (an error) brings no document, even if it names one
    assert kept == [Q3, turns[5], ANS] and dropped == 2


def test_prune_trajectory_a_lucky_guess_is_none():
    # the kept searches never found "art 7": the answer was a guess
    turns = [Q1, found("art 1"), ANS]
    assert prune_trajectory(turns, ["art 1", "art 7"]) == (None, 0)


def test_prune_trajectory_one_search_finding_both():
    turns = [Q1, found("art 7", "art 1"), Q2, found("art 7"), ANS]
    assert prune_trajectory(turns, ["art 1", "art 7"]) == ([Q1, turns[1], ANS], 1)


def test_prune_trajectory_drops_orphan_observations():
    orphan = found("art 1")
    kept, dropped = prune_trajectory([orphan, Q1, found("art 1"), ANS], ["art 1"])
    assert kept == [Q1, found("art 1"), ANS] and dropped == 1


def test_prune_trajectory_titles_must_match_exactly():
    # "art 1" is not found inside "(Title: art 12)"
    assert prune_trajectory([Q1, found("art 12"), ANS], ["art 1"]) == (None, 1)


# ------------------------------------------------------------------------ difficulty_sampling
POOL = [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}, {"id": "e"}]
RATES = {"a": 0.0, "b": 0.25, "c": 1.0, "d": 0.5, "e": 0.875}


def test_difficulty_sampling_weights():
    kept, weights = difficulty_sampling(POOL, RATES, uniform=False)
    # p = 0 and p = 1 carry no GRPO signal (every reward in the group equal); d = 1 - p
    assert [q["id"] for q in kept] == ["b", "d", "e"]
    assert weights == pytest.approx([0.75, 0.5, 0.125])


def test_difficulty_sampling_uniform():
    kept, weights = difficulty_sampling(POOL, RATES, uniform=True)
    assert [q["id"] for q in kept] == ["b", "d", "e"] and weights is None
