"""stopkit.plan: the largest N whose expected tokens fit the budget."""

from __future__ import annotations

import math

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from stopkit.planner import Plan, plan


def _cost(n: int, keep: int, prefix: int, task: int) -> int:
    return n * prefix + keep * (task - prefix)


def test_docstring_example():
    assert plan(100_000, 2048, 8192, keep=8) == Plan(n=24, keep=8, expected_tokens=98_304)
    with pytest.raises(ValueError, match="too small"):
        plan(60_000, 2048, 8192, keep=8)


def test_exact_fit_and_prefix_equal_task():
    # budget exactly n*prefix + keep*(task-prefix) is allowed (<=)
    assert plan(_cost(10, 3, 100, 400), 100, 400, keep=3).n == 10
    assert plan(_cost(10, 3, 100, 400) - 1, 100, 400, keep=3).n == 9
    # prefix == task: resuming costs nothing, N = budget // prefix
    assert plan(1000, 100, 100, keep=4) == Plan(n=10, keep=4, expected_tokens=1000)


def test_ratio_rounding():
    # 0.1 * 30 is 3.0000000000000004 in floating point; keep must still be 3
    p = plan(_cost(30, 3, 10, 20), 10, 20, ratio=0.1)
    assert p.n == 30 and p.keep == 3
    assert plan(1, 1, 1, ratio=1.0) == Plan(n=1, keep=1, expected_tokens=1)


@settings(max_examples=examples(300), deadline=None)
@given(
    budget=st.integers(1, 10**6),
    prefix=st.integers(1, 5000),
    extra=st.integers(0, 20000),
    keep=st.integers(1, 64),
)
def test_fixed_keep_n_is_maximal(budget, prefix, extra, keep):
    task = prefix + extra
    if _cost(keep, keep, prefix, task) > budget:
        with pytest.raises(ValueError, match="too small"):
            plan(budget, prefix, task, keep=keep)
        return
    p = plan(budget, prefix, task, keep=keep)
    assert p.keep == keep and p.n >= keep
    assert p.expected_tokens == _cost(p.n, keep, prefix, task) <= budget
    assert _cost(p.n + 1, keep, prefix, task) > budget


@settings(max_examples=examples(300), deadline=None)
@given(
    budget=st.integers(1, 10**6),
    prefix=st.integers(1, 5000),
    extra=st.integers(0, 20000),
    ratio=st.sampled_from([0.05, 0.1, 0.125, 0.25, 1 / 3, 0.5, 0.7, 1.0]),
)
def test_ratio_n_is_maximal(budget, prefix, extra, ratio):
    task = prefix + extra

    def keep_of(n):
        return max(1, math.ceil(round(ratio * n, 9)))

    if _cost(1, 1, prefix, task) > budget:
        with pytest.raises(ValueError, match="too small"):
            plan(budget, prefix, task, ratio=ratio)
        return
    p = plan(budget, prefix, task, ratio=ratio)
    assert p.keep == keep_of(p.n) <= p.n
    assert p.expected_tokens == _cost(p.n, p.keep, prefix, task) <= budget
    # no larger n fits (cost is non-decreasing in n, so checking a window past n suffices)
    for m in range(p.n + 1, p.n + 50):
        assert _cost(m, keep_of(m), prefix, task) > budget


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((1000, 200, 100), {"keep": 2}, ValueError, "prefix_tokens"),
        ((1000, 10, 100), {}, ValueError, "exactly one"),
        ((1000, 10, 100), {"keep": 2, "ratio": 0.5}, ValueError, "exactly one"),
        ((1000, 10, 100), {"keep": 0}, ValueError, "keep"),
        ((1000, 10, 100), {"ratio": 0.0}, ValueError, "ratio"),
        ((1000, 10, 100), {"ratio": 1.5}, ValueError, "ratio"),
        ((1000, 10, 100), {"ratio": "half"}, TypeError, "ratio"),
        ((0, 10, 100), {"keep": 1}, ValueError, "budget_tokens"),
        ((1000, 0, 100), {"keep": 1}, ValueError, "prefix_tokens"),
        ((1000, 10, 100.0), {"keep": 1}, TypeError, "task_tokens"),
        ((1000, 10, 100), {"keep": True}, TypeError, "keep"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        plan(*args, **kwargs)
