"""Argument checks shared by the Python layers (they raise before anything changes)."""

from __future__ import annotations

import numbers


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int; TypeError unless it is an integer (bool is not), ValueError naming the
    bound unless ``low <= value <= high`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"in {low}..{high}" if low is not None and high is not None
                 else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)
