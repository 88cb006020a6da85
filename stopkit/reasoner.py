"""Parallel reasoning with early path pruning: Launch -> Check -> Resume -> vote (STOP, docs/DESIGN.md section 1).

``ParallelReasoner.solve_iter`` runs any number of questions through the engine's scheduler at
once, each advancing on its own. Launch: a question's ``n`` paths decode ``prefix_tokens`` tokens;
paths that end (EOS) inside the prefix are *finished in prefix* and go straight to the vote, as
in the paper. Check: once every unfinished path holds its prefix, they are scored by the method
(the [STOP] pass batched over every question checked in the same step) and the best ``keep`` are
kept; the rest are dropped and their KV blocks freed at once, for waiting questions to use;
finished-in-prefix paths do NOT count against ``keep`` (so up to ``keep`` + their number paths
vote). Resume: the kept paths decode to EOS or ``max_new_tokens``. Vote: over every path neither
pruned nor cut by early stop; the question's Solution is delivered as soon as its last path
ends.

Methods (higher score = better path):

- ``"stop"``: the learned StopScorer (K [STOP] tokens read each path's paged KV cache).
- ``"confidence"``: DeepConf's lowest group confidence (Fu et al., "Deep Think with Confidence",
  arXiv 2508.15260): token confidence = -mean of the top-k (20) log-probabilities, averaged over a
  sliding window of min(window (2048), length) tokens; the score is the lowest window mean.
- ``"entropy"``: minus the mean token entropy of the prefix (the model's own distribution).
- ``"similarity"`` / ``"similarity:PATH"`` (the paper's Type I): a path's mean cosine similarity to
  the question's other prefixes, over token n-gram TF-IDF or a sentence-embedding model
  (:mod:`stopkit.similarity`; ``ParallelReasoner(similarity_diversity=...)`` ranks for diversity).
- ``"verifier:PATH"`` (Type II): a separate classifier or process reward model scores each prefix's
  text (:mod:`stopkit.verifier`); its processed tokens are counted in ``external_tokens``.
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
once m finished paths share one answer (checked whenever one of its paths ends; the unfinished
paths are cut and do not vote).

Accounting: ``generated_tokens`` is every sampled token of every path (pruned prefixes and EOS
included), ``scoring_tokens`` the [STOP] positions processed (num_tokens x rows scored);
``tokens`` splits them: ``launch`` (tokens up to the first check), ``check`` (the [STOP]
positions), ``resume`` (the rest). Times are the question's own: ``seconds`` from its submission
to its Solution; phases ``launch`` (to its first check, queueing and prefill included), ``check``
(scoring and pruning, all rounds), ``resume`` (after the first check). A seed reproduces a run
exactly: each path draws from its own random stream (seed, the question's prompt, path index), so
pruning other paths, the other questions beside it, the KV budget and preemption never change it
(up to float rounding in near-ties), and for one seed every method sees the very same launched
prefixes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm.auto import tqdm

from stopkit._checks import check_int, check_real
from stopkit.answers import extract_answer, normalize_answer
from stopkit.engine import Engine, Group, Row
from stopkit.loading import PromptFormat, eos_token_id
from stopkit.methods import parse_method
from stopkit.pruning import ranking

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from stopkit.engine import StepOutput
    from stopkit.similarity import SimilarityScorer
    from stopkit.stop import StopScorer
    from stopkit.verifier import Verifier

__all__ = [
    "ParallelReasoner",
    "ReasoningRun",
    "Solution",
    "Path",
    "METHODS",
    "VOTES",
    "vote",
    "check_solve_args",
    "confidence_score",
    "entropy_score",
    "default_extractor",
]

log = logging.getLogger(__name__)

METHODS = ("stop", "confidence", "entropy", "similarity", "random", "full")  # + similarity:PATH,
# verifier:PATH
VOTES = ("majority", "score", "entropy")
ENTROPY_EPS = 1e-6  # floor of a path's mean entropy in the entropy vote (1 / 0 would be infinite)

Method = str | Callable[[list[int], str], float]


@dataclass
class Path:
    """One sampled reasoning path.

    tokens: the generated token ids (prompt excluded, EOS included when sampled); for a pruned
    path, the prefix it had when it was dropped. text: their decoding (special tokens skipped).
    answer: the extracted answer, None when there is none or when the path was pruned or cut by
    early stop. score: the last score the method gave it (None when never scored). pruned: dropped
    at a check. finished_in_prefix: ended with EOS before the first check (went straight to the
    vote). finish_reason: one of :data:`stopkit.engine.FINISH_REASONS`: "eos", "length"
    (max_new_tokens), "pruned", "early_stop" or "aborted".
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
    (0 for methods other than stop); seconds: from the question's submission to its Solution;
    phases: {"launch", "check", "resume": seconds}; tokens: {"launch", "check", "resume":
    tokens} (module docstring); external_tokens: tokens an external scorer (verifier:PATH,
    similarity:PATH) processed; compute_seconds: this question's share of the engine's time
    (each step's time split over the questions by their rows in it), the per-question cost
    under continuous batching.
    """

    answer: Hashable | None
    votes: dict
    paths: list[Path]
    generated_tokens: int
    scoring_tokens: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    external_tokens: int = 0
    compute_seconds: float = 0.0


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


def vote(
    answers: Sequence[Hashable | None], weights: Sequence[float]
) -> tuple[Hashable | None, dict]:
    """Weighted vote over the paths' answers -> (winner, {answer: total weight}).

    Paths with answer None do not vote. Ties go to the answer with the highest total weight, then
    the most paths, then the one that occurs first in ``answers`` (launch order).
    """
    if len(answers) != len(weights):
        raise ValueError(
            f"answers and weights must have the same length, got {len(answers)} and {len(weights)}"
        )
    totals: dict = {}
    counts: dict = {}
    for a, weight in zip(answers, weights, strict=True):
        if a is None:
            continue
        w = float(weight)
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


def check_solve_args(
    *,
    n: int = 64,
    keep: int = 8,
    prefix_tokens: int = 2048,
    max_new_tokens: int = 8192,
    method: Method = "stop",
    vote: str = "majority",
    early_stop: int | None = None,
    schedule: Sequence[tuple[int, int]] | None = None,
    has_scorer: bool = True,
) -> _Plan:
    """Validate solve's arguments (ValueError/TypeError naming the argument) and return the
    check rounds. has_scorer: whether a StopScorer is there (method ``"stop"`` needs one)."""
    n = check_int("n", n, 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 2)
    if isinstance(method, str):
        kind, _ = parse_method(method)
        if kind == "stop" and not has_scorer:
            raise ValueError(
                "method 'stop' needs a scorer: ParallelReasoner(model, tokenizer, "
                "scorer=StopScorer.load(path, model))"
            )
    elif not callable(method):
        raise TypeError(f"method must be a str or a callable, got {type(method).__name__}")
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    if vote == "score" and (
        method == "entropy" or (isinstance(method, str) and method.startswith("similarity:"))
    ):
        raise ValueError(
            f"vote 'score' weighs paths by their score, which must be >= 0; method "
            f"{method!r} scores can be negative (minus entropies, cosines): use "
            f"vote='majority' or 'entropy'"
        )
    if early_stop is not None:
        early_stop = check_int("early_stop", early_stop, 1)
    rounds: list[tuple[int, int | None]]
    if schedule is None:
        rounds = [
            (
                check_int("prefix_tokens", prefix_tokens, 1),
                None if method == "full" else check_int("keep", keep, 1),
            )
        ]
    else:
        if method == "full":
            raise ValueError("method 'full' does not prune; a schedule needs a pruning method")
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
            raise TypeError(
                f"schedule must be a non-empty list of (prefix_tokens, keep) pairs, "
                f"got {schedule!r:.80}"
            )
        pairs: list[tuple[int, int]] = []
        for i, item in enumerate(schedule):
            if not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(f"schedule[{i}] must be a (prefix_tokens, keep) pair, got {item!r}")
            pairs.append(
                (
                    check_int(f"schedule[{i}] prefix_tokens", item[0], 1),
                    check_int(f"schedule[{i}] keep", item[1], 1),
                )
            )
        for i in range(1, len(pairs)):
            if pairs[i][0] <= pairs[i - 1][0] or pairs[i][1] > pairs[i - 1][1]:
                raise ValueError(
                    f"schedule must have strictly increasing prefix_tokens and "
                    f"non-increasing keep, got {pairs}"
                )
        rounds = [*pairs]
    if rounds[0][1] is not None and rounds[0][1] > n:
        raise ValueError(f"keep must be <= n ({n}), got {rounds[0][1]}")
    if rounds[-1][0] >= max_new_tokens:
        raise ValueError(
            f"prefix_tokens must be < max_new_tokens ({max_new_tokens}), got {rounds[-1][0]}"
        )
    return _Plan(n, tuple(rounds), max_new_tokens, method, vote, early_stop)


class ParallelReasoner:
    """Launch -> Check -> Resume -> vote over ``n`` sampled paths per question (module docstring).

    model: a transformers causal LM the :class:`~stopkit.engine.Engine` supports; tokenizer: its
    tokenizer (decodes paths; applies the chat template to str questions when it has one); scorer:
    a :class:`~stopkit.stop.StopScorer` bound to ``model`` (needed by method ``"stop"`` only).
    engine: an Engine of ``model`` to reuse (e.g. with a fixed KV budget); default a new one.
    confidence_window, confidence_top_k: DeepConf's window (tokens) and top-k.
    similarity_diversity: 0 ranks ``similarity`` by consensus, (0, 1] for diversity (see
    :class:`~stopkit.similarity.SimilarityScorer`); external_device, external_dtype: where and in
    which dtype the models of ``similarity:PATH`` and ``verifier:PATH`` run (default: the reasoning
    model's device, the checkpoint's dtype); verifier_options: keyword arguments of
    :meth:`~stopkit.verifier.Verifier.load` (e.g. step_marker, max_length, batch_size).
    prompt: how str questions become prompts (:class:`~stopkit.loading.PromptFormat`; default:
    the paper's instruction in the chat template). Use the same for labelling and solving.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        scorer: StopScorer | None = None,
        *,
        engine: Engine | None = None,
        confidence_window: int = 2048,
        confidence_top_k: int = 20,
        similarity_diversity: float = 0.0,
        external_device: str | torch.device | None = None,
        external_dtype: str | torch.dtype = "auto",
        verifier_options: dict | None = None,
        prompt: PromptFormat | None = None,
    ) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        self.engine = engine if engine is not None else Engine(model)
        if (
            engine is not None
            and engine.model is not model
            and getattr(model, "get_base_model", lambda: None)() is not engine.model
        ):
            raise ValueError("engine must run the same model as the reasoner")
        if scorer is not None and getattr(scorer, "model", None) not in (model, self.engine.model):
            raise ValueError(
                "scorer must be bound to the reasoner's model (StopScorer.new/load with this model)"
            )
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.confidence_window = check_int("confidence_window", confidence_window, 1)
        self.confidence_top_k = check_int("confidence_top_k", confidence_top_k, 1)
        self.similarity_diversity = check_real(
            "similarity_diversity", float(similarity_diversity), 0.0, 1.0
        )
        self.external_device = self.engine.device if external_device is None else external_device
        self.external_dtype = external_dtype
        self.verifier_options = dict(verifier_options or {})
        self._external: dict[str, SimilarityScorer | Verifier] = {}
        if prompt is not None and not isinstance(prompt, PromptFormat):
            raise TypeError(f"prompt must be a PromptFormat, got {type(prompt).__name__}")
        self.prompt = prompt or PromptFormat()
        self._eos = eos_token_id(model, tokenizer)

    def external_scorer(self, method: str) -> SimilarityScorer | Verifier:
        """The scorer of an external method (``similarity``, ``similarity:PATH``,
        ``verifier:PATH``), loaded once and kept."""
        if method not in self._external:
            kind, path = parse_method(method)
            scorer: SimilarityScorer | Verifier
            if kind == "similarity":
                from stopkit.similarity import SimilarityScorer

                scorer = SimilarityScorer.from_spec(
                    method,
                    device=self.external_device,
                    dtype=self.external_dtype,
                    diversity=self.similarity_diversity,
                )
            elif kind == "verifier":
                from stopkit.verifier import Verifier

                assert path is not None  # parse_method requires verifier:PATH
                scorer = Verifier.load(
                    path,
                    device=self.external_device,
                    dtype=self.external_dtype,
                    **self.verifier_options,
                )
            else:
                raise ValueError(f"{method!r} is not an external method")
            self._external[method] = scorer
        return self._external[method]

    # ---- inputs --------------------------------------------------------------------------------
    def prompt_ids(self, question: str | Sequence[int]) -> list[int]:
        """Prompt token ids of a question in this reasoner's prompt format."""
        return self.prompt.prompt_ids(self.tokenizer, question)

    def check_args(self, **kwargs: Any) -> _Plan:
        """Validate solve's arguments (see :func:`check_solve_args`) for this reasoner (method
        ``"stop"`` needs its scorer). Called by solve before any generation."""
        return check_solve_args(**kwargs, has_scorer=self.scorer is not None)

    # ---- solving -------------------------------------------------------------------------------
    def solve(self, question: str | Sequence[int], **kwargs: Any) -> Solution:
        """Solve one question; keyword arguments as :meth:`solve_iter`."""
        return self.solve_batch([question], **kwargs)[0]

    def solve_batch(
        self, questions: Sequence[str | Sequence[int]], **kwargs: Any
    ) -> list[Solution]:
        """Solve any number of questions together (:meth:`solve_iter`); returns their Solutions
        in the order of ``questions``."""
        out: list[Solution | None] = (
            [None] * len(questions) if isinstance(questions, Sequence) else []
        )
        for i, sol in self.solve_iter(questions, **kwargs):
            out[i] = sol
        return cast(list[Solution], out)  # every index was filled

    def solve_iter(
        self,
        questions: Sequence[str | Sequence[int]],
        *,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Solution]]:
        """Solve any number of questions through the engine's scheduler, all admitted as the KV
        budget allows, each advancing on its own; yields ``(index, Solution)`` as each finishes.
        Every argument is checked (ValueError/TypeError naming it) before anything runs.

        n: paths per question; keep: paths resumed after the check (ignored by ``full``);
        prefix_tokens: tokens decoded before the check; max_new_tokens: tokens per path at most;
        method, vote, early_stop, schedule: see the module docstring; seed: reproduces the run;
        temperature, top_p, top_k, min_p: sampling (defaults: DeepSeek-R1's 0.6 / 0.95);
        extractor: text -> answer (hashable, None for none; default :func:`default_extractor`);
        progress: a tqdm bar over decoded tokens (None: only on a terminal).

        If the loop is left early or fails (an exception from a callable method, an interrupt),
        every path still running is aborted and its blocks freed; the engine stays usable.
        """
        if (
            isinstance(questions, (str, bytes))
            or not isinstance(questions, Sequence)
            or not questions
        ):
            raise TypeError("questions must be a non-empty list of questions (str or token ids)")
        run = ReasoningRun(self, progress=progress)
        try:
            for i, q in enumerate(questions):
                run.add(q, index=i, **kwargs)
        except BaseException:
            run.close()
            raise
        return run.results()


class _Question:
    """One question of a :class:`ReasoningRun`: its plan, group and book-keeping."""

    def __init__(
        self, index: int, plan: _Plan, extractor: Callable, seed: int, text: str, prune: bool
    ) -> None:
        self.index, self.plan, self.extractor, self.seed = index, plan, extractor, seed
        self.text, self.prune = text, prune  # the question as text (external scorers read it)
        self.external_tokens = 0
        self.compute_seconds = 0.0
        self.group: Group  # the engine request, made by ReasoningRun.add right after
        self.t_start = time.perf_counter()
        self.t_first_check: float | None = None
        self.phases = {"launch": 0.0, "check": 0.0, "resume": 0.0}
        self.scoring_tokens = 0
        self.scores: dict[int, float] = {}  # sample index -> last score
        self.in_prefix: set[int] = set()
        self.answers: dict[int, tuple[str, Hashable | None]] = {}  # sample -> (text, answer)


class ReasoningRun:
    """Questions solved together on one engine, each with its own arguments, each advancing on
    its own (:meth:`ParallelReasoner.solve_iter` is one; a server keeps one open and adds
    questions as they come). One run drives its engine at a time: :meth:`step` runs one
    scheduling step and handles what it reports (early stops, checks, finished questions)."""

    def __init__(self, reasoner: ParallelReasoner, *, progress: bool | None = None) -> None:
        self.r = reasoner
        self.engine = reasoner.engine
        self.engine._check_idle()
        self._questions: dict[int, _Question] = {}  # id(group) -> question
        self._next = 0
        self.sampled_tokens = 0  # tokens sampled by this run's steps, over every path
        self._bar = tqdm(
            desc="solve",
            unit="tok",
            leave=False,
            disable=None if progress is None else not progress,
        )

    @property
    def pending(self) -> int:
        """Questions added and not yet finished."""
        return len(self._questions)

    def progress(self) -> dict[int, dict]:
        """Each pending question's progress, ``{index: {"tokens": sampled so far over its paths,
        "live_paths": paths not ended, "checks": checks resolved, "started": a path was admitted
        to the engine}}`` (a server's progress events and metrics)."""
        return {
            q.index: {
                "tokens": sum(len(r.tokens) for r in q.group.rows),
                "live_paths": len(q.group.live_rows),
                "checks": q.group.check_index,
                "started": q.group.started,
            }
            for q in self._questions.values()
        }

    def add(
        self,
        question: str | Sequence[int],
        *,
        index: int | None = None,
        n: int = 64,
        keep: int = 8,
        prefix_tokens: int = 2048,
        max_new_tokens: int = 8192,
        method: Method = "stop",
        vote: str = "majority",
        early_stop: int | None = None,
        seed: int = 0,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int = 0,
        min_p: float = 0.0,
        schedule: Sequence[tuple[int, int]] | None = None,
        extractor: Callable[[str], Hashable | None] | None = None,
        prune: bool = True,
    ) -> int:
        """Queue a question (arguments as :meth:`ParallelReasoner.solve_iter`); returns its index
        (``index``, default the number of questions added before). prune False: every check
        scores the live paths but keeps them all (a budget sweep reads one such run for every
        keep). Raises before queueing anything on bad arguments, and CacheFullError when the
        question can never fit the KV budget."""
        plan = self.r.check_args(
            n=n,
            keep=keep,
            prefix_tokens=prefix_tokens,
            max_new_tokens=max_new_tokens,
            method=method,
            vote=vote,
            early_stop=early_stop,
            schedule=schedule,
        )
        seed = check_int("seed", seed, 0)
        if extractor is not None and not callable(extractor):
            raise TypeError(
                f"extractor must be a callable text -> answer, got {type(extractor).__name__}"
            )
        prompt = self.r.prompt_ids(question)
        if isinstance(plan.method, str) and parse_method(plan.method)[0] in (
            "similarity",
            "verifier",
        ):
            self.r.external_scorer(plan.method)  # load (and check) it before anything runs
        text = (
            question
            if isinstance(question, str)
            else self.r.tokenizer.decode(prompt, skip_special_tokens=True)
        )
        sampling = self.engine.sampling_params(
            max_new_tokens=plan.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            eos_token_id=self.r._eos,
            record_logprobs=plan.method == "entropy" or plan.vote == "entropy",
            top_logprobs=self.r.confidence_top_k if plan.method == "confidence" else 0,
        )
        index = self._next if index is None else index
        q = _Question(index, plan, extractor or default_extractor, seed, text, bool(prune))
        q.group = self.engine.add_request(
            prompt, sampling, n=plan.n, index=index, checks=[prefix for prefix, _ in plan.rounds]
        )
        self._questions[id(q.group)] = q
        self._next = max(self._next, index + 1)
        return index

    def abort(self, index: int) -> bool:
        """Drop a pending question: its paths end ("aborted") and their blocks are freed at once.
        Returns whether it was pending."""
        for key, q in list(self._questions.items()):
            if q.index == index:
                self.engine.abort(q.group)
                self.engine.scheduler.finished_groups()
                del self._questions[key]
                return True
        return False

    def step(self) -> list[tuple[int, Solution]]:
        """One engine step; returns the questions it finished as ``(index, Solution)``."""
        t0 = time.perf_counter()
        out = self.engine.step()
        self._share(time.perf_counter() - t0, out)
        self._bar.update(len(out.sampled))
        self.sampled_tokens += len(out.sampled)
        for row in out.ended:
            q = self._questions[id(row.group)]
            if q.plan.early_stop is not None:
                self._early_stop(q, row)
        if out.checks:
            self._check([self._questions[id(g)] for g in out.checks])
        done = []
        for group in out.finished + self.engine.scheduler.finished_groups():
            finished = self._questions.pop(id(group), None)
            if finished is not None:
                done.append((finished.index, self._solution(finished, time.perf_counter())))
        return done

    def results(self) -> Iterator[tuple[int, Solution]]:
        """Step until every question has finished, yielding each as it does; leaving the loop
        early (or an error) aborts what is left."""
        try:
            while self._questions:
                yield from self.step()
        finally:
            self.close()

    def close(self) -> None:
        """Abort every pending question (idempotent)."""
        for q in self._questions.values():
            self.engine.abort(q.group)
        self.engine.scheduler.finished_groups()
        self._questions.clear()
        self._bar.close()

    # ---- internals -----------------------------------------------------------------------------
    def _share(self, seconds: float, out: StepOutput) -> None:
        """Split a step's time over the questions by their rows in it."""
        rows: dict[int, int] = {}
        for r in self.engine.scheduler.running + out.ended:
            rows[id(r.group)] = rows.get(id(r.group), 0) + 1
        total = sum(rows.values())
        for key, count in rows.items():
            q = self._questions.get(key)
            if q is not None:
                q.compute_seconds += seconds * count / total

    def _text_answer(self, q: _Question, row: Row) -> tuple[str, Hashable | None]:
        """(text, answer) of a row that ended (its tokens no longer change)."""
        if row.sample_index not in q.answers:
            text = self.r.tokenizer.decode(row.tokens, skip_special_tokens=True)
            q.answers[row.sample_index] = text, q.extractor(text)
        return q.answers[row.sample_index]

    def _early_stop(self, q: _Question, row: Row) -> None:
        counts: dict = {}
        for r in q.group.rows:
            if r.finished:
                a = self._text_answer(q, r)[1]
                if a is not None:
                    counts[a] = counts.get(a, 0) + 1
        if counts and max(counts.values()) >= q.plan.early_stop:
            live = q.group.live_rows
            if live:
                self.engine.end_rows(live, "early_stop")
            log.debug("question %d: early stop (%s), %d paths cut", q.index, counts, len(live))

    def _check(self, questions: list[_Question]) -> None:
        """Resolve the current check of each question: score its live paths by its method (the
        [STOP] pass batched over all of them), keep the best, free the others, resume."""
        t0 = time.perf_counter()
        pruning = [q for q in questions if q.plan.rounds[q.group.check_index][1] is not None]
        for q in questions:
            if q.group.check_index == 0:
                q.t_first_check = t0
                q.phases["launch"] = t0 - q.t_start
                q.in_prefix = {r.sample_index for r in q.group.rows if r.finish_reason == "eos"}
        stop_rows = [
            r
            for q in questions
            if q.plan.method == "stop" and q.plan.rounds[q.group.check_index][1] is not None
            for r in q.group.live_rows
        ]
        stop_scores = {}
        scorer = self.r.scorer  # check_args refuses method "stop" without one
        if stop_rows:
            assert scorer is not None
            scores = scorer.score_rows(self.engine, stop_rows).float().cpu().tolist()
            stop_scores = {id(r): s for r, s in zip(stop_rows, scores, strict=True)}
        for q in questions:
            keep = q.plan.rounds[q.group.check_index][1]
            if keep is not None:
                rows = q.group.live_rows
                scores = (
                    [stop_scores[id(r)] for r in rows]
                    if q.plan.method == "stop"
                    else self._method_scores(q, rows)
                )
                if q.plan.method == "stop":
                    assert scorer is not None
                    q.scoring_tokens += scorer.num_tokens * len(rows)
                for r, s in zip(rows, scores, strict=True):
                    q.scores[r.sample_index] = s
                order = ranking(torch.tensor(scores, dtype=torch.float64)).tolist()
                drop = [rows[j] for j in order[keep:]] if q.prune else []
                if drop:
                    self.engine.end_rows(drop, "pruned")
                log.debug(
                    "question %d: check %d scored %d paths, dropped %d",
                    q.index,
                    q.group.check_index,
                    len(rows),
                    len(drop),
                )
            self.engine.resume(q.group)
        dt = time.perf_counter() - t0
        for q in pruning:
            q.phases["check"] += dt

    def _method_scores(self, q: _Question, rows: list[Row]) -> list[float]:
        """Scores of a question's live rows at a check by a method other than stop."""
        method = q.plan.method
        if isinstance(method, str) and parse_method(method)[0] in ("similarity", "verifier"):
            scorer = self.r.external_scorer(method)
            before = scorer.tokens
            texts = [self.r.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in rows]
            scores = scorer.score(q.text, texts, [list(r.tokens) for r in rows])
            q.external_tokens += scorer.tokens - before
            return [float(x) for x in scores]
        if method == "confidence":
            return [
                confidence_score(r.top_logprobs, self.r.confidence_window, self.r.confidence_top_k)
                for r in rows
            ]
        if method == "entropy":
            return [entropy_score(torch.tensor(r.entropies)) for r in rows]
        if method == "random":
            seed = (q.seed * 0x9E3779B97F4A7C15 ^ q.group.key ^ q.group.check_index) & (2**63 - 1)
            return torch.rand(
                len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            ).tolist()
        assert callable(method)  # the named methods returned above
        out: list[float] = []
        for r in rows:
            s = method(list(r.tokens), self.r.tokenizer.decode(r.tokens, skip_special_tokens=True))
            if isinstance(s, torch.Tensor) and s.numel() == 1:
                s = s.item()
            if isinstance(s, bool) or not isinstance(s, Real):
                raise TypeError(f"a method callable must return a real number, got {s!r:.80}")
            out.append(float(s))
        return out

    def _solution(self, q: _Question, now: float) -> Solution:
        paths = []
        for row in q.group.rows:
            assert row.finish_reason is not None  # the question is done: every row ended
            voted = row.finish_reason in ("eos", "length")
            text, answer = (
                self._text_answer(q, row)
                if voted
                else (self.r.tokenizer.decode(row.tokens, skip_special_tokens=True), None)
            )
            paths.append(
                Path(
                    tokens=list(row.tokens),
                    text=text,
                    answer=answer,
                    score=q.scores.get(row.sample_index),
                    pruned=row.finish_reason == "pruned",
                    finished_in_prefix=row.sample_index in q.in_prefix,
                    finish_reason=row.finish_reason,
                )
            )
        if not q.group.check_index:  # every path ended before the first check
            first = q.plan.rounds[0][0]
            for p in paths:
                p.finished_in_prefix = p.finish_reason == "eos" and len(p.tokens) <= first
            q.phases["launch"] = now - q.t_start
        else:
            assert q.t_first_check is not None  # a check ran
            q.phases["resume"] = now - q.t_first_check - q.phases["check"]
        voters = [(p, row) for p, row in zip(paths, q.group.rows, strict=True) if p.voted]
        if q.plan.vote == "majority":
            weights = [1.0] * len(voters)
        elif q.plan.vote == "score":
            weights = [1.0 if p.score is None else p.score for p, _ in voters]
        else:
            weights = [
                1.0 / max(sum(row.entropies) / len(row.entropies), ENTROPY_EPS) for _, row in voters
            ]
        answer, votes = vote([p.answer for p, _ in voters], weights)
        generated = sum(len(p.tokens) for p in paths)
        launch = sum(min(len(p.tokens), q.plan.rounds[0][0]) for p in paths)
        return Solution(
            answer=answer,
            votes=votes,
            paths=paths,
            generated_tokens=generated,
            scoring_tokens=q.scoring_tokens,
            seconds=now - q.t_start,
            phases=dict(q.phases),
            tokens={"launch": launch, "check": q.scoring_tokens, "resume": generated - launch},
            external_tokens=q.external_tokens,
            compute_seconds=q.compute_seconds,
        )
