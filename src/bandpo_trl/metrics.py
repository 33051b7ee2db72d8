"""Sampling metrics of the BandPO paper's evaluation: mean@k and the unbiased pass@k estimator.

With ``n`` samples per problem of which ``c`` are correct,

- mean@k is the average accuracy over all samples (the paper's mean@32 with ``n = k = 32``);
- pass@k is the probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct,
  ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021). It is unbiased for every ``k <= n``, so ``n = 32`` samples
  also give pass@1 (which equals c / n), pass@8, ...

Pure Python, no torch: importable anywhere.

Example:
    >>> from bandpo_trl.metrics import mean_at_k, pass_at_k, problem_pass_at_k
    >>> pass_at_k(n=5, c=2, k=2)  # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    0.7
    >>> correct = [[True, False, False, False], [False, False, False, False]]
    >>> mean_at_k(correct)  # 1 correct sample out of 8
    0.125
    >>> problem_pass_at_k(correct, k=4)  # first problem solved within 4 samples, second not
    0.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["mean_at_k", "pass_at_k", "problem_pass_at_k"]


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""
    Unbiased pass@k of one problem: ``1 - C(n - c, k) / C(n, k)``.

    The ratio of binomials (equivalently the product ``prod_{i = n - c + 1}^{n} (1 - k / i)`` of Chen et al., 2021)
    is evaluated exactly with Python's arbitrary-precision integers and rounded once at the end: no overflow, no
    cancellation, and pass@1 is exactly ``c / n``.

    Args:
        n (`int`): number of samples drawn for the problem (`n >= 1`).
        c (`int`): number of correct samples (`0 <= c <= n`).
        k (`int`): the k of pass@k (`1 <= k <= n`).

    Returns:
        `float`: the probability that at least one of `k` samples, drawn without replacement from the `n`, is correct.

    Raises:
        ValueError: if `k > n` (the estimator needs at least `k` samples), or if `n`, `c` or `k` is out of range.

    Example:
    >>> pass_at_k(n=5, c=2, k=2)
    0.7
    >>> pass_at_k(n=32, c=0, k=32), pass_at_k(n=32, c=1, k=32), pass_at_k(n=32, c=4, k=1)
    (0.0, 1.0, 0.125)
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in [0, n], got c={c} with n={n}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n (at least k samples per problem), got k={k} > n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    # C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i), evaluated exactly (Python integers do not
    # overflow) and rounded once: no cancellation, and pass@1 is exactly c / n.
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def _rows(correct: Sequence[Sequence[bool]]) -> list[list[bool]]:
    rows = [list(row) for row in correct]
    if not rows:
        raise ValueError("no problems to score")
    if any(len(row) == 0 for row in rows):
        raise ValueError("every problem needs at least one sample")
    return rows


def mean_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """
    mean@k: the average accuracy over all samples of all problems.

    Args:
        correct (`Sequence[Sequence[bool]]`): per problem, the correctness of each of its samples.

    Returns:
        `float`: correct samples / samples. With the same number of samples per problem this is also the mean over
        problems of the per-problem accuracy, i.e. the unbiased pass@1.

    Example:
    >>> mean_at_k([[True, True], [True, False]])
    0.75
    """
    rows = _rows(correct)
    return sum(sum(bool(x) for x in row) for row in rows) / sum(len(row) for row in rows)


def problem_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """
    pass@k of a benchmark: the mean over problems of [`pass_at_k`] with each problem's own `n` and `c`.

    Args:
        correct (`Sequence[Sequence[bool]]`): per problem, the correctness of each of its samples.
        k (`int`): the k of pass@k; every problem needs at least `k` samples.

    Example:
    >>> problem_pass_at_k([[True, False, False], [False, False, False]], k=1)  # (1/3 + 0) / 2
    0.16666666666666666
    """
    rows = _rows(correct)
    return sum(pass_at_k(len(row), sum(bool(x) for x in row), k) for row in rows) / len(rows)
