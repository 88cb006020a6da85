"""Command line: ``stopkit <command>`` (also ``python -m stopkit``).

One module per command, each with ``register(subparsers)``, which adds its parser and sets
``run``, and ``run(args) -> int``. Registering imports nothing heavy (transformers loads inside
``run``), so ``stopkit --help`` and ``stopkit plan`` start fast.

A user error (stopkit.cli.errors) prints one line, ``stopkit <command>: <message>``, on stderr and
exits with status 2; Ctrl-C prints one line and exits with 130; ``--debug`` shows the traceback of
either instead (a malformed command line has none: it stays one line). Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TextIO

from stopkit.cli.args import Parser, add_global_flags
from stopkit.cli.errors import UserError

__all__ = ["main", "build_parser", "COMMANDS", "UserError"]

COMMANDS = ("demo", "solve", "label", "train", "eval", "plan", "serve", "bench")

_EXAMPLES = """examples:
  stopkit demo                                   # STOP vs full decoding on the embedded toy task
  stopkit solve --model ./my-model --adapter ckpt/stop "What is 17 * 23?"
  stopkit plan --budget 100000 --prefix-tokens 2048 --task-tokens 8192 --keep 8
  stopkit <command> --help                       # a command's options and examples
"""


def build_parser() -> Parser:
    """The ``stopkit`` parser with every command registered."""
    parser = Parser(
        prog="stopkit",
        description="stopkit: prune doomed paths early in parallel LLM reasoning (STOP).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(parser)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="command", parser_class=Parser
    )
    for name in COMMANDS:
        importlib.import_module(f"stopkit.cli.{name}").register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (as logging's own last-resort handler
    does), so a swapped stderr (tests, notebooks) gets the records."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_HANDLER = _StderrHandler()


def _log_to_stderr(level: int) -> None:
    """stopkit's own log records to stderr at ``level``; the root logger (and so transformers'
    and the hub's records) stays as the user configured it."""
    logger = logging.getLogger("stopkit")
    logger.setLevel(level)
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)


def main(argv: list[str] | None = None) -> int:
    """Run ``stopkit`` on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UserError as e:
        print(f"{e.prog or 'stopkit'}: {e}", file=sys.stderr)
        return 2
    _log_to_stderr(logging.DEBUG if args.verbose else logging.INFO)
    prog = f"stopkit {args.command}"
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        # on a terminal, ^C and any progress bar leave the cursor mid-line
        newline = "\n" if sys.stderr.isatty() else ""
        print(f"{newline}{prog}: interrupted{getattr(args, 'on_interrupt', '')}", file=sys.stderr)
        return 130
