"""The CPU kernels' threads and instruction-set builds as the tests see them, independently of
stopkit's own dispatch (which the tests check against these).

The conftest runs the tests on 1 thread, and torch and the kernels share one OpenMP runtime, so
tests of the kernels' threads set them explicitly: ``using_threads(n)`` the way users do
(torch.set_num_threads), or the ``kernel_threads`` fixture (import it into the test module), one
test per count of KERNEL_THREADS. ``using_isa(isa)`` runs one CPU build.
"""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stopkit import _C

# 3 and 32 are not powers of two, and 32 is more threads than most machines have cores.
KERNEL_THREADS = (1, 2, 3, 4, 8, 32)

# What each build needs, as /proc/cpuinfo names the flags (the builds' -m options in
# CMakeLists.txt). amx also needs the OS to grant the tiles, which Linux does from 5.16 on.
_AVX2 = {"avx2", "fma", "f16c"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ISA_FLAGS = {
    "generic": set(),
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512bf16": _AVX512 | {"avx512_bf16"},
    "amx": _AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16"},
}


def cpu_flags() -> set[str] | None:
    """The processor's flags from /proc/cpuinfo (x86 Linux); None where there is none to read."""
    path = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64") or not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def runnable_isas() -> tuple[str, ...]:
    """The builds compiled in that this processor runs, by its flags. Without /proc/cpuinfo:
    generic and the dispatch's own choice."""
    flags = cpu_flags()
    if flags is None:
        return tuple(dict.fromkeys(("generic", _C.isa())))
    if _linux_version() < (5, 16):
        flags -= {"amx_tile"}  # listed, but the OS hands out no tiles
    return tuple(isa for isa in _C.isas() if isa in ISA_FLAGS and ISA_FLAGS[isa] <= flags)


def _linux_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Runs the block with torch's (and so the kernels') thread count set to n."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def using_isa(isa: str) -> Iterator[None]:
    """Runs the block on one CPU build of paged_attention."""
    before = _C.isa()
    _C.set_isa(isa)
    try:
        yield
    finally:
        _C.set_isa(before)


@pytest.fixture(params=KERNEL_THREADS, ids=lambda n: f"threads{n}")
def kernel_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    with using_threads(request.param):
        yield request.param
