"""Token-budget planner: how many paths N to launch for a given budget.

With N paths launched for ``prefix_tokens`` each and ``keep`` of them resumed to ``task_tokens``
(the expected length of a full reasoning trace), the expected number of generated tokens is::

    expected(N) = N * prefix_tokens + keep * (task_tokens - prefix_tokens)

``plan`` returns the largest N whose expected tokens fit ``budget_tokens``. It is an estimate for
capacity planning: paths that finish inside the prefix generate fewer tokens, and early stop fewer
still, so the real count is at most this (for paths no longer than ``task_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stopkit._checks import check_int, check_real

__all__ = ["Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    """A launch plan: ``n`` paths, ``keep`` resumed, ``expected_tokens`` generated in expectation."""

    n: int
    keep: int
    expected_tokens: int


def _expected(n: int, keep: int, prefix: int, task: int) -> int:
    return n * prefix + keep * (task - prefix)


def plan(
    budget_tokens: int,
    prefix_tokens: int,
    task_tokens: int,
    *,
    keep: int | None = None,
    ratio: float | None = None,
) -> Plan:
    """The largest N with ``N * prefix_tokens + keep * (task_tokens - prefix_tokens) <= budget_tokens``.

    Give exactly one of ``keep`` (a fixed number of resumed paths, N >= keep) or ``ratio`` (keep =
    ceil(ratio * N), 0 < ratio <= 1). With a fixed keep the answer is closed-form::

        N = floor((budget - keep * (task - prefix)) / prefix)

    and with a ratio, expected(N) is non-decreasing in N, so N is found by bisection.

    ``ceil`` is taken after rounding ratio * N to 9 decimals, so 0.1 * 30 gives keep 3, not 4.

    Example: 2048-token prefixes, 8192-token traces, keep 8. The 8 resumed paths cost
    8 * (8192 - 2048) = 49152 tokens, so a 100k budget leaves (100000 - 49152) // 2048 = 24 paths::

        >>> plan(100_000, 2048, 8192, keep=8)
        Plan(n=24, keep=8, expected_tokens=98304)

    while a 60k budget raises (it pays for only 5 launched paths, fewer than the 8 kept).

    Raises ValueError when prefix_tokens > task_tokens, when both or neither of keep and ratio are
    given, or when the budget cannot pay for even the smallest plan (N = keep, or N = 1 for ratio).
    """
    budget = check_int("budget_tokens", budget_tokens, 1)
    prefix = check_int("prefix_tokens", prefix_tokens, 1)
    task = check_int("task_tokens", task_tokens, 1)
    if prefix > task:
        raise ValueError(f"prefix_tokens ({prefix}) must be <= task_tokens ({task})")
    if (keep is None) == (ratio is None):
        raise ValueError(
            "give exactly one of keep (paths resumed) or ratio (fraction resumed), "
            f"got keep={keep!r}, ratio={ratio!r}"
        )
    if keep is not None:
        keep = check_int("keep", keep, 1)
        n = (budget - keep * (task - prefix)) // prefix
        if n < keep:
            raise ValueError(
                f"budget_tokens={budget} is too small: even n=keep={keep} paths need "
                f"{_expected(keep, keep, prefix, task)} tokens"
            )
        return Plan(n=n, keep=keep, expected_tokens=_expected(n, keep, prefix, task))

    ratio = check_real("ratio", ratio, 0, 1, low_open=True)

    def keep_of(n: int) -> int:
        return max(1, math.ceil(round(ratio * n, 9)))

    def cost(n: int) -> int:
        return _expected(n, keep_of(n), prefix, task)

    if cost(1) > budget:
        raise ValueError(
            f"budget_tokens={budget} is too small: even n=1 path needs {cost(1)} tokens"
        )
    lo, hi = 1, budget // prefix + 1  # cost(n) >= n * prefix, so n <= budget // prefix
    while hi - lo > 1:  # invariant: cost(lo) <= budget < cost(hi)
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return Plan(n=lo, keep=keep_of(lo), expected_tokens=cost(lo))
