"""``stopkit demo``: STOP against full decoding and the baselines on the embedded toy task.

Loads the shipped tiny model and its STOP adapter (nothing is trained or downloaded), samples N
paths for each held-out problem, and compares methods at the same N, k and l_p: ``full`` (every
path to the end), ``stop`` (the learned scorer), ``confidence`` (DeepConf-style) and ``random``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from stopkit.toy import ADAPTER_DIR, task
from stopkit.toy.build import MAX_NEW_TOKENS, PREFIX_TOKENS, TEMPERATURE

log = logging.getLogger(__name__)

METHODS = ("full", "stop", "confidence", "random")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults: the README's table."""

    problems: int = 128       # held-out problems
    n: int = 32               # paths per problem
    keep: int = 8             # paths resumed after the check (N*l_p + k*(T-l_p) ~ 38% of N*T)
    prefix_tokens: int = PREFIX_TOKENS  # l_p: tokens decoded before the check (the adapter's)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 8       # problems decoded together in one engine session
    data_seed: int = 1234     # which held-out problems
    methods: tuple[str, ...] = METHODS
    threads: int = 1          # torch threads: a 2.4M-parameter model gains nothing from more


def run_demo(config: DemoConfig = DemoConfig(), *, progress: bool = True) -> dict:
    """Run the demo; returns ``{"methods": {name: {vote_accuracy, kept_accuracy, tokens, seconds,
    ...}}, "config": {...}}`` (the schema of ``stopkit demo --json``)."""
    unknown = set(config.methods) - set(METHODS) - {"entropy"}
    if unknown:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, entropy; got {sorted(unknown)}")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, t0, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, t0: float, progress: bool) -> dict:
    from stopkit.evaluate import evaluate
    from stopkit.reasoner import ParallelReasoner
    from stopkit.stop import StopScorer
    from stopkit.toy import load_model

    model, tokenizer = load_model(torch.float32)
    scorer = StopScorer.load(ADAPTER_DIR, model) if "stop" in config.methods else None
    reasoner = ParallelReasoner(model, tokenizer, scorer)
    problems = task.generate(config.problems, seed=config.data_seed, split="test")
    log.info("loaded the toy model and adapter in %.1fs; %d held-out problems", time.perf_counter() - t0,
             len(problems))
    results = evaluate(reasoner, [{"question": p.question, "answer": p.answer} for p in problems],
                       list(config.methods), n=config.n, keep=config.keep,
                       prefix_tokens=config.prefix_tokens, max_new_tokens=MAX_NEW_TOKENS,
                       seeds=config.seeds, checker=task.check, batch_size=config.batch_size,
                       progress=progress, temperature=TEMPERATURE, top_p=1.0,
                       extractor=task.extract_answer)
    results["config"]["seconds_total"] = round(time.perf_counter() - t0, 2)
    return results


def main_demo(args) -> int:
    """The ``stopkit demo`` command (argparse namespace from :func:`add_cli`)."""
    from stopkit.evaluate import format_table, plot_accuracy_vs_tokens

    config = DemoConfig(problems=args.problems, n=args.n, keep=args.keep,
                        prefix_tokens=args.prefix_tokens, threads=args.threads,
                        seeds=tuple(int(s) for s in args.seeds.split(",")),
                        methods=tuple(m.strip() for m in args.methods.split(",")))
    results = run_demo(config, progress=not args.json)
    if args.plot:
        plot_accuracy_vs_tokens(results, args.plot)
        log.info("wrote %s", args.plot)
    if args.json:
        print(json.dumps(results))
        return 0
    full = results["methods"].get("full")
    print(f"\nSTOP on the toy task: {config.problems} held-out problems, N={config.n} paths, "
          f"keep k={config.keep} after l_p={config.prefix_tokens} tokens\n")
    print(format_table(results))
    if full and "stop" in results["methods"]:
        stop = results["methods"]["stop"]
        print(f"\nstop: vote accuracy {100 * stop['vote_accuracy']:.1f}% vs full "
              f"{100 * full['vote_accuracy']:.1f}%, with {100 * stop['tokens'] / full['tokens']:.0f}% "
              f"of full's tokens")
    return 0


_EXAMPLES = """examples:
  stopkit demo                        # the README's table (about 100 s on 2 CPU cores)
  stopkit demo --plot demo.png        # also a PNG of accuracy against tokens
  stopkit demo --json                 # one JSON object: {"methods": {name: {...}}, "config": ...}
  stopkit demo --problems 64 --keep 6 --seeds 0,1,2
"""


def add_cli(subparsers) -> None:
    """Register ``stopkit demo``."""
    import argparse

    d = DemoConfig()
    p = subparsers.add_parser("demo", help="STOP vs full decoding and baselines on the embedded toy task",
                              description=__doc__, epilog=_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=d.problems, help="held-out problems (default %(default)s)")
    p.add_argument("--n", type=int, default=d.n, help="paths per problem (default %(default)s)")
    p.add_argument("--keep", type=int, default=d.keep, help="paths kept after the check (default %(default)s)")
    p.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens,
                   help="l_p, tokens before the check (default %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated methods")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs tokens here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=main_demo)
