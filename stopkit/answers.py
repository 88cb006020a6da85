"""Final-answer extraction, vote keys and grading, shared by Monte-Carlo labelling, votes and eval.

``extract_answer`` finds what a reasoning trace answered, anchored (a trace that never states an
answer has none, so an unfinished path does not vote for its last number): the content of the LAST
balanced ``\\boxed{...}`` / ``\\fbox{...}``; else the last of GSM8K's ``#### N`` and final-answer
phrases (``answer: X``, ``the final answer is X``, ``the answer is X``, ``the correct option is
C``; markdown bold tolerated), cut to the answer itself (a ``$...$`` span, a leading number, a
multiple-choice letter, else the sentence).

``normalize_answer`` is the vote key: equal answers must vote together, so it maps an answer to a
canonical string. Exact numbers (integers, decimals, ``a/b``, ``\\frac``, thousands separators)
become one ``fractions.Fraction`` string (``0.5``, ``1/2`` and ``\\frac{2}{4}`` all key as ``1/2``;
a percentage keys as its number: ``50\\%`` as ``50``); multiple-choice letters (capitals A-J:
``(B)``, ``\\text{B}``, ``B) 42``) become the letter; plain words are lower-cased; anything else
is parsed by math-verify (LaTeX through latex2sympy into sympy) and printed canonically: finite
sets and unordered lists as their sorted element keys, intervals and inequalities in one variable
as intervals, ``x = v`` as ``v``, numbers and expressions simplified (and expanded), so
``(x+1)^2`` and ``x^2+2x+1`` or ``\\sqrt{8}`` and ``2\\sqrt{2}`` share a key. Algebraic equality
is undecidable in general, so keys are best effort; grading is not.

``check_answer`` grades: the extracted answer against the gold one, equal when their keys are equal
or when math-verify's ``verify`` (symbolic and numeric equality, sets, intervals, relations) says
so; a gold multiple-choice letter is compared as a letter. A checker is any
``callable(text, answer) -> bool``; :func:`load_checker` imports another from ``"module:function"``.

Time limit: sympy can run for hours (``9^{9^{9^9}}``) and math-verify's own timeout uses SIGALRM,
which only works on the main thread; the server and Ray workers check from other threads, and some
of those computations hold the GIL in C, where no thread can interrupt them. So every math-verify
call runs in a separate checker process (one per concurrently checking thread, started on first
use, importing only math-verify; this file is its program), and a call that exceeds ``timeout``
seconds kills it: the answer counts as wrong (grading) or keys as its cleaned text (votes), and the
next call starts a fresh process. Results are cached per (answer, gold) and per answer.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

__all__ = [
    "Checker",
    "TIME_LIMIT",
    "extract_answer",
    "normalize_answer",
    "answers_equal",
    "check_answer",
    "load_checker",
]

log = logging.getLogger(__name__)

Checker = Callable[[str, str], bool]

TIME_LIMIT = 5.0  # seconds per math-verify call, as math-verify's own default

# ---- extraction ----------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANCHOR_RE = re.compile(
    r"####\s*|(?:final\s+answer|answer|correct\s+(?:option|choice))\s*\**\s*(?:is\s*:?|:)\s*\**\s*",
    re.IGNORECASE,
)
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
# a number that ends where the answer does: "72 dollars", "$18.", "3.5", "1,000" but not the "2" of
# "2\\sqrt{3}" or "2x" nor the "3" of the list "3, 4, 5"
_LEADING_NUMBER_RE = re.compile(
    r"[-+]?\\?\$?\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
    r"(?:\s*(?:\\?%|percent\b))?(?=\s|$|[.;:!?)$\"']|,(?!\s*[-+]?\d))"
)
_LEADING_CHOICE_RE = re.compile(r"\(?([A-J])\)?(?=[\s.,:;)]|$)")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\s+(?:because|since|so|which)\s", re.IGNORECASE)
_EQUALS_RE = re.compile(r"(?<![<>!=:\\])=(?!=)")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces balance and that is not empty (a
    truncated box, or the empty ``\\boxed{}`` of a model quoting its instruction, is skipped)."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    if text[start:i].strip():
                        return text[start:i]
                    break
    return None


def _cut_stated_answer(rest: str) -> str:
    """The answer at the start of ``rest`` (the text after an answer anchor, up to the line end):
    of "2 * 4 = 8 bolts." the part after the last equals sign, then a leading number, a math span,
    a choice letter, else the sentence."""
    end = _SENTENCE_END_RE.search(rest)
    rest = _EQUALS_RE.split(rest[: end.start()] if end else rest)[-1]
    rest = rest.strip().strip("*").strip()
    number = _LEADING_NUMBER_RE.match(rest)
    if number and re.search(r"\d", number.group()):
        return number.group().replace("\\$", "").replace("$", "").strip()
    span = _MATH_SPAN_RE.match(rest)
    if span:
        return next(g for g in span.groups() if g is not None).strip()
    choice = _LEADING_CHOICE_RE.match(rest)
    if choice:
        return choice.group(1)
    return rest.strip("*$\"' ").rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (module docstring: last balanced box, else the last
    ``#### N`` or final-answer phrase), stripped; None when there is none."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for match in reversed(list(_ANCHOR_RE.finditer(text))):
        line_end = text.find("\n", match.end())
        answer = _cut_stated_answer(text[match.end() : None if line_end < 0 else line_end])
        if answer:
            return answer
    return None


# ---- cheap canonical forms (this process) --------------------------------------------------------
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))/([+-]?(?:\d+\.?\d*|\.\d+))")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_RE = re.compile(
    r"(\d)\s*(?:\\(?:text|mbox)\s*\{\s*[A-Za-z]|\\mathrm\s*\{\s*[A-Za-z]{2})"
    r"[A-Za-z\s.]*\}(?!\s*\^)"
)
_ASSIGN_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=\s])")
_CHOICE_RE = re.compile(r"\(([A-J])\)(?:\s.*)?|([A-J])(?:[).:]\s?.*)?", re.DOTALL)
_WORDS_RE = re.compile(r"[A-Za-z]{2,}(?:[\s-]+[A-Za-z]+)*")
_PERCENT_RE = re.compile(r"\s*(?:\\%|%|\\text\{\s*percent\s*\}|percent)$")
_DROP = (
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "\\$",
    "$",
    "^\\circ",
    "^{\\circ}",
    "\\displaystyle",
)


def _clean(answer: str, *, keep_percent: bool) -> str:
    """``answer`` without math delimiters, spacing macros, units after a number, ``\\text{}``
    wrappers, a leading ``x =`` or a trailing period (and without a trailing percent sign unless
    ``keep_percent``)."""
    s = answer.strip()
    for token in _DROP:
        s = s.replace(token, "")
    s = _UNIT_RE.sub(r"\1", s)
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{...}}
        prev, s = s, _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _ASSIGN_RE.sub("", s.strip()).strip().rstrip(".").strip()
    if not keep_percent:
        s = _PERCENT_RE.sub("", s).strip()
    return s


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


def _choice(s: str) -> str | None:
    """The letter of a multiple-choice answer (``B``, ``(B)``, ``B) 42``, ``(B) 42``), else None."""
    m = _CHOICE_RE.fullmatch(s)
    return None if m is None else (m.group(1) or m.group(2))


def _str_arg(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def normalize_answer(answer: str, *, timeout: float = TIME_LIMIT) -> str:
    """The vote key of an answer (module docstring): a Fraction string for exact numbers
    (``"3"``, ``"-1/2"``), the letter of a multiple choice, lower-cased words, else math-verify's
    parse printed canonically (within ``timeout`` seconds), else the cleaned answer without spaces."""
    return _key(_str_arg("answer", answer), float(timeout))


def _cheap_key(s: str) -> str | None:
    """The key of a cleaned answer that needs no parsing: a letter, an exact number, words."""
    letter = _choice(s)
    if letter is not None:
        return letter
    value = _as_fraction(s.replace(" ", ""))
    if value is not None:
        return str(value)
    if _WORDS_RE.fullmatch(s):
        return " ".join(s.lower().split())
    return None


@functools.lru_cache(maxsize=8192)
def _key(answer: str, timeout: float) -> str:
    s = _clean(answer, keep_percent=False)
    key = _cheap_key(s)
    if key is None and s:
        key = _ask("key", s, "", timeout)
    return key if isinstance(key, str) else re.sub(r"\s+", "", s)


def answers_equal(predicted: str | None, reference: str, *, timeout: float = TIME_LIMIT) -> bool:
    """True when ``predicted`` is ``reference``'s answer: equal vote keys, or math-verify's verify
    (within ``timeout`` seconds; past it, False); a reference multiple-choice letter must be matched
    as a letter. A missing prediction never matches."""
    _str_arg("reference", reference)
    if predicted is None:
        return False
    return _equal(_str_arg("predicted", predicted), reference, float(timeout))


@functools.lru_cache(maxsize=8192)
def _equal(predicted: str, reference: str, timeout: float) -> bool:
    gold, pred = _clean(reference, keep_percent=False), _clean(predicted, keep_percent=False)
    gold_key = _cheap_key(gold)
    if gold_key is not None and _cheap_key(pred) == gold_key:
        return True
    if _choice(gold) is not None:
        return False  # a letter is right only as that letter
    # one checker call, one time limit: parse both, compare keys, else verify
    gold, pred = _clean(reference, keep_percent=True), _clean(predicted, keep_percent=True)
    return bool(gold and pred) and _ask("equal", gold, pred, timeout) is True


def check_answer(text: str, answer: str, *, timeout: float = TIME_LIMIT) -> bool:
    """The default checker: does ``text`` (a model's output) state the gold ``answer``?
    :func:`extract_answer` then :func:`answers_equal`."""
    return answers_equal(extract_answer(text), _str_arg("answer", answer), timeout=timeout)


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


# ---- checker processes ---------------------------------------------------------------------------
_STARTUP_LIMIT = (
    120.0  # seconds for a checker process to import math-verify (a cold disk, a busy CI)
)
_MEMORY_LIMIT = (
    4 << 30
)  # address space of a checker process: a runaway expansion fails, not the host
# Run this file as a plain script: ``python -m stopkit.answers`` would import the stopkit package
# (and torch) into every checker process.
_LAUNCH = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__stopkit_checker__')"


class _CheckerTimeout(Exception):
    pass


class _CheckerProcess:
    """One checker process: a JSON request per line on its stdin, a JSON reply per line on stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", _LAUNCH, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.buffer = b""
        try:
            ready = self._read(time.monotonic() + _STARTUP_LIMIT)
        except _CheckerTimeout:
            ready = f"no reply in {_STARTUP_LIMIT:.0f}s"
        except BaseException:
            self.kill()
            raise
        if ready != "ready":
            self.kill()
            raise RuntimeError(
                f"the answer checker process could not start: {ready} "
                "(stopkit.answers needs math-verify: pip install math-verify)"
            )

    def call(self, request: list, timeout: float) -> Any:
        """The reply to ``request`` (``[op, a, b, cpu seconds]``) within ``timeout`` seconds."""
        assert self.proc.stdin is not None  # opened with stdin=PIPE
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read(time.monotonic() + timeout)

    def _read(self, deadline: float) -> Any:
        assert self.proc.stdout is not None  # opened with stdout=PIPE
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _CheckerTimeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the answer checker process exited (code {self.proc.wait()})")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


_idle: list[_CheckerProcess] = []
_idle_lock = threading.Lock()


def _ask(op: str, a: str, b: str, timeout: float) -> Any:
    """The checker process's reply to ``op`` on ``a`` and ``b``; None when it took over ``timeout``
    seconds (the process is killed) or failed."""
    with _idle_lock:
        proc = _idle.pop() if _idle else None
    if proc is None:
        proc = _CheckerProcess()
    try:
        reply = proc.call([op, a, b, timeout], timeout)
    except _CheckerTimeout:
        log.warning(
            "math-verify %s of %.80r took over %.3gs: killed, counted as no match", op, a, timeout
        )
        proc.kill()
        return None
    except (RuntimeError, OSError, ValueError) as e:
        log.warning(
            "the answer checker process failed on %s of %.80r (%s): counted as no match", op, a, e
        )
        proc.kill()
        return None
    with _idle_lock:
        _idle.append(proc)
    return reply


def _forget_inherited() -> None:
    # a forked child must not share its parent's pipes: it starts its own checker processes
    global _idle_lock  # noqa: PLW0603 (a parent's thread may have held the lock at the fork)
    _idle.clear()
    _idle_lock = threading.Lock()


def _close_idle() -> None:
    with _idle_lock:
        while _idle:
            _idle.pop().kill()


os.register_at_fork(after_in_child=_forget_inherited)
atexit.register(_close_idle)


# ---- inside a checker process --------------------------------------------------------------------
def _serve() -> None:
    """The checker process's loop: answers ``["key", answer, "", seconds]`` and
    ``["equal", gold, pred, seconds]``."""
    import resource

    logging.disable(logging.CRITICAL)  # math-verify warns that its timeout is off: we kill instead
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries replies only
    with contextlib.suppress(ValueError, OSError):  # macOS refuses address-space limits
        resource.setrlimit(
            resource.RLIMIT_AS, (_MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1])
        )
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file when the CPU limit below hits
    try:
        import math_verify  # noqa: F401
    except ImportError as e:
        out.write(json.dumps(f"cannot import math_verify: {e}") + "\n")
        return
    _mv_equal("(x+1)^2", "x^2+2x+1")  # sympy's first simplify is slow: keep it out of time limits
    out.write(json.dumps("ready") + "\n")
    out.flush()
    for line in sys.stdin:
        op, a, b, seconds = json.loads(line)
        # a backstop for when nobody kills us (the checking process died mid-call): the kernel ends
        # this process once the call has used its seconds of CPU, even inside a C loop
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_limit = int(usage.ru_utime + usage.ru_stime + seconds) + 2
        resource.setrlimit(
            resource.RLIMIT_CPU, (cpu_limit, resource.getrlimit(resource.RLIMIT_CPU)[1])
        )
        try:
            reply = _mv_key(a) if op == "key" else _mv_equal(a, b)
        except Exception:  # noqa: BLE001 - any failure of sympy on a model's answer is a non-match
            reply = None
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _mv_parse(s: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        "\\boxed{" + s + "}",
        [LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def _mv_equal(gold: str, pred: str) -> bool:
    """Equal keys (so sets, intervals and inequalities compare either way round), else verify."""
    import sympy
    from math_verify import verify

    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return False
    if (
        isinstance(g[0], (sympy.Basic, sympy.MatrixBase))
        and isinstance(p[0], (sympy.Basic, sympy.MatrixBase))
        and _sympy_key(g[0]) == _sympy_key(p[0])
    ):
        return True
    return verify(g, p, timeout_seconds=None)


def _mv_key(answer: str) -> str | None:
    import sympy

    parsed = _mv_parse(answer)
    if not parsed or not isinstance(parsed[0], (sympy.Basic, sympy.MatrixBase)):
        return None
    return _sympy_key(parsed[0])


def _sympy_key(x: Any) -> str:
    """A canonical string of a parsed answer (see the module docstring)."""
    import sympy
    from sympy.core.relational import Relational

    if isinstance(x, sympy.MatrixBase):
        return (
            "[" + ";".join(",".join(_sympy_key(v) for v in x.row(i)) for i in range(x.rows)) + "]"
        )
    if isinstance(x, sympy.Eq) and isinstance(x.lhs, sympy.Symbol):
        return _sympy_key(x.rhs)  # x = 7 answers 7
    if isinstance(x, sympy.FiniteSet):  # sets and unordered lists
        items = (
            f"{e.lhs}={_sympy_key(e.rhs)}" if isinstance(e, sympy.Eq) else _sympy_key(e)
            for e in x.args
        )
        return "{" + ",".join(sorted(items)) + "}"
    if isinstance(x, sympy.Tuple):
        return "(" + ",".join(_sympy_key(e) for e in x.args) + ")"
    if isinstance(x, (Relational, sympy.And)) and len(x.free_symbols) == 1:
        x = x.as_set()  # 1 < x <= 2 answers (1, 2]
    if isinstance(x, sympy.Interval):
        return (
            ("(" if x.left_open else "[")
            + _sympy_key(x.start)
            + ","
            + _sympy_key(x.end)
            + (")" if x.right_open else "]")
        )
    if isinstance(x, sympy.Union):
        return "U".join(sorted(_sympy_key(a) for a in x.args))
    if isinstance(x, sympy.Set) or not isinstance(x, sympy.Expr):
        return str(x)
    x = x.replace(lambda e: isinstance(e, sympy.UnevaluatedExpr), lambda e: e.args[0])  # 50%
    value = sympy.simplify(x.doit())
    if value.is_Rational:
        return str(Fraction(int(value.p), int(value.q)))
    if value.is_Float:
        return str(Fraction(str(value)))
    return str(sympy.expand(value) if value.free_symbols else value)


if __name__ == "__stopkit_checker__":
    _serve()
