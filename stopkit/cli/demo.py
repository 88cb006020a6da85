"""``stopkit demo``: STOP against full decoding and the baselines on the embedded toy task.

Loads the shipped tiny model and its STOP adapter (nothing is trained or downloaded), samples N
paths for each held-out problem, and compares methods at the same N, k and l_p: full (every path
to the end), stop (the learned scorer), confidence (DeepConf-style) and random.
"""

from __future__ import annotations

import argparse
import json
import logging

from stopkit.cli.args import Parser, add_command, int_list, name_list
from stopkit.cli.errors import options
from stopkit.cli.inputs import output_file
from stopkit.toy.demo import DemoConfig, run_demo

log = logging.getLogger(__name__)

EXAMPLES = """
  stopkit demo                        # the README's table (about 100 s on 2 CPU cores)
  stopkit demo --plot demo.png        # also a PNG of accuracy against tokens
  stopkit demo --json                 # one JSON object: {"methods": {name: {...}}, "config": ...}
  stopkit demo --problems 64 --keep 6 --seeds 0,1,2
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    d = DemoConfig()
    p = add_command(
        subparsers,
        "demo",
        help="STOP vs full decoding and baselines on the embedded toy task",
        description=__doc__,
        examples=EXAMPLES,
    )
    p.add_argument(
        "--problems", type=int, default=d.problems, help="held-out problems (default %(default)s)"
    )
    p.add_argument("--n", type=int, default=d.n, help="paths per problem (default %(default)s)")
    p.add_argument(
        "--keep", type=int, default=d.keep, help="paths kept after the check (default %(default)s)"
    )
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=d.prefix_tokens,
        help="l_p, tokens before the check (default %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=int_list,
        default=list(d.seeds),
        help="comma-separated seeds (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        type=name_list,
        default=list(d.methods),
        help=f"comma-separated methods (default {','.join(d.methods)}; also entropy and "
        "similarity, the paper's Type I)",
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads (default %(default)s)"
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs tokens here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stopkit.evaluate import format_table, plot_accuracy_vs_tokens  # noqa: PLC0415

    with options():
        config = DemoConfig(
            problems=args.problems,
            n=args.n,
            keep=args.keep,
            prefix_tokens=args.prefix_tokens,
            threads=args.threads,
            seeds=tuple(args.seeds),
            methods=tuple(args.methods),
        )
    plot = output_file("--plot", args.plot) if args.plot else None
    results = run_demo(config, progress=not args.json)
    if plot:
        plot_accuracy_vs_tokens(results, plot)
        log.info("wrote %s", plot)
    if args.json:
        print(json.dumps(results))
        return 0
    full = results["methods"].get("full")
    print(
        f"\nSTOP on the toy task: {config.problems} held-out problems, N={config.n} paths, "
        f"keep k={config.keep} after l_p={config.prefix_tokens} tokens\n"
    )
    print(format_table(results))
    if full and "stop" in results["methods"]:
        stop = results["methods"]["stop"]
        print(
            f"\nstop: avg@k|N {100 * stop['avg_at_k']:.1f}% vs full's avg@N "
            f"{100 * full['avg_at_k']:.1f}%, vote {100 * stop['vote_accuracy']:.1f}% vs "
            f"{100 * full['vote_accuracy']:.1f}%, with {100 * stop['tokens'] / full['tokens']:.0f}% "
            f"of full's tokens"
        )
    return 0
