"""Command line: ``stopkit <command>`` (also ``python -m stopkit``)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("stopkit")

_BENCH_EXAMPLES = """examples:
  stopkit bench                       # every microbenchmark under bench/
  stopkit bench -k paged_attention    # only the paged-attention ones
  stopkit bench --json out.json       # also save pytest-benchmark's JSON
"""


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = Path(args.dir)
    if not bench_dir.is_dir():
        raise SystemExit(f"--dir must be the benchmarks folder (bench/ of a stopkit checkout), "
                         f"got {bench_dir}")
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "--benchmark-only",
           "--benchmark-columns=min,median,mean,stddev,rounds"]
    if args.k:
        cmd += ["-k", args.k]
    if args.json:
        cmd += [f"--benchmark-json={args.json}"]
    log.info("running %s", " ".join(cmd))
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stopkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="run the microbenchmarks (pytest-benchmark)", epilog=_BENCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "bench"),
                   help="benchmarks folder (default: bench/ of this checkout)")
    p.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--json", default=None, help="write pytest-benchmark JSON here")
    p.set_defaults(func=_cmd_bench)

    from stopkit import evaluate, train  # noqa: PLC0415 (heavy: transformers)
    from stopkit.toy import demo

    demo.add_cli(sub)      # demo
    train.add_cli(sub)     # label, train
    evaluate.add_cli(sub)  # eval, solve, plan
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)
