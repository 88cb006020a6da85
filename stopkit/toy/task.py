"""The demo task: chained arithmetic modulo a prime, solved step by step.

A problem is a start value and 8-14 numbered operations (``+ c``, ``- c``, ``* c``) applied left
to right, each result reduced modulo ``P``. The chain of thought writes every intermediate result,
one numbered step per operation, so a single slip changes every later value and the answer::

    question:  17 #1 * 7 #2 + 3 #3 - 5 mod 31 ?
    solution:  careful #1 17 * 7 = 26 #2 26 + 3 = 29 #3 29 - 5 = 24 answer: 24

(The step markers ``#i`` let a small model find operation i by matching one token.)

Slips. The model learns from traces that slip on purpose: each step writes a wrong result (uniform
over the other residues) with probability ``slip_rate(op, c)``, and the trace then continues
faithfully from the wrong value. Every operation is a bijection mod the prime (``* c`` never takes
``c = 0``), so a slipped trace ends wrong unless a later slip happens to land back on the right
value. A model trained on them slips at about those rates when sampled at temperature 1, which gives
the demo a real, irreversible slip rate. Difficulty varies with the number of steps (8-14) and the
operand range (``c`` up to 6, or up to P - 1): slips are rare on small sums and common on large
products, so easy problems are solved by most paths and hard ones by few.

Two approaches. Every trace opens by naming its approach, ``careful`` or (a share ``QUICK_SHARE``
of them) ``quick``. Quick traces carry a misconception: ``x - c`` with ``c > x`` is taken as
``c - x`` ("the smaller from the larger"), confidently and every time. The approach shows in a
path's first token, long before the misconception bites (only where the chain meets a subtraction
of a larger number, which depends on the problem), and quick paths of one problem share their wrong
answer. That is how real reasoning paths fail as well: an approach taken early, a confident error,
wrong answers that agree and outvote the right one. Slips alone (each a uniform draw at a fixed
rate) leave nothing a small model can read in the text before l_p: a scorer would have to redo the
arithmetic, and on that earlier version of the task the 2.4M model's adapter ordered only 49-56% of
within-problem path pairs correctly (bench/RESULTS.md).

Splits. Every problem belongs to exactly one split, decided by a hash of its question text:
``"test"`` (1 in 8 of all problems, the held-out set used by evaluation and the demo) or
``"train"`` (the rest: base-model training and STOP labelling). ``generate`` keeps drawing until
it has ``n`` problems of the requested split, so held-out problems can never appear in training,
whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stopkit._checks import check_choice, check_int

__all__ = [
    "P",
    "OPS",
    "MIN_STEPS",
    "MAX_STEPS",
    "QUICK_SHARE",
    "APPROACHES",
    "Problem",
    "apply_op",
    "quick_op",
    "generate",
    "split_of",
    "slip_rate",
    "extract_answer",
    "extract_steps",
    "is_quick",
    "check",
    "write_jsonl",
]

P = 31
OPS = ("+", "-", "*")
MIN_STEPS, MAX_STEPS = 8, 14
SMALL = 6  # operands up to SMALL are "small"
OPERAND_LIMITS = (SMALL, P - 1)  # per-problem operand range
# probability that a training trace writes a wrong result, by (op is "*", operand > SMALL)
SLIP_RATES = {(False, False): 0.0025, (False, True): 0.03, (True, False): 0.01, (True, True): 0.1}
QUICK_SHARE = 0.4  # share of training traces that take the quick approach (the misconception)
APPROACHES = ("careful", "quick")  # the first word of every solution
SPLITS = ("train", "test")
_TEST_BUCKETS = 1  # of 8

_ANSWER_RE = re.compile(r"answer:\s*(-?\d+)")
_BOXED_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_STEP_RE = re.compile(r"(?<![#\d])(-?\d+)\s*([+*-])\s*(-?\d+)\s*=\s*(-?\d+)")


def apply_op(x: int, op: str, c: int) -> int:
    """``x op c`` reduced modulo P."""
    if op == "+":
        return (x + c) % P
    if op == "-":
        return (x - c) % P
    return (x * c) % P


def quick_op(x: int, op: str, c: int) -> int:
    """What a quick trace writes for ``x op c``: ``apply_op``, except ``x - c`` with ``c > x`` is
    ``c - x``."""
    return c - x if op == "-" and c > x else apply_op(x, op, c)


@dataclass(frozen=True)
class Problem:
    """A start value and a tuple of ``(op, operand)`` operations, applied left to right mod P."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """The intermediate results, one per operation; the last one is the answer."""
        return self.chain(apply_op)

    def chain(self, step: Callable[[int, str, int], int] = apply_op) -> list[int]:
        """The results of applying ``step(x, op, c)`` (``apply_op`` or ``quick_op``) in turn."""
        out, x = [], self.start
        for op, c in self.ops:
            x = step(x, op, c)
            out.append(x)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def question(self) -> str:
        ops = " ".join(f"#{i} {op} {c}" for i, (op, c) in enumerate(self.ops, 1))
        return f"{self.start} {ops} mod {P} ?"

    @property
    def solution(self) -> str:
        """The reference chain of thought (careful, no slips) and final line, one
        ``#i prev op c = result`` per step."""
        steps, x = [], self.start
        for i, ((op, c), y) in enumerate(zip(self.ops, self.values, strict=True), 1):
            steps.append(f"#{i} {x} {op} {c} = {y}")
            x = y
        return "careful " + " ".join(steps) + f" answer: {self.answer}"

    def sample_solution(self, rng: random.Random, quick: bool | None = None) -> str:
        """A solution that slips at ``slip_rate`` per step and carries on from what it wrote; quick
        (``quick_op``) with probability ``QUICK_SHARE`` unless ``quick`` is given."""
        if quick is None:
            quick = rng.random() < QUICK_SHARE
        steps, x = [], self.start
        for i, (op, c) in enumerate(self.ops, 1):
            y = quick_op(x, op, c) if quick else apply_op(x, op, c)
            if rng.random() < slip_rate(op, c):
                y = (y + rng.randrange(1, P)) % P
            steps.append(f"#{i} {x} {op} {c} = {y}")
            x = y
        return APPROACHES[quick] + " " + " ".join(steps) + f" answer: {x}"

    @property
    def text(self) -> str:
        """Question then reference solution (the tokenizer adds bos; training appends eos)."""
        return f"{self.question} {self.solution}"

    @property
    def split(self) -> str:
        return split_of(self.question)


def split_of(question: str) -> str:
    """The split (``"train"`` or ``"test"``) a question belongs to, by a stable hash of its text."""
    bucket = hashlib.blake2b(question.encode(), digest_size=8).digest()[0] % 8
    return "test" if bucket < _TEST_BUCKETS else "train"


def slip_rate(op: str, c: int) -> float:
    """Probability that a training trace writes a wrong result for the step ``x op c``."""
    return SLIP_RATES[op == "*", c > SMALL]


def _draw(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    limit = rng.choice(OPERAND_LIMITS)
    ops = []
    for _ in range(rng.randint(min_steps, max_steps)):
        op = rng.choice(OPS)
        # * 0 would erase every earlier step (a slip before it could not matter), * 1 is a no-op
        ops.append((op, rng.randint(2 if op == "*" else 1, limit)))
    return Problem(rng.randrange(P), tuple(ops))


def generate(
    n: int,
    seed: int,
    split: str = "train",
    *,
    min_steps: int = MIN_STEPS,
    max_steps: int = MAX_STEPS,
) -> list[Problem]:
    """``n`` problems of ``split`` drawn with ``random.Random(seed)``; same arguments, same list."""
    n = check_int("n", n, 0)
    check_choice("split", split, SPLITS)
    min_steps = check_int("min_steps", min_steps, 1)
    max_steps = check_int("max_steps", max_steps, min_steps)
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < n:
        p = _draw(rng, min_steps, max_steps)
        if p.split == split:
            out.append(p)
    return out


def extract_answer(text: str) -> int | None:
    """The final answer written in ``text`` (last ``answer: N`` or ``\\boxed{N}``), else None."""
    found = [(m.start(), m.group(1)) for r in (_ANSWER_RE, _BOXED_RE) for m in r.finditer(text)]
    if not found:
        return None
    return int(max(found)[1])


def extract_steps(text: str) -> list[tuple[int, str, int, int]]:
    """Every ``x op c = y`` step written in ``text``, in order, as ``(x, op, c, y)``."""
    return [(int(a), op, int(c), int(y)) for a, op, c, y in _STEP_RE.findall(text)]


def is_quick(text: str) -> bool:
    """True when ``text`` opens with the quick approach."""
    return text.lstrip().startswith("quick")


def check(text: str, answer: int) -> bool:
    """True when the final answer written in ``text`` equals ``answer``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    got = extract_answer(text)
    return got is not None and got == int(answer)


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write one ``{"question", "answer"}`` object per line (the format ``stopkit label`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n")
    return path
