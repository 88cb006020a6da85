"""Shared pieces of the microbenchmarks: the devices to run on, the measured copy bandwidth of each
device (measured after each benchmark), and the summary table printed at the end.

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
    parser.addoption(
        "--bench-devices",
        default="cpu,cuda",
        help="comma-separated devices to benchmark (cuda is skipped without a GPU build)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    config.stash[_COPY] = {}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyMeter:
    """Copy bandwidth of one device in GB/s (bytes read + bytes written), measured on demand with
    buffers allocated once: each benchmark measures it right after its own timing, so that the
    drift of a shared machine's speed moves both numbers of its fraction alike."""

    def __init__(self, device: torch.device, nbytes: int = 1 << 30) -> None:
        self.device = device
        self.src = torch.rand(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # first touch

    def measure(self, reps: int = 5) -> float:
        """Median of `reps` timed copies (each of 10 launches on a GPU)."""
        launches = 10 if self.device.type == "cuda" else 1
        seconds = []
        for _ in range(reps):
            synchronize(self.device)
            start = time.perf_counter()
            for _ in range(launches):
                self.dst.copy_(self.src)
            synchronize(self.device)
            seconds.append((time.perf_counter() - start) / launches)
        return 2 * self.src.numel() * 4 / statistics.median(seconds) / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig: pytest.Config):
    """``copy_bandwidth(device) -> GB/s``, measured at each call (the range seen is reported)."""
    meters: dict[str, CopyMeter] = {}
    seen = pytestconfig.stash[_COPY]

    def measure(device: torch.device) -> float:
        key = str(device)
        if key not in meters:
            meters[key] = CopyMeter(device)
        gbps = meters[key].measure()
        seen.setdefault(key, []).append(gbps)
        return gbps

    yield measure
    meters.clear()


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
    for device, measured in config.stash[_COPY].items():
        write(
            f"copy bandwidth {device}: {min(measured):.1f}-{max(measured):.1f} GB/s (read + write), "
            f"measured after each benchmark"
        )
    header = (
        f"{'case':<38} {'ours ms':>9} {'ref ms':>9} {'speedup':>8} {'GB/s':>7} {'copy':>7} "
        f"{'% copy':>7}  peers"
    )
    write(header)
    write("-" * len(header))
    for case, impls in by_case.items():
        ours, ref = impls.get("stopkit"), impls.get("torch-sdpa")
        main = ours or ref
        cells = [
            f"{case:<38}",
            f"{ours['seconds'] * 1e3:9.3f}" if ours else f"{'-':>9}",
            f"{ref['seconds'] * 1e3:9.3f}" if ref else f"{'-':>9}",
            f"{ref['seconds'] / ours['seconds']:7.1f}x" if ours and ref else f"{'-':>8}",
            f"{main['gbps']:7.1f}",
            f"{main['copy_gbps']:7.1f}",
            f"{100 * main['fraction']:6.1f}%",
        ]
        peers = [
            f"{name} {r['seconds'] * 1e3:.3f} ms"
            + (f" ({r['seconds'] / ours['seconds']:.2f}x ours)" if ours else "")
            for name, r in impls.items()
            if name not in ("stopkit", "torch-sdpa")
        ]
        write(" ".join(cells) + ("  " + "; ".join(peers) if peers else ""))
    write(
        "GB/s, copy (the copy bandwidth measured right after the timing) and % copy are ours "
        "(the reference's where ours did not run); "
        "speedup = reference time / our time; a peer's (Nx ours) = its time / our time."
    )
