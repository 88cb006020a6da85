"""Parallel reasoning with early path pruning: Launch -> Check -> Resume -> vote (STOP, DESIGN.md 1).

``ParallelReasoner.solve`` samples ``n`` paths of a question in one engine session and decodes
them together. Launch: every path decodes ``prefix_tokens`` tokens; paths that end (EOS) inside
the prefix are *finished in prefix* and go straight to the vote, as in the paper. Check: the
unfinished paths are scored by the method and the best ``keep`` of them are kept, the rest are
dropped and their KV blocks freed; finished-in-prefix paths do NOT count against ``keep`` (so up
to ``keep`` + their number paths vote). Resume: the kept paths decode to EOS or
``max_new_tokens`` in one batch. Vote: over every path neither pruned nor cut by early stop.

Methods (higher score = better path):

- ``"stop"``: the learned StopScorer (K [STOP] tokens read each path's paged KV cache).
- ``"confidence"``: DeepConf's lowest group confidence (Fu et al., "Deep Think with Confidence",
  arXiv 2508.15260): token confidence = -mean of the top-k (20) log-probabilities, averaged over a
  sliding window of min(window (2048), length) tokens; the score is the lowest window mean.
- ``"entropy"``: minus the mean token entropy of the prefix (the model's own distribution).
- ``"random"``: uniform scores drawn from ``seed``.
- ``"full"``: no pruning; every path resumes (``keep`` is ignored).
- any callable ``(tokens: list[int], text: str) -> float``: an external verifier or judge.

Scores are ranked like :func:`stopkit.prune`: NaN last, ties keep the earlier path.

Votes: ``"majority"`` (each path weighs 1); ``"score"`` (each path weighs its method score; a path
never scored, e.g. one finished in the prefix or any path under ``full``, weighs 1; scores must be
>= 0, so ``score`` is refused with ``entropy``); ``"entropy"`` (each path weighs 1 / its mean token
entropy over the whole path, floored at 1e-6, as the authors deployed). A callable method's scores
must be >= 0 for the ``score`` vote (ValueError at the vote otherwise). Ties: see :func:`vote`.

Beyond the paper: ``schedule=[(prefix_tokens, keep), ...]`` prunes in several rounds (prefixes
strictly increasing, keeps non-increasing; replaces ``prefix_tokens`` and ``keep``), each round
keeping ``keep`` of the paths still unfinished; ``early_stop=m`` stops all decoding of a question
once m finished paths share one answer (checked every 16 decoded tokens; the unfinished paths are
cut and do not vote).

Accounting: ``generated_tokens`` is every sampled token of every path (pruned prefixes and EOS
included), ``scoring_tokens`` the [STOP] positions processed (num_tokens x rows scored). Phases:
``launch`` is the prefill and decoding up to the first check, ``check`` scoring and pruning (all rounds),
``resume`` all decoding after the first check. A seed reproduces a run exactly: each path draws
from its own random stream (seed, question index, path index), so pruning other paths never
changes it, and for one seed every method sees the very same launched prefixes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from tqdm.auto import tqdm

from stopkit.answers import extract_answer, normalize_answer
from stopkit._checks import check_int
from stopkit.engine import Engine
from stopkit.loading import eos_token_id, prompt_ids
from stopkit.pruning import ranking

__all__ = ["ParallelReasoner", "Solution", "Path", "METHODS", "VOTES", "vote", "check_solve_args",
           "confidence_score", "entropy_score", "default_extractor"]

log = logging.getLogger(__name__)

METHODS = ("stop", "confidence", "entropy", "random", "full")
VOTES = ("majority", "score", "entropy")
ENTROPY_EPS = 1e-6  # floor of a path's mean entropy in the entropy vote (1 / 0 would be infinite)
EARLY_STOP_CHUNK = 16  # tokens decoded between two early-stop checks
FINISH_REASONS = ("eos", "length", "pruned", "early_stop")

Method = str | Callable[[list[int], str], float]


@dataclass
class Path:
    """One sampled reasoning path.

    tokens: the generated token ids (prompt excluded, EOS included when sampled); for a pruned
    path, the prefix it had when it was dropped. text: their decoding (special tokens skipped).
    answer: the extracted answer, None when there is none or when the path was pruned or cut by
    early stop. score: the last score the method gave it (None when never scored). pruned: dropped
    at a check. finished_in_prefix: ended with EOS before the first check (went straight to the
    vote). finish_reason: "eos", "length" (max_new_tokens), "pruned" or "early_stop".
    """

    tokens: list[int]
    text: str
    answer: Hashable | None
    score: float | None
    pruned: bool
    finished_in_prefix: bool
    finish_reason: str = "eos"

    @property
    def voted(self) -> bool:
        """Took part in the vote (neither pruned nor cut by early stop)."""
        return self.finish_reason in ("eos", "length")


@dataclass
class Solution:
    """The result of one question.

    answer: the voted answer (None when no voting path produced one); votes: {answer: total
    weight}; paths: every launched path, in launch order; generated_tokens: every sampled token,
    pruned prefixes included (= sum of len(p.tokens)); scoring_tokens: [STOP] positions processed
    (0 for methods other than stop); seconds: wall time; phases: {"launch", "check", "resume":
    seconds}. From ``solve_batch``, seconds and phases are those of the whole shared batch.
    """

    answer: Hashable | None
    votes: dict
    paths: list[Path]
    generated_tokens: int
    scoring_tokens: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


def default_extractor(text: str) -> str | None:
    """The answer a path votes for: :func:`stopkit.answers.extract_answer`, normalised with
    :func:`stopkit.answers.normalize_answer` (so "0.5" and "\\frac{1}{2}" vote together)."""
    raw = extract_answer(text)
    return None if raw is None else normalize_answer(raw)


def confidence_score(top_logprobs: torch.Tensor, window: int = 2048, k: int = 20) -> float:
    """DeepConf's lowest group confidence of a path, higher is better.

    Token confidence C_t = -mean of the path's top-k log-probabilities at step t ([T, >=k], sorted
    descending; the first k columns are used); the group confidence is the mean of C over a sliding
    window of min(window, T) tokens; the path's score is the lowest group confidence. Fu et al.,
    "Deep Think with Confidence" (DeepConf), arXiv 2508.15260.
    """
    if top_logprobs.dim() != 2 or top_logprobs.shape[0] < 1 or top_logprobs.shape[1] < k:
        raise ValueError(f"top_logprobs must be [T >= 1, >= {k}], got {tuple(top_logprobs.shape)}")
    conf = -top_logprobs[:, :k].double().mean(-1)
    w = min(window, conf.shape[0])
    csum = torch.cat([conf.new_zeros(1), conf.cumsum(0)])
    return float(((csum[w:] - csum[:-w]) / w).min())


def entropy_score(entropies: torch.Tensor) -> float:
    """Minus the mean token entropy of a path ([T] nats), so that higher is better."""
    if entropies.dim() != 1 or entropies.numel() < 1:
        raise ValueError(f"entropies must be [T >= 1], got {tuple(entropies.shape)}")
    return -float(entropies.double().mean())


def vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> tuple[Hashable | None, dict]:
    """Weighted vote over the paths' answers -> (winner, {answer: total weight}).

    Paths with answer None do not vote. Ties go to the answer with the highest total weight, then
    the most paths, then the one that occurs first in ``answers`` (launch order).
    """
    if len(answers) != len(weights):
        raise ValueError(f"answers and weights must have the same length, got {len(answers)} and "
                         f"{len(weights)}")
    totals: dict = {}
    counts: dict = {}
    for a, w in zip(answers, weights):
        if a is None:
            continue
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"vote weights must be finite and >= 0, got {w} for answer {a!r}")
        totals[a] = totals.get(a, 0.0) + w
        counts[a] = counts.get(a, 0) + 1
    if not totals:
        return None, {}
    order = {a: i for i, a in enumerate(totals)}  # dicts keep first-occurrence order
    winner = max(totals, key=lambda a: (totals[a], counts[a], -order[a]))
    return winner, totals



@dataclass(frozen=True)
class _Plan:
    """Validated arguments of a solve: the check rounds [(prefix, keep or None for full)]."""

    n: int
    rounds: tuple[tuple[int, int | None], ...]
    max_new_tokens: int
    method: Method
    vote: str
    early_stop: int | None


def check_solve_args(*, n: int = 64, keep: int = 8, prefix_tokens: int = 2048,
                     max_new_tokens: int = 8192, method: Method = "stop", vote: str = "majority",
                     early_stop: int | None = None,
                     schedule: Sequence[tuple[int, int]] | None = None,
                     has_scorer: bool = True) -> _Plan:
    """Validate solve's arguments (ValueError/TypeError naming the argument) and return the
    check rounds. has_scorer: whether a StopScorer is there (method ``"stop"`` needs one)."""
    n = check_int("n", n, 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 2)
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} or a callable "
                             f"(tokens, text) -> float, got {method!r}")
        if method == "stop" and not has_scorer:
            raise ValueError("method 'stop' needs a scorer: ParallelReasoner(model, tokenizer, "
                             "scorer=StopScorer.load(path, model))")
    elif not callable(method):
        raise TypeError(f"method must be a str or a callable, got {type(method).__name__}")
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    if vote == "score" and method == "entropy":
        raise ValueError("vote 'score' weighs paths by their score, which must be >= 0; method "
                         "'entropy' scores are minus entropies: use vote='entropy'")
    if early_stop is not None:
        early_stop = check_int("early_stop", early_stop, 1)
    if schedule is None:
        rounds = [(check_int("prefix_tokens", prefix_tokens, 1),
                   None if method == "full" else check_int("keep", keep, 1))]
    else:
        if method == "full":
            raise ValueError("method 'full' does not prune; a schedule needs a pruning method")
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
            raise TypeError(f"schedule must be a non-empty list of (prefix_tokens, keep) pairs, "
                            f"got {schedule!r:.80}")
        rounds = []
        for i, item in enumerate(schedule):
            if not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(f"schedule[{i}] must be a (prefix_tokens, keep) pair, got {item!r}")
            rounds.append((check_int(f"schedule[{i}] prefix_tokens", item[0], 1),
                           check_int(f"schedule[{i}] keep", item[1], 1)))
        for i in range(1, len(rounds)):
            if rounds[i][0] <= rounds[i - 1][0] or rounds[i][1] > rounds[i - 1][1]:
                raise ValueError(f"schedule must have strictly increasing prefix_tokens and "
                                 f"non-increasing keep, got {rounds}")
    if rounds[0][1] is not None and rounds[0][1] > n:
        raise ValueError(f"keep must be <= n ({n}), got {rounds[0][1]}")
    if rounds[-1][0] >= max_new_tokens:
        raise ValueError(f"prefix_tokens must be < max_new_tokens ({max_new_tokens}), got "
                         f"{rounds[-1][0]}")
    return _Plan(n, tuple(rounds), max_new_tokens, method, vote, early_stop)


class ParallelReasoner:
    """Launch -> Check -> Resume -> vote over ``n`` sampled paths per question (module docstring).

    model: a transformers causal LM the :class:`~stopkit.engine.Engine` supports; tokenizer: its
    tokenizer (decodes paths; applies the chat template to str questions when it has one); scorer:
    a :class:`~stopkit.stop.StopScorer` bound to ``model`` (needed by method ``"stop"`` only).
    engine: an Engine of ``model`` to reuse (e.g. with a fixed ``num_blocks``); default a new one.
    confidence_window, confidence_top_k: DeepConf's window (tokens) and top-k.
    """

    def __init__(self, model, tokenizer, scorer=None, *, engine: Engine | None = None,
                 confidence_window: int = 2048, confidence_top_k: int = 20) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.engine = engine if engine is not None else Engine(model)
        if engine is not None and engine.model is not model and \
                getattr(model, "get_base_model", lambda: None)() is not engine.model:
            raise ValueError("engine must run the same model as the reasoner")
        if scorer is not None and getattr(scorer, "model", None) not in (model, self.engine.model):
            raise ValueError("scorer must be bound to the reasoner's model (StopScorer.new/load "
                             "with this model)")
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.confidence_window = check_int("confidence_window", confidence_window, 1)
        self.confidence_top_k = check_int("confidence_top_k", confidence_top_k, 1)
        self._eos = eos_token_id(model, tokenizer)

    # ---- inputs --------------------------------------------------------------------------------
    def prompt_ids(self, question: str | Sequence[int]) -> list[int]:
        """Prompt token ids of a question (:func:`stopkit.loading.prompt_ids`)."""
        return prompt_ids(self.tokenizer, question)

    def check_args(self, **kwargs) -> _Plan:
        """Validate solve's arguments (see :func:`check_solve_args`) for this reasoner (method
        ``"stop"`` needs its scorer). Called by solve before any generation."""
        return check_solve_args(**kwargs, has_scorer=self.scorer is not None)

    # ---- solving -------------------------------------------------------------------------------
    def solve(self, question: str | Sequence[int], **kwargs) -> Solution:
        """Solve one question; keyword arguments as :meth:`solve_batch`."""
        return self.solve_batch([question], **kwargs)[0]

    def solve_batch(self, questions: Sequence[str | Sequence[int]], *, n: int = 64, keep: int = 8,
                    prefix_tokens: int = 2048, max_new_tokens: int = 8192, method: Method = "stop",
                    vote: str = "majority", early_stop: int | None = None, seed: int = 0,
                    temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0,
                    min_p: float = 0.0, schedule: Sequence[tuple[int, int]] | None = None,
                    extractor: Callable[[str], Hashable | None] | None = None,
                    progress: bool | None = None) -> list[Solution]:
        """Solve several questions in ONE engine session (their n paths each decode together;
        pruning, early stop and votes are per question). Returns one Solution per question.

        n: paths per question; keep: paths resumed after the check (ignored by ``full``);
        prefix_tokens: tokens decoded before the check; max_new_tokens: tokens per path at most;
        method, vote, early_stop, schedule: see the module docstring; seed: reproduces the run;
        temperature, top_p, top_k, min_p: sampling (defaults: DeepSeek-R1's 0.6 / 0.95);
        extractor: text -> answer (hashable, None for none; default :func:`default_extractor`);
        progress: a tqdm bar over decoded tokens (None: only on a terminal).
        """
        plan = self.check_args(n=n, keep=keep, prefix_tokens=prefix_tokens,
                               max_new_tokens=max_new_tokens, method=method, vote=vote,
                               early_stop=early_stop, schedule=schedule)
        if isinstance(questions, (str, bytes)) or not isinstance(questions, Sequence) or not questions:
            raise TypeError("questions must be a non-empty list of questions (str or token ids)")
        seed = check_int("seed", seed, 0)
        if extractor is not None and not callable(extractor):
            raise TypeError(f"extractor must be a callable text -> answer, got {type(extractor).__name__}")
        prompts = [self.prompt_ids(q) for q in questions]
        run = _Run(self, plan, len(prompts), extractor or default_extractor, seed)
        t_start = time.perf_counter()
        session = self.engine.start(
            prompts, n=plan.n, max_new_tokens=plan.max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, eos_token_id=self._eos,
            record_logprobs=plan.method == "entropy" or plan.vote == "entropy",
            top_logprobs=self.confidence_top_k if plan.method == "confidence" else 0)
        with session, tqdm(total=plan.max_new_tokens, desc="solve", unit="tok", leave=False,
                           disable=None if progress is None else not progress) as bar:
            run.bar = bar
            run.phases["launch"] += time.perf_counter() - t_start  # prefill
            for i, (prefix, round_keep) in enumerate(plan.rounds):
                run.advance(session, prefix, "launch" if i == 0 else "resume")
                if i == 0:
                    run.mark_finished_in_prefix(session)
                if round_keep is not None:
                    run.check(session, round_keep)
            run.advance(session, plan.max_new_tokens, "resume")
            seconds = time.perf_counter() - t_start
            return [run.solution(q, session, seconds) for q in range(len(prompts))]


class _Run:
    """Book-keeping of one solve_batch: which rows were pruned or cut, their scores and answers."""

    def __init__(self, reasoner: ParallelReasoner, plan: _Plan, num_questions: int,
                 extractor: Callable[[str], Hashable | None], seed: int) -> None:
        self.r, self.plan, self.extractor = reasoner, plan, extractor
        self.num_questions = num_questions
        self.phases = {"launch": 0.0, "check": 0.0, "resume": 0.0}
        self.pruned: set = set()
        self.cut: set = set()              # rows cut by early stop
        self.in_prefix: set = set()
        self.scores: dict = {}
        self.final: dict = {}              # row -> (text, answer) of rows whose tokens are final
        self.stopped = [False] * num_questions
        self.scoring_tokens = [0] * num_questions
        self.rng = torch.Generator().manual_seed(seed)
        self.bar = None

    def decode(self, tokens: list[int]) -> str:
        return self.r.tokenizer.decode(tokens, skip_special_tokens=True)

    def text_answer(self, row) -> tuple[str, Hashable | None]:
        """(text, answer) of a row that left the batch (its tokens no longer change)."""
        if row not in self.final:
            text = self.decode(row.tokens)
            self.final[row] = text, self.extractor(text)
        return self.final[row]

    def advance(self, session, target: int, phase: str) -> None:
        """Decode every live row up to ``target`` tokens (rows are in lockstep), checking early stop
        every EARLY_STOP_CHUNK tokens when it is on."""
        t0 = time.perf_counter()
        while session.rows:
            done = len(session.rows[0].tokens)
            if done >= target:
                break
            k = target - done
            if self.plan.early_stop is not None:
                k = min(k, EARLY_STOP_CHUNK)
            session.step(k)
            self.bar.update(k)
            if self.plan.early_stop is not None:
                self.early_stop(session)
        self.phases[phase] += time.perf_counter() - t0

    def early_stop(self, session) -> None:
        for q in range(self.num_questions):
            if self.stopped[q]:
                continue
            counts: dict = {}
            for row in session.all_rows:
                if row.prompt_index == q and row.finished:
                    a = self.text_answer(row)[1]
                    if a is not None:
                        counts[a] = counts.get(a, 0) + 1
            if counts and max(counts.values()) >= self.plan.early_stop:
                self.stopped[q] = True
                live = [i for i, row in enumerate(session.rows) if row.prompt_index == q]
                self.cut.update(session.rows[i] for i in live)
                if live:
                    session.drop(live)
                log.debug("question %d: early stop (%s), %d paths cut", q, counts, len(live))

    def mark_finished_in_prefix(self, session) -> None:
        self.in_prefix = {row for row in session.all_rows if row.finish_reason == "eos"}

    def method_scores(self, session) -> list[float]:
        """Scores of the live rows (all unfinished), higher is better."""
        method, rows = self.plan.method, session.rows
        if method == "stop":
            scores = self.r.scorer.score_session(session).float().cpu().tolist()
            k = self.r.scorer.num_tokens
            for row in rows:
                self.scoring_tokens[row.prompt_index] += k
            return scores
        if method == "confidence":
            return [confidence_score(row.top_logprobs, self.r.confidence_window,
                                     self.r.confidence_top_k) for row in rows]
        if method == "entropy":
            return [entropy_score(torch.tensor(row.entropies)) for row in rows]
        if method == "random":
            return torch.rand(len(rows), generator=self.rng, dtype=torch.float64).tolist()
        out = []
        for row in rows:
            s = method(list(row.tokens), self.decode(row.tokens))
            if isinstance(s, torch.Tensor) and s.numel() == 1:
                s = s.item()
            if isinstance(s, bool) or not isinstance(s, Real):
                raise TypeError(f"a method callable must return a real number, got {s!r:.80}")
            out.append(float(s))
        return out

    def check(self, session, keep: int) -> None:
        """Score the live rows and keep the best ``keep`` of each question's."""
        if not session.rows:
            return
        t0 = time.perf_counter()
        scores = self.method_scores(session)
        by_question: dict[int, list[int]] = {}
        for i, (row, s) in enumerate(zip(session.rows, scores)):
            self.scores[row] = s
            by_question.setdefault(row.prompt_index, []).append(i)
        drop = []
        for idx in by_question.values():
            order = ranking(torch.tensor([scores[i] for i in idx], dtype=torch.float64)).tolist()
            drop += [idx[j] for j in order[keep:]]
        self.pruned.update(session.rows[i] for i in drop)
        if drop:
            session.drop(drop)
        self.phases["check"] += time.perf_counter() - t0
        log.debug("check: scored %d paths, dropped %d", len(scores), len(drop))

    def solution(self, q: int, session, seconds: float) -> Solution:
        rows = [row for row in session.all_rows if row.prompt_index == q]
        paths = []
        for row in rows:
            reason = ("pruned" if row in self.pruned else "early_stop" if row in self.cut
                      else row.finish_reason)
            voted = reason in ("eos", "length")
            text, answer = self.text_answer(row) if voted else (self.decode(row.tokens), None)
            paths.append(Path(tokens=list(row.tokens), text=text, answer=answer,
                              score=self.scores.get(row), pruned=reason == "pruned",
                              finished_in_prefix=row in self.in_prefix, finish_reason=reason))
        voters = [(p, row) for p, row in zip(paths, rows) if p.voted]
        if self.plan.vote == "majority":
            weights = [1.0] * len(voters)
        elif self.plan.vote == "score":
            weights = [1.0 if p.score is None else p.score for p, _ in voters]
        else:
            weights = [1.0 / max(sum(row.entropies) / len(row.entropies), ENTROPY_EPS)
                       for _, row in voters]
        answer, votes = vote([p.answer for p, _ in voters], weights)
        return Solution(answer=answer, votes=votes, paths=paths,
                        generated_tokens=sum(len(p.tokens) for p in paths),
                        scoring_tokens=self.scoring_tokens[q], seconds=seconds,
                        phases=dict(self.phases))
