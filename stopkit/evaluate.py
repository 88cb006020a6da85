"""Evaluation harness (behind ``stopkit eval``).

:func:`evaluate` runs every method on every problem for every seed with the same N, k and l_p and
reports, per method (the ``stopkit demo --json`` schema of DESIGN.md):

- ``vote_accuracy``: fraction of (problem, seed) runs whose voted answer is correct;
- ``kept_accuracy``: the paper's avg@k|N: per run, the fraction of the kept paths (the paths that
  voted: neither pruned nor cut by early stop, i.e. the resumed ones and those that finished inside
  the prefix; all N for ``full``) whose own answer is correct, averaged over runs;
- ``tokens``: generated tokens per problem (every sampled token, pruned prefixes included);
- ``scoring_tokens``: [STOP] positions processed per problem;
- ``seconds``: wall seconds per problem.

Launches are reproducible per seed (each sample has its own random stream), so for one seed every
method starts from the very same N prefixes: methods differ only in what they prune.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FsPath

from tqdm.auto import tqdm

from stopkit._checks import check_int, check_ints
from stopkit.loading import load_model, load_problems

log = logging.getLogger(__name__)

__all__ = ["evaluate", "load_problems", "write_results", "plot_accuracy_vs_tokens", "load_model",
           "format_table", "METRICS"]

METRICS = ("vote_accuracy", "kept_accuracy", "tokens", "scoring_tokens", "seconds")


def _field(problem, name: str):
    if isinstance(problem, Mapping):
        if name not in problem:
            raise ValueError(f"each problem needs a {name!r} field, got keys {sorted(problem)}")
        return problem[name]
    if not hasattr(problem, name):
        raise ValueError(f"each problem needs a {name!r} field or attribute, got "
                         f"{type(problem).__name__}")
    return getattr(problem, name)


def _method_names(methods) -> dict[str, str | Callable]:
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


def _run_metrics(solution, reference, checker) -> dict:
    """Vote correctness and kept-path accuracy of one Solution against ``reference``."""
    kept = [p for p in solution.paths if p.voted]
    kept_ok = [bool(checker(p.text, reference)) for p in kept]
    vote_ok = False
    if solution.answer is not None:
        # the voted answer is checked through the text of the first kept path that gave it, so any
        # checker(text, reference) works, whatever answer type its extractor produces
        rep = next(p for p in kept if p.answer == solution.answer)
        vote_ok = bool(checker(rep.text, reference))
    return {"vote_accuracy": float(vote_ok),
            "kept_accuracy": sum(kept_ok) / len(kept) if kept else 0.0,
            "tokens": solution.generated_tokens, "scoring_tokens": solution.scoring_tokens}


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def evaluate(reasoner, problems: Sequence, methods, *, n: int = 64, keep: int = 8,
             prefix_tokens: int = 2048, max_new_tokens: int = 8192, seeds: Sequence[int] = (0,),
             vote: str = "majority", checker: Callable[[str, object], bool] | None = None,
             batch_size: int = 1, progress: bool = True, **solve_kwargs) -> dict:
    """Run ``methods`` on ``problems`` for each seed; returns ``{"methods": {name: metrics},
    "config": {...}}``.

    reasoner: a :class:`~stopkit.reasoner.ParallelReasoner`. problems: mappings or objects with
    ``question`` and ``answer``. methods: ``"full,stop"``, a list of names / callables, or a
    ``{name: method}`` dict. checker: ``callable(text, answer) -> bool`` (default
    :func:`stopkit.answers.check_answer`). batch_size: questions per ``solve_batch`` call (one
    shared engine session; seconds are split evenly among them). Extra keyword arguments
    (``temperature``, ``top_p``, ``early_stop``, ``schedule``, ...) go to ``solve_batch``.

    Each method's metrics are the means over all (problem, seed) runs of the keys in
    :data:`METRICS` (see the module docstring), plus ``runs`` and ``per_seed`` (the same metrics for
    each seed).
    """
    from stopkit.answers import check_answer

    named = _method_names(methods)
    if not problems:
        raise ValueError("problems must not be empty")
    seeds = check_ints("seeds", seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got []")
    batch_size = check_int("batch_size", batch_size, 1)
    checker = checker or check_answer
    questions = [_field(p, "question") for p in problems]
    references = [_field(p, "answer") for p in problems]
    # validate every method before generating anything
    for method in named.values():
        reasoner.check_args(n=n, keep=keep, prefix_tokens=prefix_tokens,
                            max_new_tokens=max_new_tokens, method=method, vote=vote,
                            **{k: v for k, v in solve_kwargs.items()
                               if k in ("early_stop", "schedule")})

    batches = [range(i, min(i + batch_size, len(questions)))
               for i in range(0, len(questions), batch_size)]
    bar = tqdm(total=len(named) * len(seeds) * len(questions), desc="eval", unit="problem",
               disable=not progress)
    results: dict[str, dict] = {}
    try:
        for name, method in named.items():
            per_seed = []
            all_rows = []
            for seed in seeds:
                rows = []
                bar.set_postfix(method=name, seed=seed, refresh=False)
                for idx in batches:
                    t0 = time.perf_counter()
                    sols = reasoner.solve_batch(
                        [questions[i] for i in idx], n=n, keep=keep, prefix_tokens=prefix_tokens,
                        max_new_tokens=max_new_tokens, method=method, vote=vote, seed=seed,
                        progress=False, **solve_kwargs)
                    seconds = (time.perf_counter() - t0) / len(idx)
                    for i, sol in zip(idx, sols):
                        rows.append({**_run_metrics(sol, references[i], checker),
                                     "seconds": seconds})
                    bar.update(len(idx))
                per_seed.append({"seed": seed, **{k: _mean(rows, k) for k in METRICS}})
                all_rows += rows
            results[name] = {**{k: _mean(all_rows, k) for k in METRICS}, "runs": len(all_rows),
                             "per_seed": per_seed}
            log.info("%s: vote %.3f kept %.3f tokens %.0f seconds %.2f", name,
                     results[name]["vote_accuracy"], results[name]["kept_accuracy"],
                     results[name]["tokens"], results[name]["seconds"])
    finally:
        bar.close()
    config = {"n": n, "keep": keep, "prefix_tokens": prefix_tokens,
              "max_new_tokens": max_new_tokens, "seeds": seeds, "vote": vote,
              "problems": len(questions), "batch_size": batch_size,
              **{k: v for k, v in solve_kwargs.items() if isinstance(v, (int, float, str, list))}}
    return {"methods": results, "config": config}


def write_results(results: dict, out_dir: str | FsPath) -> dict[str, FsPath]:
    """Write ``results.json``, ``results.csv`` (one row per method) and ``accuracy_vs_tokens.png``
    into ``out_dir`` (created); returns their paths by kind ("json", "csv", "png")."""
    out = FsPath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv",
             "png": out / "accuracy_vs_tokens.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", *METRICS, "runs"])
        for name, m in results["methods"].items():
            w.writerow([name, *(m[k] for k in METRICS), m.get("runs", "")])
    plot_accuracy_vs_tokens(results, paths["png"])
    return paths


def plot_accuracy_vs_tokens(results: dict, path: str | FsPath) -> FsPath:
    """PNG of each method's vote and kept-path accuracy (%) against generated tokens per problem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, m) in enumerate(results["methods"].items()):
        color = f"C{i % 10}"
        ax.scatter(m["tokens"], 100 * m["vote_accuracy"], color=color, marker="o", s=50,
                   label=f"{name} (vote)")
        ax.scatter(m["tokens"], 100 * m["kept_accuracy"], facecolors="none", edgecolors=color,
                   marker="s", s=50, label=f"{name} (kept paths)")
        ax.annotate(name, (m["tokens"], 100 * m["vote_accuracy"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    cfg = results.get("config", {})
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy vs tokens (N={cfg.get('n')}, k={cfg.get('keep')}, "
                 f"l_p={cfg.get('prefix_tokens')})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return FsPath(path)


def format_table(results: dict) -> str:
    """The per-method metrics as a fixed-width text table."""
    lines = [f"{'method':<12} {'vote acc':>9} {'kept acc':>9} {'tokens':>10} {'[STOP] tok':>10} "
             f"{'seconds':>9}"]
    for name, m in results["methods"].items():
        lines.append(f"{name:<12} {100 * m['vote_accuracy']:>8.1f}% {100 * m['kept_accuracy']:>8.1f}% "
                     f"{m['tokens']:>10.0f} {m['scoring_tokens']:>10.0f} {m['seconds']:>9.2f}")
    return "\n".join(lines)
