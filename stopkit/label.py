"""Monte-Carlo labels of reasoning prefixes (``stopkit label``), streamed through the scheduler.

For each problem, ``traces`` reasoning traces are sampled and paused at ``prefix_tokens``
generated tokens (traces that end earlier are skipped: at inference they go straight to the vote
and are never scored); each paused trace is forked into ``rollouts`` continuations that share its
KV blocks (nothing is prefilled again) and decode to EOS or ``max_new_tokens`` in all; the label
is the fraction of rollouts whose final answer is correct. Every problem is queued at once: the
engine's scheduler runs as many problems' traces and rollouts together as the KV budget allows,
and a problem's records are yielded as soon as its last rollout ends. One JSONL record per
prefix, with the authors' field names::

    {"id": problem id, "question": ..., "answer": ..., "trace": j (among the kept traces),
     "prefix_token_ids": prompt ids + the first prefix_tokens generated ids (what the [STOP]
                         tokens follow), "prompt_len": len(prompt ids),
     "soft_label": n_correct / n_rollouts, "n_correct": ..., "n_rollouts": ...}

Random streams: trace j of problem p draws from ``(seed("traces", p), prompt, j)`` and rollout r
of a prefix from ``(seed("rollouts", p), prompt + prefix, r)``, so the records do not depend on
which problems run together, on the budget, or on the order of the problem file, and a resumed
run reproduces a fresh one. :func:`label_problems` appends each problem's records to a JSONL file
as soon as they arrive; rerunning it skips the problem ids already there.

Rollout length: reasoning models write thousands of tokens before answering, and a rollout cut
short has no answer and counts as wrong; the CLI's default ``--max-new-tokens`` (16384) follows
the paper's 16-32k traces. Lower it only for models whose answers come sooner.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from stopkit._checks import check_int
from stopkit.answers import Checker, check_answer
from stopkit.loading import PromptFormat, eos_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from stopkit.engine import Engine, Group, SamplingParams

__all__ = [
    "LabelTask",
    "LabelRun",
    "label_stream",
    "label_problems",
    "write_labels",
    "check_problems",
    "finished_ids",
    "label_statistics",
    "MAX_NEW_TOKENS",
]

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 16384  # default rollout budget (prefix included): long enough for reasoning models


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


@dataclass(frozen=True)
class LabelTask:
    """What to label and how (validated): sampling, lengths and the answer checker."""

    prefix_tokens: int
    rollouts: int = 32
    traces: int = 1
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    checker: Checker = check_answer

    def __post_init__(self) -> None:
        check_int("prefix_tokens", self.prefix_tokens, 1)
        check_int("rollouts", self.rollouts, 1)
        check_int("traces", self.traces, 1)
        check_int("seed", self.seed, 0)
        if check_int("max_new_tokens", self.max_new_tokens, 2) <= self.prefix_tokens:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must exceed prefix_tokens "
                f"({self.prefix_tokens}): rollouts continue after the prefix"
            )
        if not callable(self.checker):
            raise TypeError("checker must be a callable (text, answer) -> bool")


def check_problems(
    problems: Sequence[dict], tokenizer: Any, prompt: PromptFormat | None = None
) -> list[tuple[object, dict, list[int] | None]]:
    """(id, problem, prompt ids) of each problem (``question``, ``answer``, optional ``id``,
    default its index; ``prompt``: the prompt format, as the reasoner's); ValueError for a
    malformed problem or a repeated id. tokenizer None: the prompt ids are left None, for
    :class:`LabelRun` to make where the model is (a Ray worker)."""
    prompt = prompt or PromptFormat()
    items = []
    for i, prob in enumerate(problems):
        if not isinstance(prob, dict) or "question" not in prob or "answer" not in prob:
            raise ValueError(f"problems[{i}] must be a dict with 'question' and 'answer'")
        tokens = None if tokenizer is None else prompt.prompt_ids(tokenizer, prob["question"])
        items.append((prob.get("id", i), prob, tokens))
    ids = [str(pid) for pid, _, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"problem ids must be unique (resuming skips by id), got duplicates "
            f"{sorted({x for x in ids if ids.count(x) > 1})[:5]}"
        )
    return items


@dataclass
class _Problem:
    pid: object
    problem: dict
    prompt: list[int]
    task: LabelTask
    traces: Group | None = None  # the engine Group of its traces
    forks: dict[int, Group] = field(default_factory=dict)  # trace sample index -> rollout Group
    correct: dict[int, int] = field(default_factory=dict)
    ended_in_prefix: int = 0
    traces_done: bool = False


class LabelRun:
    """Problems labelled together on one engine, each advancing on its own: :func:`label_stream`
    is one; a Ray worker (stopkit.distributed) keeps one open and adds chunks of problems as they
    come, so its engine never drains between chunks. One run drives its engine at a time.
    prompt: the format of the prompts it makes itself (items without prompt ids)."""

    def __init__(self, engine: Engine, tokenizer: Any, prompt: PromptFormat | None = None) -> None:
        engine._check_idle()
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt = prompt or PromptFormat()
        self._eos = eos_token_id(engine.model, tokenizer)  # as the reasoner ends paths
        self._groups: dict[int, tuple[Group, _Problem]] = {}  # id(unfinished group) -> both
        self._left = 0

    @property
    def pending(self) -> int:
        """Problems added and not yet labelled."""
        return self._left

    def add(self, items: Sequence[tuple[object, dict, list[int] | None]], task: LabelTask) -> None:
        """Queue ``items`` ((id, problem, prompt ids or None), from :func:`check_problems`) for
        ``task``."""
        for pid, prob, given in items:
            prompt = (
                given
                if given is not None
                else self.prompt.prompt_ids(self.tokenizer, prob["question"])
            )
            p = _Problem(pid, prob, prompt, task)
            p.traces = self.engine.add_request(
                prompt,
                self._sampling(p, "traces", None),
                n=task.traces,
                checks=[task.prefix_tokens],
            )
            self._groups[id(p.traces)] = (p.traces, p)
            self._left += 1

    def step(self) -> list[tuple[object, list[dict], int]]:
        """One engine step; returns ``(id, records, traces ended in the prefix)`` of each problem
        it finished."""
        out = self.engine.step()
        for g in out.checks:  # traces at the prefix: fork their rollouts, end them
            p = self._groups[id(g)][1]
            live = g.live_rows
            rollout = p.task.max_new_tokens - p.task.prefix_tokens
            for row in live:
                fork = self.engine.fork(
                    row, self._sampling(p, "rollouts", rollout), n=p.task.rollouts
                )
                p.forks[row.sample_index] = fork
                self._groups[id(fork)] = (fork, p)
            self.engine.end_rows(live, "length")
        done = []
        for g in out.finished:
            p = self._groups.pop(id(g))[1]
            if g is p.traces:
                p.traces_done = True
                p.ended_in_prefix = sum(r.finish_reason == "eos" for r in g.rows)
            else:
                trace = next(j for j, f in p.forks.items() if f is g)
                answer = str(p.problem["answer"])
                texts = [
                    self.tokenizer.decode(
                        r.prompt[len(p.prompt) :] + r.tokens, skip_special_tokens=True
                    )
                    for r in g.rows
                ]
                p.correct[trace] = sum(bool(p.task.checker(t, answer)) for t in texts)
            if p.traces_done and len(p.correct) == len(p.forks):
                self._left -= 1
                done.append((p.pid, _records(p), p.ended_in_prefix))
        return done

    def close(self) -> None:
        """Abort every unfinished problem and free its blocks (idempotent)."""
        for g, _ in self._groups.values():
            self.engine.abort(g)
        self.engine.scheduler.finished_groups()
        self._groups.clear()
        self._left = 0

    def _sampling(self, p: _Problem, what: str, max_new_tokens: int | None) -> SamplingParams:
        t = p.task
        return self.engine.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=t.temperature,
            top_p=t.top_p,
            top_k=t.top_k,
            seed=_seed(t.seed, p.pid, what),
            eos_token_id=self._eos,
        )


def label_stream(
    engine: Engine,
    tokenizer: Any,
    items: Sequence[tuple[object, dict, list[int] | None]],
    task: LabelTask,
    *,
    progress: bool = True,
) -> Iterator[tuple[object, list[dict], int]]:
    """Label ``items`` ((id, problem, prompt ids), from :func:`check_problems`) on ``engine`` (an
    idle :class:`~stopkit.engine.Engine`); yields ``(id, records, traces ended in the prefix)`` for
    each problem as soon as its last rollout ends. Leaving the loop early (or an error) aborts what
    is left and frees its blocks."""
    run = LabelRun(engine, tokenizer)
    try:
        run.add(items, task)
        with tqdm(total=len(items), desc="label", unit="problem", disable=not progress) as bar:
            while run.pending:
                for result in run.step():
                    bar.update(1)
                    yield result
    finally:
        run.close()


def _records(p: _Problem) -> list[dict]:
    task = p.task
    out = []
    for j, (trace, fork) in enumerate(sorted(p.forks.items())):
        n = p.correct[trace]
        out.append(
            {
                "id": p.pid,
                "question": p.problem["question"],
                "answer": p.problem["answer"],
                "trace": j,
                "prefix_token_ids": list(fork.prompt),
                "prompt_len": len(p.prompt),
                "soft_label": n / task.rollouts,
                "n_correct": n,
                "n_rollouts": task.rollouts,
            }
        )
    return out


def finished_ids(out: Path) -> set[str]:
    """Problem ids already in the JSONL ``out``; a truncated last line (an interrupted write) is
    cut off."""
    if not out.is_file():
        return set()
    done, good = set(), 0
    with out.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: dropping an incomplete last record (interrupted run)", out)
                break
            done.add(str(rec.get("id")))
            good += len(line)
    if good != out.stat().st_size:
        with out.open("r+b") as f:
            f.truncate(good)
    return done


def label_statistics(records: Sequence[dict]) -> dict[str, float]:
    """Summary of label records: count, problems, mean label, shares of labels at 0 and at 1, and
    the shares of problems whose labels are all 0 or all 1 (what ``stopkit train --drop-uniform``
    leaves out: no signal about which path to keep)."""
    by_problem: dict[str, list[float]] = {}
    for r in records:
        by_problem.setdefault(str(r["id"]), []).append(float(r["soft_label"]))
    labels = [x for v in by_problem.values() for x in v]
    if not labels:
        return {"records": 0, "problems": 0}
    return {
        "records": len(labels),
        "problems": len(by_problem),
        "mean_label": sum(labels) / len(labels),
        "at_0": sum(x == 0 for x in labels) / len(labels),
        "at_1": sum(x == 1 for x in labels) / len(labels),
        "all_0_problems": sum(max(v) == 0 for v in by_problem.values()) / len(by_problem),
        "all_1_problems": sum(min(v) == 1 for v in by_problem.values()) / len(by_problem),
    }


def label_problems(
    model: PreTrainedModel,
    tokenizer: Any,
    problems: Sequence[dict],
    out: str | Path,
    *,
    engine: Engine | None = None,
    prompt: PromptFormat | None = None,
    progress: bool = True,
    **task_fields: Any,
) -> dict[str, int]:
    """Monte-Carlo labels of ``problems`` appended to the JSONL ``out`` as each problem completes
    (module docstring); problem ids already in ``out`` are skipped. problems: dicts with
    ``question`` (str or prompt ids), ``answer`` and optional ``id`` (default the index).
    task_fields: :class:`LabelTask`'s fields (prefix_tokens, rollouts, traces, max_new_tokens,
    temperature, top_p, top_k, seed, checker(text, answer) with text = decoded prefix +
    continuation). engine: an Engine of ``model`` to run on (default: a new one). prompt: the
    prompt format (use the one the scorer will be used with). Returns counts: problems labelled,
    skipped (already in ``out``), records written, traces that ended inside the prefix."""
    from stopkit.engine import Engine

    task = LabelTask(**task_fields)
    items = check_problems(problems, tokenizer, prompt)
    return write_labels(
        out,
        items,
        lambda todo: label_stream(
            engine if engine is not None else Engine(model),
            tokenizer,
            todo,
            task,
            progress=progress,
        ),
    )


def write_labels(
    out: str | Path,
    items: Sequence[tuple[object, dict, list[int] | None]],
    label: Callable[[list], Iterable[tuple[object, list[dict], int]]],
) -> dict[str, int]:
    """Append to the JSONL ``out`` the records of the ``items`` whose ids it does not hold yet,
    each problem's as soon as ``label(todo)`` yields ``(id, records, ended in prefix)`` for it
    (:func:`label_stream`, or the same spread over Ray workers); returns the counts of
    :func:`label_problems`. ``label`` is not called when nothing is left to do."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out)
    todo = [it for it in items if str(it[0]) not in done]
    stats = {"problems": 0, "skipped": len(items) - len(todo), "records": 0, "ended_in_prefix": 0}
    written = []
    if todo:
        with out.open("a", encoding="utf-8") as f:
            for _, records, ended in label(todo):
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
                stats["problems"] += 1
                stats["records"] += len(records)
                stats["ended_in_prefix"] += ended
                written += records
    log.info(
        "labelled %d problems (%d skipped as done): %d records, %d traces ended inside the "
        "prefix; %s",
        stats["problems"],
        stats["skipped"],
        stats["records"],
        stats["ended_in_prefix"],
        json.dumps(label_statistics(written)),
    )
    return stats
