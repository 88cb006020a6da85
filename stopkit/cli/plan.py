"""``stopkit plan``: the largest number of paths N that fits a token budget.

Expected tokens = n * prefix_tokens + keep * (task_tokens - prefix_tokens); plan prints the largest
n that fits the budget (stopkit.planner).
"""

from __future__ import annotations

import argparse
import json

from stopkit.cli.args import Parser, add_command
from stopkit.cli.errors import options
from stopkit.planner import plan

EXAMPLES = """
  stopkit plan --budget 100000 --prefix-tokens 2048 --task-tokens 8192 --keep 8
      # -> n=24 keep=8 expected_tokens=98304
  stopkit plan --budget 1000000 --prefix-tokens 3072 --task-tokens 16384 --ratio 0.25 --json
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "plan",
        help="largest N of paths that fits a token budget",
        description=__doc__,
        examples=EXAMPLES,
    )
    p.add_argument("--budget", type=int, required=True, help="token budget per question")
    p.add_argument("--prefix-tokens", type=int, required=True, help="prefix length l_p")
    p.add_argument("--task-tokens", type=int, required=True, help="expected length of a full path")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=int, help="paths resumed (fixed)")
    g.add_argument("--ratio", type=float, help="fraction of the N paths resumed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with options():
        p = plan(
            args.budget, args.prefix_tokens, args.task_tokens, keep=args.keep, ratio=args.ratio
        )
    if args.json:
        print(json.dumps({"n": p.n, "keep": p.keep, "expected_tokens": p.expected_tokens}))
    else:
        print(f"n={p.n} keep={p.keep} expected_tokens={p.expected_tokens}")
    return 0
