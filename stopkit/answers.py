"""Final-answer extraction and comparison, shared by Monte-Carlo labelling and the votes.

``extract_answer`` finds what a reasoning trace answered: the content of the LAST balanced
``\\boxed{...}`` (or ``\\fbox{...}``), else the last final-answer line (``answer: X``,
``final answer is X``, ``the answer is X``; markdown bold tolerated). ``normalize_answer`` maps an
answer to a canonical string so equal answers compare and vote together: numbers lose thousands
commas, a leading ``+`` and trailing zeros; integers, decimals and fractions (``a/b``,
``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``) become one exact ``fractions.Fraction`` string (``0.5``,
``1/2`` and ``\\frac{2}{4}`` are all ``"1/2"``); anything else loses spaces, ``$``, ``\\left`` /
``\\right``, ``\\text{}`` wrappers and a trailing period. A checker is any
``callable(text, answer) -> bool``; :func:`check_answer` is the default, :func:`load_checker`
imports another from ``"module:function"``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

__all__ = ["Checker", "extract_answer", "normalize_answer", "answers_equal", "check_answer",
           "load_checker"]

Checker = Callable[[str, str], bool]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LINE_RE = re.compile(
    r"(?:final\s+answer|answer)\s*\**\s*(?:is\s*:?|:)\s*\**\s*([^\n]+)", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))/([+-]?(?:\d+\.?\d*|\.\d+))")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_ASSIGN_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "^\\circ", "^{\\circ}",
         "\\%", "%")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces balance (a truncated one is skipped)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """The raw final answer of ``text`` (last balanced box, else last final-answer line), stripped;
    None when there is none."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = _LINE_RE.findall(text)
    if not lines:
        return None
    answer = lines[-1].strip().strip("*").strip()
    answer = answer.rstrip(".").strip()
    return answer or None


def _as_fraction(s: str) -> Fraction | None:
    """An exact number for an integer, decimal, ``a/b`` or ``\\frac{a}{b}`` string, else None."""
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    m = _SLASH_RE.fullmatch(s)
    if m is None:
        m = _FRAC_RE.fullmatch(s)
        if m is None:
            return None
        sign, num, den = m.groups()
        num_f, den_f = _as_fraction(num.strip()), _as_fraction(den.strip())
        if num_f is None or den_f is None or den_f == 0:
            return None
        value = num_f / den_f
        return -value if sign == "-" else value
    num_f, den_f = Fraction(m.group(1)), Fraction(m.group(2))
    return None if den_f == 0 else num_f / den_f


def normalize_answer(answer: str) -> str:
    """Canonical string of an answer: an exact Fraction string for numbers (``"3"``, ``"-1/2"``),
    else the answer without spaces, ``$``, ``\\left``/``\\right``, ``\\text{}`` wrappers, a
    ``x =`` assignment or a trailing period."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    s = answer.strip()
    for token in _DROP:
        s = s.replace(token, "")
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{...}}
        prev, s = s, _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _ASSIGN_RE.sub("", s.strip()).strip().rstrip(".").strip()
    if re.fullmatch(r"\(([A-Za-z])\)", s):  # multiple choice "(B)" -> "B"
        s = s[1]
    value = _as_fraction(s.replace(" ", ""))
    if value is not None:
        return str(value)
    return re.sub(r"\s+", "", s)


def answers_equal(predicted: str | None, reference: str) -> bool:
    """True when both normalise to the same canonical string (a missing prediction never matches)."""
    if predicted is None:
        return False
    return normalize_answer(predicted) == normalize_answer(reference)


def check_answer(text: str, answer: str) -> bool:
    """The default checker: extract the final answer of ``text`` and compare it with ``answer``."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    return answers_equal(extract_answer(text), answer)


def load_checker(spec: str | None) -> Checker:
    """A checker from ``"package.module:function"`` (a ``callable(text, answer) -> bool``);
    None gives :func:`check_answer`."""
    if spec is None:
        return check_answer
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"checker must look like 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import checker {spec!r}: {e}") from e
    if not callable(fn):
        raise TypeError(f"checker {spec!r} is not callable")
    return fn
