"""The estimators of benchmark evaluation (`bandpo_trl.metrics`): pass@k, mean@k and their benchmark averages, against
hand-computed values and the binomial formula."""

from __future__ import annotations

import math

import pytest

from bandpo_trl.metrics import mean_at_k, pass_at_k, problem_pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
        (3, 1, 2, 2 / 3),  # 1 - C(2, 2) / C(3, 2) = 1 - 1/3
        (6, 2, 3, 0.8),  # 1 - C(4, 3) / C(6, 3) = 1 - 4/20
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (32, 4, 1, 0.125),
        (32, 1, 32, 1.0),  # one correct sample is enough for pass@n
        (32, 1, 16, 0.5),  # 1 - C(31, 16) / C(32, 16) = 1 - 16/32
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_edge_cases():
    for n in (1, 2, 7, 32):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # c = 0
            assert pass_at_k(n, n, k) == 1.0  # c = n
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0  # k = n: solved iff any sample is correct
    assert pass_at_k(10, 3, 1) == 0.3  # pass@1 exactly c / n, no rounding drift
    with pytest.raises(ValueError, match=r"k=5 > n=4"):
        pass_at_k(4, 1, 5)  # k > n
    with pytest.raises(ValueError, match="k=33 > n=32"):
        pass_at_k(32, 0, 33)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    for bad in [(4.0, 1, 1), (4, 1, True)]:
        with pytest.raises(TypeError):
            pass_at_k(*bad)


def test_pass_at_k_equals_binomial_formula_and_is_monotone():
    for n in range(1, 13):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            for k, value in zip(range(1, n + 1), values):
                assert value == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-14)
            assert values == sorted(values)  # more tries never hurt
            if c < n:
                assert pass_at_k(n, c, 1) <= pass_at_k(n, c + 1, 1)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1000, 1, 1) == 0.001
    # log-space reference: C(n - c, k) / C(n, k) = exp(lgamma terms)
    n, c, k = 10_000, 30, 500
    log_ratio = (
        math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    )  # C(n-c, k) / C(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.exp(log_ratio), rel=1e-9)
    assert 0 < pass_at_k(n, 1, 1) < pass_at_k(n, 1, 2) < 1


def test_mean_at_k_and_benchmark_pass_at_k():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert mean_at_k(correct) == pytest.approx(5 / 12)
    assert problem_pass_at_k(correct, 1) == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert problem_pass_at_k(correct, 1) == pytest.approx(mean_at_k(correct))  # pass@1 = mean@k for equal n
    assert problem_pass_at_k(correct, 2) == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert problem_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k=5 > n=4"):
        problem_pass_at_k(correct, 5)
    with pytest.raises(ValueError):
        mean_at_k([])
    with pytest.raises(ValueError):
        mean_at_k([[True], []])
