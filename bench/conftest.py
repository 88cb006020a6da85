"""Shared pieces of the microbenchmarks: the devices to run on, the measured copy bandwidth of each
device (once per session), and the summary table printed at the end.

    pytest bench/ -p no:cacheprovider                      # cpu, and cuda when present
    pytest bench/ --bench-devices cuda --benchmark-json=out.json
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch


_RESULTS = pytest.StashKey[list]()
_COPY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-devices", default="cpu,cuda",
                     help="comma-separated devices to benchmark (cuda is skipped without a GPU build)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    config.stash[_COPY] = {}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Median device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    seconds = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            dst.copy_(src)
        synchronize(device)
        seconds.append((time.perf_counter() - start) / (10 if device.type == "cuda" else 1))
    return 2 * nbytes / statistics.median(seconds) / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig: pytest.Config):
    """``copy_bandwidth(device) -> GB/s``, measured once per device per session."""
    cache = pytestconfig.stash[_COPY]

    def get(device: torch.device) -> float:
        key = str(device)
        if key not in cache:
            cache[key] = copy_bandwidth_gbps(device)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> list[dict]:
    """Rows of the summary table (case, impl, seconds, gbps, fraction); each benchmark adds one."""
    return pytestconfig.stash[_RESULTS]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    rows: list[dict] = config.stash.get(_RESULTS, [])
    if not rows:
        return
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row
    write = terminalreporter.write_line
    terminalreporter.section("paged_attention benchmarks")
    for device, gbps in config.stash[_COPY].items():
        write(f"copy bandwidth {device}: {gbps:.1f} GB/s (read + write)")
    header = f"{'case':<38} {'ours ms':>9} {'ref ms':>9} {'speedup':>8} {'GB/s':>7} {'% copy':>7}  peers"
    write(header)
    write("-" * len(header))
    for case, impls in by_case.items():
        ours, ref = impls.get("stopkit"), impls.get("torch-sdpa")
        main = ours or ref
        cells = [f"{case:<38}",
                 f"{ours['seconds'] * 1e3:9.3f}" if ours else f"{'-':>9}",
                 f"{ref['seconds'] * 1e3:9.3f}" if ref else f"{'-':>9}",
                 f"{ref['seconds'] / ours['seconds']:7.1f}x" if ours and ref else f"{'-':>8}",
                 f"{main['gbps']:7.1f}", f"{100 * main['fraction']:6.1f}%"]
        peers = [f"{name} {r['seconds'] * 1e3:.3f} ms" + (f" ({r['seconds'] / ours['seconds']:.2f}x ours)" if ours else "")
                 for name, r in impls.items() if name not in ("stopkit", "torch-sdpa")]
        write(" ".join(cells) + ("  " + "; ".join(peers) if peers else ""))
    write("GB/s and % copy are ours (the reference's where ours did not run); "
          "speedup = reference time / our time; a peer's (Nx ours) = its time / our time.")
