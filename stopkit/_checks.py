"""Argument checks shared by every Python layer: they raise before anything changes.

One wording, ``<name> must be <what is expected>, got <what was given>``: TypeError when the value
has the wrong type, ValueError when it has the right type and a wrong value. Each check returns
the value in its plain form (an int, a float, a list of ints...), so callers write
``n = check_int("n", n, 1)``. ``name`` is how the caller's user knows the argument: a parameter
name (``"top_p"``), an element (``"prompts[2]"``) or a command-line flag (``"--top-p"``).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "check_int",
    "check_real",
    "check_bool",
    "check_choice",
    "check_ints",
    "check_token_ids",
    "check_dtype",
    "check_tensor",
]


def _bounds(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """ " >= 1", " in (0, 1]", ...: the range part of a message ("" when unbounded)."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _type_name(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor"
    return type(value).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, within ``[low, high]`` (either bound optional).

    Accepts anything with ``__index__`` (Python and NumPy ints, a one-element integer tensor)
    except bools. TypeError otherwise; ValueError when out of range: ``"n must be an int >= 1,
    got 0"``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_type_name(value)}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_bounds(low, high)}, got {value}")
    return value


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float within the interval from ``low`` to ``high`` (closed unless
    ``low_open`` / ``high_open``; a missing bound is an open infinity, so infinities pass only a
    closed infinite bound, e.g. ``high=math.inf``). NaN never passes.

    TypeError unless a real number (bool is not); ValueError when outside: ``"top_p must be a
    real number in (0, 1], got 2.0"``, ``"lr must be a finite real number > 0, got 0.0"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    value = float(value)
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    above = value > lo if (low_open or low is None) else value >= lo
    below = value < hi if (high_open or high is None) else value <= hi
    if not (above and below):  # NaN fails both
        kind = "real number" if low is not None and high is not None else "finite real number"
        raise ValueError(
            f"{name} must be a {kind}{_bounds(low, high, low_open, high_open)}, got {value}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` itself when it is a bool (NumPy's included); TypeError otherwise (0 and 1 are
    not bools: a flag given a number is a mistake)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return bool(value)


_Choice = TypeVar("_Choice")


def check_choice(name: str, value: Any, choices: Collection[_Choice]) -> _Choice:
    """``value`` when it is one of ``choices``; ValueError otherwise: ``"vote must be one of
    majority, score, entropy, got 'nope'"``."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value and a set of choices
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_ints(
    name: str, values: Any, low: int | None = None, high: int | None = None
) -> list[int]:
    """A list of ints from a sequence of ints or a 1-D integer tensor, each within ``[low, high]``.

    TypeError for a str, a non-iterable, a non-integer tensor or element (``"rows[2] must be an
    int, got float"``); ValueError for a tensor that is not 1-D or an element out of range
    (``"rows[2] must be an int in [0, 3], got 5"``)."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold ints, got {_type_name(values)}")
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        out = values.tolist()
        bad = [
            i
            for i, v in enumerate(out)
            if (low is not None and v < low) or (high is not None and v > high)
        ]
        if bad:
            check_int(f"{name}[{bad[0]}]", out[bad[0]], low, high)
        return out
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a sequence of ints or a 1-D integer tensor, got {_type_name(values)}"
        )
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(values)]


def check_token_ids(name: str, ids: Any, vocab_size: int | None = None) -> list[int]:
    """A non-empty list of token ids (ints, or a 1-D integer tensor) in ``[0, vocab_size)``.

    TypeError for a str or a non-int element; ValueError for an empty list or an id out of range:
    ``"prompts[1][4] must be a token id in [0, 128), got 130"``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a list of token ids, got {_type_name(ids)}")
    ids = check_ints(name, ids)
    if not ids:
        raise ValueError(f"{name} must be a non-empty list of token ids, got []")
    hi = math.inf if vocab_size is None else vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < hi:
            where = "[0, vocab_size)" if vocab_size is None else f"[0, {vocab_size})"
            raise ValueError(f"{name}[{i}] must be a token id in {where}, got {t}")
    return ids


def check_dtype(name: str, dtype: Any, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """``dtype`` when it is one of ``allowed``; TypeError otherwise: ``"dtype must be float32,
    float16 or bfloat16, got torch.int32"``."""
    if dtype not in allowed:
        raise TypeError(f"{name} must be {_alternatives(allowed)}, got {dtype!r}")
    return dtype


def _alternatives(dtypes: Sequence[torch.dtype]) -> str:
    names = [_dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_tensor(
    name: str,
    t: Any,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """``t`` when it is a tensor of one of the ``dtype`` s, with ``ndim`` dimensions, of ``shape``
    (None: any size in that dimension) and on ``device`` (``"cuda"`` without an index: any GPU);
    each requirement optional.

    TypeError when not a tensor or of another dtype (``"q must have dtype float32, float16 or
    bfloat16, got int32"``); ValueError for the dimensions, shape or device (``"seq_lens must have
    shape (4,), got (5,)"``, ``"k_cache must be on cuda:0, got cpu"``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(t)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise TypeError(
                f"{name} must have dtype {_alternatives(allowed)}, got {_dtype_name(t.dtype)}"
            )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and (
        t.dim() != len(shape)
        or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True))
    ):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(
            f"{name} must have shape ({want}{',' if len(shape) == 1 else ''}), got {tuple(t.shape)}"
        )
    if device is not None:
        device = torch.device(device)
        if t.device.type != device.type or device.index not in (None, t.device.index):
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t
