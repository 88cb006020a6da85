"""Evaluation harness (behind ``stopkit eval`` and ``stopkit demo``), in the paper's terms.

:func:`evaluate` runs every method on every problem for every seed with the same N, k and l_p.
Each (method, seed) runs all its problems through the engine's scheduler at once, and each
problem's outcome is a JSON record (per path: its length, score, fate and correctness) appended to
``records.jsonl`` as soon as it finishes, so an interrupted evaluation resumes where it stopped.
Metrics are then computed from the records. Per method (the ``stopkit demo --json`` schema):

- ``avg_at_k``: the paper's avg@k|N: per problem, the mean accuracy of the k paths the method
  keeps out of N, averaged over problems (for ``full``: avg@N, all N paths). Paths that end inside
  the prefix are kept: in the authors' pipeline they go straight to the vote, like the resumed
  ones. So the k are the paths finished in the prefix, then the resumed ones by score; when these
  are more than k (they number ``keep`` + the finished ones), the best-scored resumed paths fill
  the places after the finished ones.
- ``maj_at_k``: majority-vote accuracy over those k paths (``full``: maj@N); ``pass_at_k``: whether
  one of them is right.
- ``vote_accuracy``: accuracy of the method's own vote (its ``vote`` rule, every path that voted);
  ``kept_accuracy``: mean accuracy of every path that voted.
- ``tokens``: generated tokens per problem (every sampled token, pruned prefixes included), split
  into ``launch_tokens`` (up to the first check), ``check_tokens`` ([STOP] positions) and
  ``resume_tokens``; ``external_tokens``: tokens an external scorer processed (Types I and II).
- ``seconds``: the problem's share of the engine's time (each step split over the questions in it
  by their rows), so methods compare at the same continuous batching.

Each method's row also names its type in the paper's taxonomy (``type``) and, when ``full`` ran,
its token reduction against it. Launches are reproducible per seed (each path has its own random
stream), so for one seed every method starts from the very same N prefixes.

:func:`sweep` reads budget curves from ONE run per (method, l_p, seed): every path is decoded to
its end and scored at the check without pruning; since a path's continuation does not depend on
which others are resumed, the outcome of keeping any k of them is read off that run (early stop
excluded). It gives avg@k|N, maj@k and tokens for every keep (or retention ratio) and l_p, with
the full-decoding point, and the best retention ratio per token budget.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any

from stopkit._checks import check_int, check_ints, check_real
from stopkit.methods import method_type

if TYPE_CHECKING:
    from stopkit.distributed import RayPool
    from stopkit.reasoner import Method, ParallelReasoner, Solution

log = logging.getLogger(__name__)

__all__ = [
    "evaluate",
    "sweep",
    "problem_record",
    "kept_paths",
    "record_metrics",
    "aggregate",
    "write_results",
    "plot_accuracy_vs_tokens",
    "format_table",
    "METRICS",
    "RECORDS",
]

METRICS = (
    "avg_at_k",
    "maj_at_k",
    "pass_at_k",
    "vote_accuracy",
    "kept_accuracy",
    "tokens",
    "launch_tokens",
    "check_tokens",
    "resume_tokens",
    "scoring_tokens",
    "external_tokens",
    "seconds",
)
RECORDS = "records.jsonl"


# ---- one problem -------------------------------------------------------------------------------
def problem_record(
    solution: Solution, reference: object, checker: Callable[[str, Any], bool]
) -> dict:
    """The JSON record of one Solution against ``reference``: the voted answer and whether it is
    right, and per path its length, score, fate and whether its own answer is right."""
    paths = []
    for p in solution.paths:
        right = p.answer is not None and bool(checker(p.text, reference))
        paths.append(
            {
                "tokens": len(p.tokens),
                "score": p.score,
                "finish": p.finish_reason,
                "in_prefix": p.finished_in_prefix,
                "answer": None if p.answer is None else str(p.answer),
                "correct": right,
            }
        )
    vote_ok = False
    if solution.answer is not None:
        # checked through the text of the first path that gave the voted answer, so any checker
        # (text, answer) works whatever answer type the extractor produces
        rep = next(p for p in solution.paths if p.voted and p.answer == solution.answer)
        vote_ok = bool(checker(rep.text, reference))
    return {
        "answer": None if solution.answer is None else str(solution.answer),
        "correct": vote_ok,
        "paths": paths,
        "tokens": dict(solution.tokens),
        "scoring_tokens": solution.scoring_tokens,
        "external_tokens": solution.external_tokens,
        "seconds": solution.compute_seconds,
        "latency": solution.seconds,
    }


def kept_paths(paths: Sequence[dict], k: int | None, *, score_only: bool = False) -> list[dict]:
    """The k paths a method keeps (module docstring): those finished in the prefix, then the
    resumed ones by score (best first, ties to the earlier path); k None: every path that voted.
    score_only: the record of a sweep's run, where no path was pruned: every unfinished path is
    a candidate."""
    if k is None:
        return [p for p in paths if p["finish"] in ("eos", "length")]
    done = [p for p in paths if p["in_prefix"]]
    rest = [
        p for p in paths if not p["in_prefix"] and (score_only or p["finish"] in ("eos", "length"))
    ]
    return (done + sorted(rest, key=lambda p: -_score(p)))[:k]  # sorted is stable: ties in order


def _score(path: dict) -> float:
    s = path["score"]
    return float("-inf") if s is None or s != s else s  # unscored and NaN rank last


def record_metrics(record: dict, k: int | None) -> dict[str, float]:
    """avg@k, maj@k, pass@k (over :func:`kept_paths`), the vote's accuracy, the voters' accuracy
    and the token counts of one problem's record; k None: every path (``full``)."""
    kept = kept_paths(record["paths"], k)
    voters = kept_paths(record["paths"], None)
    t = record["tokens"]
    return {
        "avg_at_k": _mean([p["correct"] for p in kept]),
        "maj_at_k": _majority(kept),
        "pass_at_k": float(any(p["correct"] for p in kept)),
        "vote_accuracy": float(record["correct"]),
        "kept_accuracy": _mean([p["correct"] for p in voters]),
        "tokens": sum(p["tokens"] for p in record["paths"]),
        "launch_tokens": t["launch"],
        "check_tokens": t["check"],
        "resume_tokens": t["resume"],
        "scoring_tokens": record["scoring_tokens"],
        "external_tokens": record["external_tokens"],
        "seconds": record["seconds"],
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else 0.0


def _majority(paths: Sequence[dict]) -> float:
    """Whether the most common answer among ``paths`` is right (ties to the first seen)."""
    counts = Counter(p["answer"] for p in paths if p["answer"] is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winner = next(
        p["answer"] for p in paths if p["answer"] is not None and counts[p["answer"]] == top
    )
    return float(next(p["correct"] for p in paths if p["answer"] == winner))


def aggregate(rows: Sequence[dict]) -> dict[str, float]:
    """Means of :data:`METRICS` over per-problem metric rows."""
    return {key: _mean(r[key] for r in rows) for key in METRICS}


# ---- the harness -------------------------------------------------------------------------------
def _named(methods: str | Sequence[Method] | Mapping[str, Method]) -> dict[str, str | Callable]:
    if isinstance(methods, Mapping):
        named = dict(methods)
    elif isinstance(methods, str):
        named = {m.strip(): m.strip() for m in methods.split(",") if m.strip()}
    else:
        named = {}
        for m in methods:
            name = m if isinstance(m, str) else getattr(m, "__name__", repr(m))
            if name in named:
                raise ValueError(f"method {name!r} is given twice")
            named[name] = m
    if not named:
        raise ValueError("methods must name at least one method")
    return named


def _problems(problems: Sequence) -> list[tuple[str, object, object]]:
    """(id, question, answer) of each problem (mappings or objects; id default the index)."""
    out = []
    for i, p in enumerate(problems):
        get = p.get if isinstance(p, Mapping) else (lambda k, d=None, p=p: getattr(p, k, d))
        for key in ("question", "answer"):
            if get(key) is None:
                raise ValueError(f"problems[{i}] needs a {key!r} field")
        out.append((str(get("id", i)), get("question"), get("answer")))
    if not out:
        raise ValueError("problems must not be empty")
    ids = [pid for pid, _, _ in out]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"problem ids must be unique (records are keyed by them), got "
            f"duplicates {sorted({x for x in ids if ids.count(x) > 1})[:5]}"
        )
    return out


def _read_records(path: FsPath | None) -> list[dict]:
    """Records already in ``path`` (a truncated last line, from an interrupted write, is cut)."""
    if path is None or not path.is_file():
        return []
    records, good = [], 0
    with path.open("rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: dropping an incomplete last record (interrupted run)", path)
                break
            good += len(line)
    if good != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good)
    return records


def _run(
    reasoner: ParallelReasoner | RayPool,
    items: Sequence[tuple[str, Any, object]],
    key: dict,
    records_file: FsPath | None,
    done: dict,
    checker: Callable[[str, Any], bool],
    progress: bool,
    **solve_kwargs: Any,
) -> None:
    """Solve the items not in ``done`` (keyed by id) together and record each as it ends. A
    :class:`stopkit.distributed.RayPool` standing in for the reasoner makes the same records on
    its Ray workers (``solve_records``)."""
    todo = [(pid, q, a) for pid, q, a in items if pid not in done]
    if not todo:
        return
    if hasattr(reasoner, "solve_records"):
        records = reasoner.solve_records(todo, checker, progress=progress, **solve_kwargs)
    else:
        records = (
            (todo[i][0], problem_record(sol, todo[i][2], checker))
            for i, sol in reasoner.solve_iter(
                [q for _, q, _ in todo], progress=progress, **solve_kwargs
            )
        )
    f = records_file.open("a", encoding="utf-8") if records_file is not None else None
    try:
        for pid, record in records:
            rec = {"id": pid, **key, **record}
            done[pid] = rec
            if f is not None:
                f.write(json.dumps(rec) + "\n")
                f.flush()
    finally:
        if f is not None:
            f.close()


def evaluate(
    reasoner: ParallelReasoner | RayPool,
    problems: Sequence,
    methods: str | Sequence[Method] | Mapping[str, Method],
    *,
    n: int = 64,
    keep: int = 8,
    prefix_tokens: int = 2048,
    max_new_tokens: int = 8192,
    seeds: Sequence[int] = (0,),
    vote: str = "majority",
    checker: Callable[[str, Any], bool] | None = None,
    out: str | FsPath | None = None,
    progress: bool = True,
    **solve_kwargs: Any,
) -> dict:
    """Run ``methods`` on ``problems`` for each seed; returns ``{"methods": {name: metrics},
    "config": {...}}`` (module docstring).

    reasoner: a :class:`~stopkit.reasoner.ParallelReasoner`, or a
    :class:`~stopkit.distributed.RayPool` to spread the problems over Ray workers. problems:
    mappings or objects with ``question``, ``answer`` and optional ``id`` (default the index).
    methods: ``"full,stop"``, a list of specs / callables, or a ``{name: method}`` dict. checker:
    ``callable(text, answer) -> bool`` (default :func:`stopkit.answers.check_answer`). out: a
    folder for ``records.jsonl`` (appended as problems finish; a rerun skips what it holds). Extra
    keyword arguments (``temperature``, ``top_p``, ``early_stop``, ``schedule``, ...) go to the
    reasoner.

    Each method's metrics are the means over all (problem, seed) runs of :data:`METRICS`, plus
    ``runs``, ``type`` (the paper's taxonomy), ``token_reduction`` (1 - tokens / full's, when
    full ran) and ``per_seed``.
    """
    from stopkit.answers import check_answer

    named = _named(methods)
    items = _problems(problems)
    seeds = check_ints("seeds", seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got []")
    checker = checker or check_answer
    for method in named.values():  # every method is checked before anything runs
        reasoner.check_args(
            n=n,
            keep=keep,
            prefix_tokens=prefix_tokens,
            max_new_tokens=max_new_tokens,
            method=method,
            vote=vote,
            **{k: v for k, v in solve_kwargs.items() if k in ("early_stop", "schedule")},
        )
    records_file = None
    if out is not None:
        FsPath(out).mkdir(parents=True, exist_ok=True)
        records_file = FsPath(out) / RECORDS
    existing = _read_records(records_file)
    results: dict[str, dict] = {}
    args = dict(
        n=n,
        keep=keep,
        prefix_tokens=prefix_tokens,
        max_new_tokens=max_new_tokens,
        vote=vote,
        **solve_kwargs,
    )
    for name, method in named.items():
        per_seed, rows = [], []
        for seed in seeds:
            key = {"method": name, "seed": seed}
            done = {
                r["id"]: r for r in existing if r.get("method") == name and r.get("seed") == seed
            }
            _run(
                reasoner,
                items,
                key,
                records_file,
                done,
                checker,
                progress,
                method=method,
                seed=seed,
                **args,
            )
            k = None if method == "full" else keep
            seed_rows = [record_metrics(done[pid], k) for pid, _, _ in items]
            per_seed.append({"seed": seed, **aggregate(seed_rows)})
            rows += seed_rows
        spec = method if isinstance(method, str) else None
        results[name] = {
            **aggregate(rows),
            "runs": len(rows),
            "type": method_type(spec) if spec else None,
            "per_seed": per_seed,
        }
        m = results[name]
        log.info(
            "%s: avg@k %.3f maj@k %.3f vote %.3f tokens %.0f",
            name,
            m["avg_at_k"],
            m["maj_at_k"],
            m["vote_accuracy"],
            m["tokens"],
        )
    if "full" in results:
        full_tokens = results["full"]["tokens"]
        for m in results.values():
            m["token_reduction"] = 1.0 - m["tokens"] / full_tokens if full_tokens else 0.0
    config = {
        "n": n,
        "keep": keep,
        "prefix_tokens": prefix_tokens,
        "max_new_tokens": max_new_tokens,
        "seeds": seeds,
        "vote": vote,
        "problems": len(items),
        **{k: v for k, v in solve_kwargs.items() if isinstance(v, (int, float, str, list))},
    }
    return {"methods": results, "config": config}


# ---- budget sweeps -----------------------------------------------------------------------------
def sweep(
    reasoner: ParallelReasoner | RayPool,
    problems: Sequence,
    methods: str | Sequence[Method] | Mapping[str, Method],
    *,
    n: int = 64,
    keeps: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
    prefixes: Sequence[int] = (2048,),
    max_new_tokens: int = 8192,
    seeds: Sequence[int] = (0,),
    checker: Callable[[str, Any], bool] | None = None,
    out: str | FsPath | None = None,
    progress: bool = True,
    **solve_kwargs: Any,
) -> dict:
    """Budget curves (module docstring): for each pruning method, l_p in ``prefixes`` and keep in
    ``keeps`` (or ``ceil(ratio * n)`` for ``ratios``), avg@k|N, maj@k, pass@k and tokens per
    problem, from one score-only run per (method, l_p, seed); plus the ``full`` point (every path
    of those runs). Returns ``{"points": [rows], "full": metrics, "best": [rows], "config"}``,
    where ``best`` holds, per token budget (25/50/75/100% of full's), the point with the highest
    avg@k within it. out: folder for the run's ``records.jsonl`` (resumable). reasoner: as
    :func:`evaluate`'s (a :class:`~stopkit.distributed.RayPool` runs the sweep on Ray workers)."""
    import math

    from stopkit.answers import check_answer

    if (keeps is None) == (ratios is None):
        raise ValueError("give exactly one of keeps and ratios")
    if keeps is not None:
        ks = sorted({check_int(f"keeps[{i}]", k, 1, n) for i, k in enumerate(keeps)})
    else:
        assert ratios is not None  # exactly one of the two (above)
        ks = sorted(
            {
                math.ceil(round(check_real(f"ratios[{i}]", r, 0, 1, low_open=True) * n, 9))
                for i, r in enumerate(ratios)
            }
        )
    if not ks:
        raise ValueError("keeps (or ratios) must not be empty")
    prefixes = sorted(set(check_ints("prefixes", prefixes, 1)))
    if not prefixes:
        raise ValueError("prefixes must not be empty")
    if solve_kwargs.get("early_stop") is not None:
        raise ValueError(
            "a sweep reads every keep off one run, which early stop would change: "
            "leave early_stop unset"
        )
    named = {name: m for name, m in _named(methods).items() if m != "full"}
    if not named:
        raise ValueError("methods must name a pruning method besides full")
    items = _problems(problems)
    seeds = check_ints("seeds", seeds)
    checker = checker or check_answer
    for method in named.values():
        for lp in prefixes:
            reasoner.check_args(
                n=n, keep=ks[-1], prefix_tokens=lp, max_new_tokens=max_new_tokens, method=method
            )
    records_file = None
    if out is not None:
        FsPath(out).mkdir(parents=True, exist_ok=True)
        records_file = FsPath(out) / RECORDS
    existing = _read_records(records_file)
    points: list[dict[str, Any]] = []
    full_rows: list[dict[str, Any]] = []
    for name, method in named.items():
        for lp in prefixes:
            runs = []
            for seed in seeds:
                key = {"method": name, "seed": seed, "prefix_tokens": lp, "sweep": True}
                done = {r["id"]: r for r in existing if all(r.get(a) == b for a, b in key.items())}
                _run(
                    reasoner,
                    items,
                    key,
                    records_file,
                    done,
                    checker,
                    progress,
                    method=method,
                    seed=seed,
                    n=n,
                    keep=ks[-1],
                    prefix_tokens=lp,
                    max_new_tokens=max_new_tokens,
                    prune=False,
                    **solve_kwargs,
                )
                runs += [done[pid] for pid, _, _ in items]
            if not full_rows:
                full_rows = [_full_metrics(r) for r in runs]
            for k in ks:
                row = aggregate([_sweep_metrics(r, k, lp) for r in runs])
                points.append(
                    {
                        "method": name,
                        "type": method_type(method) if isinstance(method, str) else None,
                        "prefix_tokens": lp,
                        "keep": k,
                        "retention": k / n,
                        **row,
                    }
                )
    full = aggregate(full_rows)
    best = []
    for share in (0.25, 0.5, 0.75, 1.0):
        fits = [p for p in points if p["tokens"] <= share * full["tokens"]]
        if fits:
            top = max(fits, key=lambda p: (p["avg_at_k"], -p["tokens"]))
            best.append({"budget": share, **top})
    config = {
        "n": n,
        "keeps": ks,
        "prefixes": prefixes,
        "max_new_tokens": max_new_tokens,
        "seeds": seeds,
        "problems": len(items),
    }
    return {"points": points, "full": full, "best": best, "config": config}


def _full_metrics(record: dict) -> dict:
    """The full-decoding point of a score-only run: every path kept."""
    paths = record["paths"]
    t = record["tokens"]
    return {
        "avg_at_k": _mean(p["correct"] for p in paths),
        "maj_at_k": _majority(paths),
        "pass_at_k": float(any(p["correct"] for p in paths)),
        "vote_accuracy": _majority(paths),
        "kept_accuracy": _mean(p["correct"] for p in paths),
        "tokens": sum(p["tokens"] for p in paths),
        "launch_tokens": t["launch"],
        "check_tokens": 0,
        "resume_tokens": t["resume"],
        "scoring_tokens": 0,
        "external_tokens": 0,
        "seconds": record["seconds"],
    }


def _sweep_metrics(record: dict, k: int, lp: int) -> dict:
    """What pruning to ``k`` at ``lp`` would have given, read off a score-only run."""
    paths = record["paths"]
    kept = kept_paths(paths, k, score_only=True)
    kept_ids = {id(p) for p in kept}
    tokens = sum(p["tokens"] if id(p) in kept_ids else min(p["tokens"], lp) for p in paths)
    launch = record["tokens"]["launch"]
    return {
        "avg_at_k": _mean(p["correct"] for p in kept),
        "maj_at_k": _majority(kept),
        "pass_at_k": float(any(p["correct"] for p in kept)),
        "vote_accuracy": _majority(kept),
        "kept_accuracy": _mean(p["correct"] for p in kept),
        "tokens": tokens + record["scoring_tokens"],
        "launch_tokens": launch,
        "check_tokens": record["scoring_tokens"],
        "resume_tokens": tokens - launch,
        "scoring_tokens": record["scoring_tokens"],
        "external_tokens": record["external_tokens"],
        "seconds": record["seconds"],
    }


# ---- output ------------------------------------------------------------------------------------
def write_results(results: dict, out_dir: str | FsPath) -> dict[str, FsPath]:
    """Write ``results.json``, ``results.csv`` (one row per method) and ``accuracy_vs_tokens.png``
    into ``out_dir`` (created); returns their paths by kind ("json", "csv", "png")."""
    out = FsPath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "png": out / "accuracy_vs_tokens.png",
    }
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "type", *METRICS, "runs"])
        for name, m in results["methods"].items():
            w.writerow([name, m.get("type") or "", *(m[k] for k in METRICS), m.get("runs", "")])
    plot_accuracy_vs_tokens(results, paths["png"])
    return paths


def write_sweep(result: dict, out_dir: str | FsPath) -> dict[str, FsPath]:
    """Write ``sweep.json``, ``sweep.csv`` (one row per point, the full point last) and
    ``sweep.png`` (avg@k|N against tokens per l_p, with the full point) into ``out_dir``."""
    out = FsPath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "png": out / "sweep.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    cols = ["method", "type", "prefix_tokens", "keep", "retention", *METRICS]
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for p in result["points"]:
            w.writerow([p.get(c, "") for c in cols])
        w.writerow(
            ["full", "", "", result["config"]["n"], 1.0, *(result["full"][k] for k in METRICS)]
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves: dict[tuple, list] = {}
    for p in result["points"]:
        curves.setdefault((p["method"], p["prefix_tokens"]), []).append(p)
    for i, ((method, lp), unsorted) in enumerate(curves.items()):
        pts = sorted(unsorted, key=lambda p: p["tokens"])
        ax.plot(
            [p["tokens"] for p in pts],
            [100 * p["avg_at_k"] for p in pts],
            marker="o",
            color=f"C{i % 10}",
            label=f"{method}, l_p={lp}",
        )
    ax.scatter(
        [result["full"]["tokens"]],
        [100 * result["full"]["avg_at_k"]],
        color="black",
        marker="*",
        s=120,
        label="full (avg@N)",
        zorder=3,
    )
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("avg@k|N (%)")
    ax.set_title(f"budget sweep (N={result['config']['n']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(paths["png"])
    return paths


def plot_accuracy_vs_tokens(results: dict, path: str | FsPath) -> FsPath:
    """PNG of each method's avg@k|N and vote accuracy (%) against generated tokens per problem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, m) in enumerate(results["methods"].items()):
        color = f"C{i % 10}"
        ax.scatter(
            m["tokens"],
            100 * m["avg_at_k"],
            color=color,
            marker="o",
            s=50,
            label=f"{name} (avg@k|N)",
        )
        ax.scatter(
            m["tokens"],
            100 * m["vote_accuracy"],
            facecolors="none",
            edgecolors=color,
            marker="s",
            s=50,
            label=f"{name} (vote)",
        )
        ax.annotate(
            name,
            (m["tokens"], 100 * m["avg_at_k"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    cfg = results.get("config", {})
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        f"accuracy vs tokens (N={cfg.get('n')}, k={cfg.get('keep')}, "
        f"l_p={cfg.get('prefix_tokens')})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return FsPath(path)


def format_table(results: dict) -> str:
    """The per-method metrics as a fixed-width table in the paper's layout: type, avg@k|N (avg@N
    for full), maj@k, the vote, tokens and their reduction against full, external tokens."""
    has_full = "full" in results["methods"]
    head = (
        f"{'method':<14} {'type':>4} {'avg@k|N':>8} {'maj@k':>7} {'vote':>7} {'tokens':>8} "
        f"{'[STOP]':>7} {'ext tok':>8}"
        + (f" {'vs full':>8}" if has_full else "")
        + f" {'seconds':>8}"
    )
    lines = [head]
    for name, m in results["methods"].items():
        line = (
            f"{name[:14]:<14} {m.get('type') or '-':>4} {100 * m['avg_at_k']:>7.1f}% "
            f"{100 * m['maj_at_k']:>6.1f}% {100 * m['vote_accuracy']:>6.1f}% "
            f"{m['tokens']:>8.0f} {m['scoring_tokens']:>7.0f} {m['external_tokens']:>8.0f}"
        )
        if has_full:  # full's own row: no reduction to show
            line += f" {'-':>8}" if name == "full" else f" {-100 * m['token_reduction']:>+7.0f}%"
        lines.append(line + f" {m['seconds']:>8.3f}")
    return "\n".join(lines)


def format_sweep(result: dict) -> str:
    """The best point per token budget, as lines of text."""
    full = result["full"]
    lines = [f"full: avg@N {100 * full['avg_at_k']:.1f}%, {full['tokens']:.0f} tokens"]
    lines += [
        f"budget {100 * b['budget']:.0f}% of full's tokens: best {b['method']} "
        f"l_p={b['prefix_tokens']} keep={b['keep']} (retention {b['retention']:.2f}): "
        f"avg@k|N {100 * b['avg_at_k']:.1f}%, {b['tokens']:.0f} tokens"
        for b in result["best"]
    ]
    return "\n".join(lines)
