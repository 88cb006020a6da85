"""Fixtures shared by the tests: the device under test, the CPU instruction-set builds, and a
per-test random seed (fresh random inputs that still reproduce: the seed depends on the test id).

Hypothesis profiles, chosen by ``HYPOTHESIS_PROFILE`` (when unset: ``ci`` if ``CI`` is set, else
hypothesis' ``default``): ``ci`` draws the same examples every run (derandomized, no example
database; a failure prints its reproduce blob), so a CI failure reproduces from its log; ``dev``
draws fresh examples, five times as many. A test that sets its own count uses ``examples(n)``.

``device``  -- "cpu" always, "cuda" when stopkit's CUDA kernels and a GPU are present.
``backend`` -- a torch.device for each paged_attention backend: every CPU instruction-set build
               this processor runs (generic, avx2, avx512, avx512bf16, amx; restored
               afterwards) and CUDA.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import settings

from stopkit import _C, ops

# Ordered: a processor running one runs those before it.
ISAS = ("generic", "avx2", "avx512", "avx512bf16", "amx")
_NO_CUDA = "needs stopkit's CUDA kernels and a GPU"

# The torch oracles run on tiny tensors, where intra-op threads only cost (tenfold on a busy 2-core
# machine). stopkit's own kernels keep their threads: ops set them from torch at import, above.
torch.set_num_threads(1)


settings.register_profile(
    "ci", max_examples=100, derandomize=True, database=None, print_blob=True, deadline=None
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


def examples(n: int) -> int:
    """A hypothesis test's example count: ``n`` (its count in CI), scaled as the loaded profile
    scales hypothesis' default of 100 (five times in ``dev``)."""
    return max(1, n * settings.default.max_examples // 100)


def supported_isas() -> tuple[str, ...]:
    """The instruction-set builds of paged_attention this processor runs (the default is the best)."""
    return ISAS[: ISAS.index(_C.isa()) + 1] if _C.isa() in ISAS else (_C.isa(),)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> int:
    """Seed torch from the test id (override with STOPKIT_TEST_SEED to draw other inputs)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("STOPKIT_TEST_SEED", "0"))
    torch.manual_seed(seed)
    return seed


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not ops.cuda_available(), reason=_NO_CUDA)),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(
    params=[f"cpu-{isa}" for isa in ISAS]
    + [pytest.param("cuda", marks=pytest.mark.skipif(not ops.cuda_available(), reason=_NO_CUDA))]
)
def backend(request: pytest.FixtureRequest):
    if request.param == "cuda":
        yield torch.device("cuda")
        return
    isa = request.param.removeprefix("cpu-")
    if isa not in supported_isas():
        pytest.skip(f"this processor does not run the {isa} build")
    default = _C.isa()
    _C.set_isa(isa)
    try:
        yield torch.device("cpu")
    finally:
        _C.set_isa(default)


@pytest.fixture
def num_threads():
    """Restores the CPU kernels' thread count after a test that changes it."""
    before = _C.num_threads()
    yield before
    _C.set_num_threads(before)
