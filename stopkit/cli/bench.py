"""``stopkit bench``: run the microbenchmarks under bench/ (pytest-benchmark).

The benchmarks are not part of the installed package: they live in bench/ of a stopkit checkout.
``stopkit bench`` finds that folder beside the package (a checkout, or an editable install) or at
the local folder pip installed the package from (PEP 610 ``direct_url.json``); ``--dir`` names it
otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from stopkit.cli.args import Parser, add_command
from stopkit.cli.errors import UserError
from stopkit.cli.inputs import output_file

log = logging.getLogger(__name__)

EXAMPLES = """
  stopkit bench                       # every microbenchmark under bench/
  stopkit bench -k paged_attention    # only the paged-attention ones
  stopkit bench --json out.json       # also save pytest-benchmark's JSON
  stopkit bench --dir ~/src/stopkit/bench
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "bench",
        help="run the microbenchmarks (pytest-benchmark)",
        description=__doc__,
        examples=EXAMPLES,
    )
    p.add_argument(
        "--dir",
        default=None,
        help="the benchmarks folder (default: bench/ of the checkout stopkit comes from)",
    )
    p.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--json", default=None, help="write pytest-benchmark's JSON here")
    p.set_defaults(run=run)


def find_bench_dir() -> Path | None:
    """bench/ of the checkout this stopkit comes from, None when there is none."""
    candidates = [Path(__file__).resolve().parents[2] / "bench"]
    try:
        url = json.loads(
            importlib.metadata.distribution("stopkit").read_text("direct_url.json") or "{}"
        ).get("url", "")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        url = ""
    if url.startswith("file://"):
        candidates.append(Path(unquote(urlparse(url).path)) / "bench")
    return next((c for c in candidates if (c / "conftest.py").is_file()), None)


def run(args: argparse.Namespace) -> int:
    bench_dir: Path | None
    if args.dir is not None:
        bench_dir = Path(args.dir)
        if not bench_dir.is_dir():
            raise UserError(
                f"--dir {bench_dir}: no such folder; expected bench/ of a stopkit checkout"
            )
    else:
        bench_dir = find_bench_dir()
        if bench_dir is None:
            raise UserError(
                "the benchmarks are in bench/ of a stopkit checkout, and this stopkit "
                "was not installed from one: clone the repository and run it there, "
                "or pass --dir"
            )
    for module in ("pytest", "pytest_benchmark"):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"needs pytest and pytest-benchmark: pip install 'stopkit[test]' "
                f"({module} is missing)"
            )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-q",
        "--benchmark-only",
        "--benchmark-columns=min,median,mean,stddev,rounds",
    ]
    if args.k:
        cmd += ["-k", args.k]
    if args.json:
        cmd += [f"--benchmark-json={output_file('--json', args.json)}"]
    log.info("running %s", " ".join(cmd))
    return subprocess.call(cmd)
