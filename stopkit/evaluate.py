"""Evaluation harness (``stopkit eval``) and the ``solve`` / ``plan`` commands.

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

import argparse
import csv
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FsPath

from tqdm.auto import tqdm

from stopkit.loading import DTYPES, load_model, load_problems
from stopkit.planner import plan

log = logging.getLogger(__name__)

__all__ = ["evaluate", "load_problems", "write_results", "plot_accuracy_vs_tokens", "add_cli",
           "load_model", "format_table", "METRICS"]

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
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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


# ---- command line ------------------------------------------------------------------------------


_EVAL_EXAMPLES = """examples:
  stopkit eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter ckpt/stop \\
      --data aime24.jsonl --methods full,stop,confidence,entropy,random --n 64 --keep 8 \\
      --prefix-tokens 2048 --seeds 0,1,2 --out runs/aime24
  stopkit eval --model ./my-model --data bench.jsonl --methods full,confidence --n 16 --keep 4 \\
      --prefix-tokens 256 --max-new-tokens 1024 --limit 20

The data file is JSONL: {"question": "...", "answer": "..."} per line ("id" optional).
Writes results.json, results.csv and accuracy_vs_tokens.png into --out.
"""

_SOLVE_EXAMPLES = """examples:
  stopkit solve --model ./my-model --adapter ckpt/stop "What is 17 * 23?"
  stopkit solve --model ./my-model --method confidence --n 32 --keep 4 --prefix-tokens 1024 \\
      --vote entropy --early-stop 4 "Find the remainder of 2^100 modulo 7."
  stopkit solve --model ./my-model --method full --n 8 --json "1 + 1 = ?"
"""

_PLAN_EXAMPLES = """examples:
  stopkit plan --budget 100000 --prefix-tokens 2048 --task-tokens 8192 --keep 8
      # -> n=24 keep=8 expected_tokens=98304
  stopkit plan --budget 1000000 --prefix-tokens 3072 --task-tokens 16384 --ratio 0.25 --json

Expected tokens = n * prefix_tokens + keep * (task_tokens - prefix_tokens); plan prints the
largest n that fits the budget.
"""


def _reasoner(args: argparse.Namespace):
    from stopkit.reasoner import ParallelReasoner

    lm, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    scorer = None
    if args.adapter:
        from stopkit.stop import StopScorer

        scorer = StopScorer.load(args.adapter, lm)
    return ParallelReasoner(lm, tokenizer, scorer=scorer)


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local path or hub id of a causal LM")
    p.add_argument("--adapter", default=None, help="StopScorer checkpoint dir (needed by method stop)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=64, help="paths launched per question (default 64)")
    p.add_argument("--keep", type=int, default=8, help="paths resumed after the check (default 8)")
    p.add_argument("--prefix-tokens", type=int, default=2048,
                   help="prefix length l_p at the check (default 2048)")
    p.add_argument("--max-new-tokens", type=int, default=8192,
                   help="tokens per path at most, prefix included (default 8192)")
    p.add_argument("--vote", default="majority", help="majority, score or entropy")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--early-stop", type=int, default=None,
                   help="stop all decoding once an answer has this many votes")


def _check_cli(command: str, args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse bad arguments before the model is loaded."""
    from stopkit.reasoner import check_solve_args

    if "stop" in methods and not args.adapter:
        raise SystemExit("method stop needs --adapter (a StopScorer checkpoint dir)")
    try:
        for method in methods:
            check_solve_args(n=args.n, keep=args.keep, prefix_tokens=args.prefix_tokens,
                             max_new_tokens=args.max_new_tokens, method=method, vote=args.vote,
                             early_stop=args.early_stop)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"stopkit {command}: {e}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    _check_cli("eval", args, methods)
    if isinstance(args.batch_size, int) and args.batch_size < 1:
        raise SystemExit(f"stopkit eval: --batch-size must be >= 1, got {args.batch_size}")
    problems = load_problems(args.data)
    if args.limit is not None:
        problems = problems[: args.limit]
    reasoner = _reasoner(args)
    from stopkit.answers import load_checker

    results = evaluate(reasoner, problems, methods, n=args.n, keep=args.keep,
                       prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
                       seeds=args.seeds, vote=args.vote, checker=load_checker(args.checker),
                       batch_size=args.batch_size, temperature=args.temperature,
                       top_p=args.top_p, early_stop=args.early_stop)
    results["config"].update(model=args.model, adapter=args.adapter, data=str(args.data))
    paths = write_results(results, args.out)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    _check_cli("solve", args, [args.method])
    reasoner = _reasoner(args)
    sol = reasoner.solve(args.question, n=args.n, keep=args.keep, prefix_tokens=args.prefix_tokens,
                         max_new_tokens=args.max_new_tokens, method=args.method, vote=args.vote,
                         early_stop=args.early_stop, seed=args.seed, temperature=args.temperature,
                         top_p=args.top_p)
    if args.json:
        print(json.dumps({
            "answer": sol.answer, "votes": {str(k): v for k, v in sol.votes.items()},
            "generated_tokens": sol.generated_tokens, "scoring_tokens": sol.scoring_tokens,
            "seconds": sol.seconds, "phases": sol.phases,
            "paths": [{"answer": p.answer, "score": p.score, "pruned": p.pruned,
                       "finished_in_prefix": p.finished_in_prefix,
                       "finish_reason": p.finish_reason,
                       "num_tokens": len(p.tokens), "text": p.text} for p in sol.paths]},
            indent=2, default=str))
        return 0
    kept = sum(p.voted for p in sol.paths)
    print(f"answer: {sol.answer}")
    print("votes: " + ", ".join(f"{a!s}={w:.3g}" for a, w in
                                sorted(sol.votes.items(), key=lambda kv: -kv[1])))
    print(f"paths: {len(sol.paths)} launched, {kept} kept; tokens: {sol.generated_tokens} "
          f"generated, {sol.scoring_tokens} [STOP]; {sol.seconds:.2f} s "
          + " ".join(f"{k}={v:.2f}s" for k, v in sol.phases.items()))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        p = plan(args.budget, args.prefix_tokens, args.task_tokens, keep=args.keep, ratio=args.ratio)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"stopkit plan: {e}") from None
    if args.json:
        print(json.dumps({"n": p.n, "keep": p.keep, "expected_tokens": p.expected_tokens}))
    else:
        print(f"n={p.n} keep={p.keep} expected_tokens={p.expected_tokens}")
    return 0


def add_cli(subparsers) -> None:
    """Register the ``eval``, ``solve`` and ``plan`` subcommands on an argparse subparsers object
    (each sets ``func`` to its command function, which takes the parsed Namespace)."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser("eval", help="compare pruning methods on a JSONL benchmark",
                              description=__doc__, epilog=_EVAL_EXAMPLES, formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL of problems: question, answer (id optional)")
    p.add_argument("--methods", default="full,stop,confidence,entropy,random",
                   help="comma-separated methods (default: full,stop,confidence,entropy,random)")
    _add_sampling_args(p)
    p.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="questions sharing one engine session (default 1)")
    p.add_argument("--checker", default=None,
                   help="answer checker 'module:function' (text, answer) -> bool (default: built-in)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.add_argument("--out", default="stopkit-eval", help="output folder (default: stopkit-eval)")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("solve", help="answer one question with parallel paths and pruning",
                              epilog=_SOLVE_EXAMPLES, formatter_class=fmt)
    _add_model_args(p)
    p.add_argument("question", help="the question (the chat template is applied when there is one)")
    p.add_argument("--method", default="stop",
                   help="stop, confidence, entropy, random or full (default stop)")
    _add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the whole Solution as JSON")
    p.set_defaults(func=_cmd_solve)

    p = subparsers.add_parser("plan", help="largest N of paths that fits a token budget",
                              epilog=_PLAN_EXAMPLES, formatter_class=fmt)
    p.add_argument("--budget", type=int, required=True, help="token budget per question")
    p.add_argument("--prefix-tokens", type=int, required=True, help="prefix length l_p")
    p.add_argument("--task-tokens", type=int, required=True, help="expected length of a full path")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=int, help="paths resumed (fixed)")
    g.add_argument("--ratio", type=float, help="fraction of the N paths resumed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plan)
