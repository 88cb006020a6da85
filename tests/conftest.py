"""Fixtures shared by the tests: the device under test, the CPU instruction-set builds, the CPU
kernels' thread count, and a per-test random seed (fresh random inputs that still reproduce: the
seed depends on the test id).

``device``         -- "cpu" always, "cuda" when stopkit's CUDA kernels and a GPU are present.
``backend``        -- a torch.device for each paged_attention backend: every CPU instruction-set
                      build compiled in that this processor runs (``runnable_isas``; restored
                      afterwards) and CUDA.
``cpu_backend``    -- the same, CPU builds only.
``kernel_threads`` -- each of KERNEL_THREADS as the CPU kernels' thread count (restored afterwards).
"""

from __future__ import annotations

import os
import platform
import zlib
from pathlib import Path

import pytest
import torch

from stopkit import _C, ops

_NO_CUDA = "needs stopkit's CUDA kernels and a GPU"
KERNEL_THREADS = (1, 2, 3, 4, 8, 32)

# What each CPU build needs, as /proc/cpuinfo names the flags (the builds' -m options in
# CMakeLists.txt; amx also needs the OS to grant the tiles, which Linux does from 5.16).
ISA_FLAGS = {
    "generic": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
    "amx": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
            "amx_tile", "amx_bf16"},
}

# The torch oracles run on tiny tensors, where intra-op threads only cost (tenfold on a busy 2-core
# machine). torch and stopkit's CPU kernels share one OpenMP runtime, so this makes the kernels
# single-threaded too: the tests of their threads set them explicitly (kernel_threads).
torch.set_num_threads(1)


def cpu_flags() -> set[str] | None:
    """The processor's flags from /proc/cpuinfo (x86 Linux), None where there is none to read."""
    path = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def runnable_isas() -> tuple[str, ...]:
    """The builds compiled in that this processor runs, by its own flags (not by stopkit's dispatch,
    which tests check against them). Without /proc/cpuinfo: generic, and the dispatch's choice."""
    flags = cpu_flags()
    if flags is None:
        return tuple(dict.fromkeys(("generic", _C.isa())))
    return tuple(isa for isa in _C.isas() if isa in ISA_FLAGS and ISA_FLAGS[isa] <= flags)


def pytest_report_header(config: pytest.Config) -> str:
    return (f"stopkit CPU builds: compiled {', '.join(_C.isas())}; tested {', '.join(runnable_isas())}; "
            f"default {_C.isa()}")


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> int:
    """Seed torch from the test id (override with STOPKIT_TEST_SEED to draw other inputs)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("STOPKIT_TEST_SEED", "0"))
    torch.manual_seed(seed)
    return seed


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not ops.cuda_available(), reason=_NO_CUDA))])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _use_isa(isa: str):
    if isa not in runnable_isas():
        pytest.skip(f"this processor does not run the {isa} build")
    default = _C.isa()
    _C.set_isa(isa)
    try:
        yield torch.device("cpu")
    finally:
        _C.set_isa(default)


@pytest.fixture(params=[f"cpu-{isa}" for isa in _C.isas()] + [pytest.param("cuda", marks=pytest.mark.skipif(
    not ops.cuda_available(), reason=_NO_CUDA))])
def backend(request: pytest.FixtureRequest):
    if request.param == "cuda":
        yield torch.device("cuda")
    else:
        yield from _use_isa(request.param.removeprefix("cpu-"))


@pytest.fixture(params=[f"cpu-{isa}" for isa in _C.isas()])
def cpu_backend(request: pytest.FixtureRequest):
    yield from _use_isa(request.param.removeprefix("cpu-"))


@pytest.fixture
def num_threads():
    """Restores the CPU kernels' thread count after a test that changes it."""
    before = _C.num_threads()
    yield before
    _C.set_num_threads(before)


@pytest.fixture(params=KERNEL_THREADS, ids=lambda n: f"threads{n}")
def kernel_threads(request: pytest.FixtureRequest, num_threads) -> int:
    """The CPU kernels (and torch: one OpenMP runtime) on request.param threads for the test."""
    _C.set_num_threads(request.param)
    return request.param
