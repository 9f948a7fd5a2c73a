# Run: pytest tests/test_stats.py -q
"""common/stats.py: the Wilson interval against hand-computed values; Newcombe's paired
difference interval against the R package contingencytables and by hand."""
import math

import pytest

from common.stats import newcombe_paired, wilson


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


def pairs(both, only_a, only_b, neither):
    """Paired 0/1 flags of two models on the same questions, from the four cells of the 2x2."""
    cells = [(1, 1)] * both + [(1, 0)] * only_a + [(0, 1)] * only_b + [(0, 0)] * neither
    return [a for a, _ in cells], [b for _, b in cells]


def test_newcombe_paired_matches_contingencytables_cavo_2012():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8 (Cavo et
    # al. 2012, [[59, 6], [16, 80]]); the R package contingencytables' own test of
    # Newcombe_square_and_add_CI_paired_2x2: estimate -0.0621 (95% CI -0.1186 to -0.0046)
    d, (lo, hi) = newcombe_paired(*pairs(59, 6, 16, 80))
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)


def test_newcombe_paired_by_hand_when_psi_is_zero():
    # a = 1, 1, 0, 0 and b = 0, 0, 0, 0: b has no success, so psi = 0 (Newcombe's rule) and the
    # limits are the square-and-add of the two Wilson intervals, unrounded
    z = 1.96

    def wil(k, n):
        p, d = k / n, 1 + z * z / n
        c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        return c - h, c + h
    (l1, u1), (l2, u2) = wil(2, 4), wil(0, 4)
    d, (lo, hi) = newcombe_paired([1, 1, 0, 0], [0, 0, 0, 0])
    assert d == 0.5
    assert lo == pytest.approx(0.5 - math.sqrt((0.5 - l1) ** 2 + u2 ** 2))
    assert hi == pytest.approx(0.5 + math.sqrt(l2 ** 2 + (u1 - 0.5) ** 2))


def test_newcombe_paired_identical_flags_straddle_zero_and_bad_input_is_refused():
    d, (lo, hi) = newcombe_paired(*pairs(5, 0, 0, 5))
    assert d == 0 and lo < 0 < hi and lo == pytest.approx(-hi)
    assert newcombe_paired([], []) is None
    with pytest.raises(ValueError):
        newcombe_paired([1, 0], [1])
    with pytest.raises(ValueError):
        newcombe_paired([0.5, 1], [1, 1])
