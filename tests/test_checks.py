"""stopkit._checks: what each check accepts and returns, and its one wording (TypeError for a
wrong type, ValueError for a wrong value, always naming the argument and what was expected)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stopkit._checks import (
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_ints,
    check_real,
    check_tensor,
    check_token_ids,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda: check_int("n", 3, 1), 3),
        (lambda: check_int("n", np.int64(7), 0, 7), 7),
        (lambda: check_int("n", torch.tensor(5)), 5),
        (lambda: check_int("n", -(1 << 70)), -(1 << 70)),
        (lambda: check_real("top_p", 1, 0, 1, low_open=True), 1.0),
        (lambda: check_real("t", np.float32(0.5), 0), 0.5),
        (lambda: check_real("t", math.inf, 0, math.inf), math.inf),
        (lambda: check_real("x", -math.inf, -math.inf, math.inf), -math.inf),
        (lambda: check_bool("f", np.True_), True),
        (lambda: check_choice("vote", "entropy", ("majority", "entropy")), "entropy"),
        (lambda: check_ints("rows", (0, 2), 0, 2), [0, 2]),
        (lambda: check_ints("rows", torch.tensor([1, 3], dtype=torch.int32), 0, 3), [1, 3]),
        (lambda: check_token_ids("p", torch.tensor([0, 127]), 128), [0, 127]),
        (lambda: check_dtype("dtype", torch.bfloat16, FLOATS), torch.bfloat16),
    ],
)
def test_accepts(call, expected):
    got = call()
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: check_int("n", 0, 1), ValueError, "n must be an int >= 1, got 0"),
        (lambda: check_int("n", 5, None, 4), ValueError, "n must be an int <= 4, got 5"),
        (
            lambda: check_int("token_id", 100, 0, 99),
            ValueError,
            "token_id must be an int in [0, 99], got 100",
        ),
        (lambda: check_int("n", 2.0), TypeError, "n must be an int, got float"),
        (lambda: check_int("n", True), TypeError, "n must be an int, got bool"),
        (
            lambda: check_int("n", torch.tensor(True)),
            TypeError,
            "n must be an int, got a bool tensor",
        ),
        (lambda: check_int("n", "3"), TypeError, "n must be an int, got str"),
        (
            lambda: check_real("top_p", 0, 0, 1, low_open=True),
            ValueError,
            "top_p must be a real number in (0, 1], got 0.0",
        ),
        (
            lambda: check_real("r", 1, 0, 1, high_open=True),
            ValueError,
            "r must be a real number in [0, 1), got 1.0",
        ),
        (
            lambda: check_real("p", math.nan, 0, 1),
            ValueError,
            "p must be a real number in [0, 1], got nan",
        ),
        (
            lambda: check_real("lr", 0.0, 0, low_open=True),
            ValueError,
            "lr must be a finite real number > 0, got 0.0",
        ),
        (
            lambda: check_real("t", math.inf, 0),
            ValueError,
            "t must be a finite real number >= 0, got inf",
        ),
        (lambda: check_real("x", math.nan), ValueError, "x must be a finite real number, got nan"),
        (
            lambda: check_real("x", -1, None, -2),
            ValueError,
            "x must be a finite real number <= -2, got -1.0",
        ),
        (lambda: check_real("lr", "1e-4"), TypeError, "lr must be a real number, got str"),
        (lambda: check_real("lr", False), TypeError, "lr must be a real number, got bool"),
        (lambda: check_bool("flag", 1), TypeError, "flag must be a bool, got int"),
        (
            lambda: check_choice("vote", "nope", ("majority", "score")),
            ValueError,
            "vote must be one of majority, score, got 'nope'",
        ),
        (
            lambda: check_choice("vote", ["x"], {"majority"}),
            ValueError,
            "vote must be one of majority, got ['x']",
        ),
        (lambda: check_ints("rows", [0, 1.5]), TypeError, "rows[1] must be an int, got float"),
        (
            lambda: check_ints("rows", [0, 4, 9], 0, 3),
            ValueError,
            "rows[1] must be an int in [0, 3], got 4",
        ),
        (
            lambda: check_ints("rows", torch.tensor([0, 4, 9]), 0, 3),
            ValueError,
            "rows[1] must be an int in [0, 3], got 4",
        ),
        (
            lambda: check_ints("rows", torch.zeros(2, 2, dtype=torch.int64)),
            ValueError,
            "rows must be 1-D, got shape (2, 2)",
        ),
        (
            lambda: check_ints("rows", torch.zeros(2)),
            TypeError,
            "rows must hold ints, got a float32 tensor",
        ),
        (
            lambda: check_ints("rows", "01"),
            TypeError,
            "rows must be a sequence of ints or a 1-D integer tensor, got str",
        ),
        (
            lambda: check_ints("rows", 3),
            TypeError,
            "rows must be a sequence of ints or a 1-D integer tensor, got int",
        ),
        (
            lambda: check_token_ids("prompts[1]", [5, 128], 128),
            ValueError,
            "prompts[1][1] must be a token id in [0, 128), got 128",
        ),
        (
            lambda: check_token_ids("p", [-1]),
            ValueError,
            "p[0] must be a token id in [0, vocab_size), got -1",
        ),
        (
            lambda: check_token_ids("p", []),
            ValueError,
            "p must be a non-empty list of token ids, got []",
        ),
        (
            lambda: check_token_ids("p", "hello"),
            TypeError,
            "p must be a list of token ids, got str",
        ),
        (lambda: check_token_ids("p", {1, 2}), TypeError, "p must be a list of token ids, got set"),
        (
            lambda: check_dtype("dtype", torch.int32, FLOATS),
            TypeError,
            "dtype must be float32, float16 or bfloat16, got torch.int32",
        ),
    ],
)
def test_rejects_with_one_wording(call, error, message):
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == message


def test_check_tensor():
    q = torch.zeros(2, 1, 4, 64, dtype=torch.bfloat16)
    assert check_tensor("q", q, dtype=FLOATS, ndim=4, shape=(2, None, 4, 64), device="cpu") is q
    cases = [
        (lambda: check_tensor("q", q.tolist()), TypeError, "q must be a torch.Tensor, got list"),
        (
            lambda: check_tensor("q", q, dtype=torch.float32),
            TypeError,
            "q must have dtype float32, got bfloat16",
        ),
        (
            lambda: check_tensor("q", q, dtype=(torch.float32, torch.float16)),
            TypeError,
            "q must have dtype float32 or float16, got bfloat16",
        ),
        (
            lambda: check_tensor("q", q, ndim=3),
            ValueError,
            "q must be 3-D, got shape (2, 1, 4, 64)",
        ),
        (
            lambda: check_tensor("q", q, shape=(2, None, 8, 64)),
            ValueError,
            "q must have shape (2, *, 8, 64), got (2, 1, 4, 64)",
        ),
        (
            lambda: check_tensor("q", q, shape=(2, None, 4)),
            ValueError,
            "q must have shape (2, *, 4), got (2, 1, 4, 64)",
        ),
        (
            lambda: check_tensor("s", torch.zeros(5), shape=(4,)),
            ValueError,
            "s must have shape (4,), got (5,)",
        ),
        (lambda: check_tensor("q", q, device="cuda"), ValueError, "q must be on cuda, got cpu"),
        (lambda: check_tensor("q", q, device="meta"), ValueError, "q must be on meta, got cpu"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as e:
            call()
        assert str(e.value) == message
