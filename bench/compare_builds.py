"""Compare CPU builds of ``stopkit._C`` in one process: the modules are loaded side by side and
called alternately on the same inputs, which cancels the drift of a shared VM's speed that
separate benchmark runs suffer from (the numbers in bench/RESULTS.md's "What changed" table).

    # build the baseline somewhere else, e.g. from a git worktree:
    #   cmake -S <worktree> -B /tmp/old -G Ninja -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=/tmp/old_so ...
    python bench/compare_builds.py /tmp/old_so/_C.cpython-*.so stopkit/_C.cpython-*.so --dtype bf16 --tables random,hot
    # in the VM's noisier phases: single calls, many rounds, and read the per-round ratios
    python bench/compare_builds.py OLD NEW --dtype fp32 --calls 1 --rounds 150 [--isa avx512]

Cases: the benchmark's inputs (test_bench_paged_attention.Inputs) at its 1.5B shape (or --shape
8B) for q_len 1 and 4, all its rows or the first ``--batch`` of them; "random" is the benchmark's
shuffled block table, "hot" maps every row onto 8 pages that stay in L2 (the compute alone). The
caches are the benchmark's (``zeros_kv_storage``: huge pages where the OS allows them); ``--pages
plain`` copies them into ``torch.empty`` tensors, ``--pages both`` runs every build on both. Each
build's line gives its median time, its ratio to the baseline's median and the median (and
quartiles) of its per-round ratios to the baseline.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from test_bench_paged_attention import SHAPES, Case, Inputs  # bench/ is the script's directory

from stopkit import ops


def load_build(path: str, index: int, workdir: Path, isa: str | None = None):
    """The ``_C`` module at ``path`` under a name of its own (a copy, so two builds never share a
    file name the loader could mistake for one module), on instruction set ``isa`` if given. All
    builds share torch's OpenMP runtime, and so its thread count."""
    copy = workdir / f"build{index}" / Path(path).name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    spec = importlib.util.spec_from_file_location(f"stopkit_build{index}._C", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if isa:
        module.set_isa(isa)
    return module


def paired(samples: list[float], base: list[float]) -> str:
    """The median and quartiles of the per-round ratios to the baseline: each round times the
    builds back to back, so this follows the VM's drift better than a ratio of medians."""
    ratios = [s / b for s, b in zip(samples, base, strict=True)]
    if len(ratios) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"; per round {statistics.median(ratios):.3f}x, quartiles {q1:.3f}-{q3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "builds", nargs="+", help="paths of _C shared objects; the first is the baseline"
    )
    parser.add_argument(
        "--shape", choices=[s for s, spec in SHAPES.items() if "cpu" in spec[-1]], default="1.5B"
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--q-lens", default="1,4")
    parser.add_argument("--tables", default="random", help="comma-separated: random, hot")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed sample")
    parser.add_argument(
        "--pages",
        choices=("huge", "plain", "both"),
        default="huge",
        help="caches from zeros_kv_storage (huge) or torch.empty (plain)",
    )
    parser.add_argument(
        "--isa", help="run every build on this instruction set (set_isa), e.g. avx512"
    )
    parser.add_argument("--batch", type=int, help="the first BATCH rows of the shape only")
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = slice(0, args.batch)

    inputs = Inputs()  # holds the shape's caches: every q_len below gets the same ones
    first = inputs.get(Case("cpu", args.shape, 1, args.dtype))
    huge = (first["k_cache"], first["v_cache"])
    caches = {}
    if args.pages != "plain":
        caches["huge"] = huge
    if args.pages != "huge":
        caches["plain"] = tuple(torch.empty_like(c).copy_(c) for c in huge)
    random_table = first["block_table"][rows]
    tables = {
        "random": random_table,
        "hot": (torch.arange(random_table.numel(), dtype=torch.int32) % 8).view(random_table.shape),
    }

    native = ops._C
    with tempfile.TemporaryDirectory() as tmp:
        modules = [load_build(p, i, Path(tmp), args.isa) for i, p in enumerate(args.builds)]
        for i, p in enumerate(args.builds):
            print(f"[{i}] {p}")
        variants = [
            (f"[{i}]" + (f" {pages}" if len(caches) > 1 else ""), module, kv)
            for i, module in enumerate(modules)
            for pages, kv in caches.items()
        ]
        try:
            for q_len in map(int, args.q_lens.split(",")):
                x = inputs.get(Case("cpu", args.shape, q_len, args.dtype))
                q, seq_lens = x["q"][rows], x["seq_lens"][rows]
                for table in args.tables.split(","):
                    seconds = {name: [] for name, _, _ in variants}
                    for r in range(args.rounds):
                        for name, module, (k, v) in variants if r % 2 == 0 else variants[::-1]:
                            ops._C = module
                            call = functools.partial(
                                ops.paged_attention,
                                q,
                                k,
                                v,
                                tables[table],
                                seq_lens,
                                check_indices=False,
                            )
                            call()
                            start = time.perf_counter()
                            for _ in range(args.calls):
                                call()
                            seconds[name].append((time.perf_counter() - start) / args.calls)
                    base_samples = seconds[variants[0][0]]
                    base = statistics.median(base_samples)
                    cells = [
                        f"{name}: {statistics.median(s) * 1e3:.2f} ms ({statistics.median(s) / base:.3f}x"
                        + (paired(s, base_samples) if i else "")
                        + ")"
                        for i, (name, s) in enumerate(seconds.items())
                    ]
                    batch = f" B={q.shape[0]}" if args.batch else ""
                    print(
                        f"{args.shape}{batch} {args.dtype} q_len {q_len} {table:>6}  "
                        + "  ".join(cells)
                    )
        finally:
            ops._C = native


if __name__ == "__main__":
    main()
