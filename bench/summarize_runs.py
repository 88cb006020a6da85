"""Summarise repeated runs of the paged_attention benchmark, one pytest-benchmark JSON file a run:
per case, our time, the speedup over the reference and our fraction of the copy bandwidth (median
and range over the runs), and in how many runs it met a threshold (by default issue 2's targets:
10x the reference at the 1.5B shape, q_len 4, bfloat16; 50% of the copy everywhere). One run of a
shared VM can land in one of its slow phases; the multi-run tables in bench/RESULTS.md come from
this script.

    for i in 1 2 3 4 5; do
        pytest bench/test_bench_paged_attention.py --bench-devices cpu --benchmark-only \\
            --benchmark-json=/tmp/runs/$i.json
    done
    python bench/summarize_runs.py /tmp/runs/*.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

OURS = "stopkit"


def load_runs(paths: list[Path]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(one header per run: time, commit, isa, threads; our rows by case id, in run order)."""
    runs, by_case = [], {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
        ours = [b for b in data["benchmarks"] if b["params"].get("impl") == OURS]
        if not ours:
            raise ValueError(
                f"{path}: no {OURS} rows (expected the JSON of a paged_attention benchmark run)"
            )
        info = ours[0]["extra_info"]
        commit = (data.get("commit_info") or {}).get("id", "?")[:7]
        runs.append(
            dict(
                path=path.name,
                time=data["datetime"][:19],
                commit=commit,
                isa=info.get("isa"),
                threads=info.get("threads"),
            )
        )
        for b in ours:
            case = b["param"][: -len(OURS) - 1]
            by_case.setdefault(case, []).append(
                dict(ms=b["stats"]["median"] * 1e3, **b["extra_info"])
            )
    return runs, by_case


def spread(values: list[float], fmt: str) -> str:
    """'median [min-max]' of the values, each with format `fmt`."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="pytest-benchmark JSON files, one per run"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=10.0, help="speedup threshold counted (default 10)"
    )
    parser.add_argument(
        "--speedup-cases",
        default=r"1\.5B-.*-q4-bf16$",
        help="regular expression: the cases whose speedups are counted (default: issue 2's)",
    )
    parser.add_argument(
        "--min-copy", type=float, default=0.5, help="fraction of the copy counted (default 0.5)"
    )
    args = parser.parse_args()
    try:
        runs, by_case = load_runs(args.runs)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for run in runs:
        print(
            f"{run['path']}: {run['time']} commit {run['commit']}, isa {run['isa']}, {run['threads']} threads"
        )
    header = (
        f"{'case':<38} {'runs':>4} {'ours ms':>22} {'speedup':>22} {'% copy':>22} "
        f"{'>=' + format(args.min_speedup, 'g') + 'x':>6} {'>=' + format(100 * args.min_copy, 'g') + '%':>6}"
    )
    print(header)
    print("-" * len(header))
    for case, rows in by_case.items():
        speedups = [r["speedup_vs_reference"] for r in rows if "speedup_vs_reference" in r]
        fractions = [100 * r["copy_fraction"] for r in rows]
        counted = speedups and re.search(args.speedup_cases, case)
        fast = f"{sum(s >= args.min_speedup for s in speedups)}/{len(speedups)}" if counted else "-"
        print(
            f"{case:<38} {len(rows):>4} {spread([r['ms'] for r in rows], '.2f'):>22} "
            f"{spread(speedups, '.1f') if speedups else '-':>22} {spread(fractions, '.1f'):>22} "
            f"{fast:>6} {f'{sum(f >= 100 * args.min_copy for f in fractions)}/{len(fractions)}':>6}"
        )
    print(
        "median [min-max] over the runs; speedup = the reference's time / ours in the same run; "
        "% copy = our KV read rate over the copy bandwidth measured right after our timing."
    )


if __name__ == "__main__":
    main()
