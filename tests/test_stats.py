# Run: pytest tests/test_stats.py -q
"""common/stats.py: the Wilson interval against hand-computed values."""
import math

from common.stats import wilson


def test_wilson_zero_of_eight_by_hand():
    # p = 0, n = 8, z = 1.96: centre = (z^2 / 16) / (1 + z^2 / 8), half the same -> [0, 2 * centre]
    z2 = 1.96 ** 2
    centre = (z2 / 16) / (1 + z2 / 8)
    assert wilson(0, 8) == [0.0, round(2 * centre, 4)] == [0.0, 0.3244]


def test_wilson_half_of_ten_is_symmetric_and_by_hand():
    # p = 0.5, n = 10: centre 0.5; half = 1.96 * sqrt(0.025 + 1.96^2 / 400) / (1 + 1.96^2 / 10)
    half = 1.96 * math.sqrt(0.025 + 1.96 ** 2 / 400) / (1 + 1.96 ** 2 / 10)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (round(0.5 - half, 4), round(0.5 + half, 4)) == (0.2366, 0.7634)


def test_wilson_all_successes_and_fractional_scores():
    assert wilson(8, 8) == [0.6756, 1.0]   # the mirror image of 0 of 8
    # 2.5 of 5 (five scores of 0.5): p = 0.5, n = 5, so wider than 5 of 10
    half = 1.96 * math.sqrt(0.05 + 1.96 ** 2 / 100) / (1 + 1.96 ** 2 / 5)
    assert wilson(2.5, 5) == [round(0.5 - half, 4), round(0.5 + half, 4)] == [0.1704, 0.8296]


def test_wilson_bounds_stay_in_0_1_without_a_negative_zero():
    for n in (1, 2, 5, 8, 36):
        lo, hi = wilson(0, n)
        assert str(lo) == "0.0" and 0 < hi < 1   # round(-1e-17, 4) is -0.0: written "-0.0"
        assert str(wilson(n, n)[1]) == "1.0"


def test_wilson_empty_is_none():
    assert wilson(0, 0) is None
