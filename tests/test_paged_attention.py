"""stopkit.ops.paged_attention against the float64 oracle, on every backend (CPU instruction-set
builds, CUDA where present).

Tolerance (flash-attention's rule): float32 within 1e-5 relative of the float64 reference (plus
1e-5 of the output's magnitude); float16/bfloat16 at most twice the error of the same oracle run in
the half dtype itself (torch's own error) plus a tiny epsilon. LSE within 1e-5 relative, ``-inf``
exactly where a query sees nothing.

The conftest runs the tests on 1 thread; the tests of long rows also run the CPU kernels at each
of ``_cpu.KERNEL_THREADS``, where every result must keep its bits (the split plan follows a row's
length only, docs/DESIGN.md section 3).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch
from _cpu import ISA_FLAGS, KERNEL_THREADS, cpu_flags, runnable_isas, using_isa, using_threads
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stopkit import _C, ops, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HUGE_WINDOW = 1 << 20


@dataclass(frozen=True)
class Case:
    batch: int = 4
    q_len: int = 4
    heads: tuple[int, int] = (8, 2)  # (num_heads, num_kv_heads)
    head_dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    suffix: bool = True
    sinks: bool = False
    window: int | None = None
    scale: float | None = None
    seq_lens: tuple[int, ...] | None = None  # None: ragged, with 0 and an exact block multiple


def ragged_lens(batch: int, block_size: int, gen: torch.Generator) -> list[int]:
    """Row lengths cycling through: random, 0, exactly two blocks, 1, random."""

    def rand() -> int:
        return int(torch.randint(1, 3 * block_size, (), generator=gen))

    pattern = [rand, lambda: 0, lambda: 2 * block_size, lambda: 1, rand]
    return [pattern[i % len(pattern)]() for i in range(batch)]


def make_inputs(case: Case, device: torch.device, gen: torch.Generator | None = None) -> dict:
    """Random inputs of ``case`` on ``device``: caches filled everywhere (spare blocks too), a
    shuffled block table whose unused entries hold out-of-range garbage, ragged seq_lens."""
    gen = gen or torch.default_generator
    B, S, D, bs = case.batch, case.q_len, case.head_dim, case.block_size
    H, Hkv = case.heads
    lens = list(case.seq_lens) if case.seq_lens is not None else ragged_lens(B, bs, gen)
    used = [math.ceil(n / bs) for n in lens]
    max_blocks = max(used, default=0) + 1
    num_blocks = sum(used) + 3
    ids = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(-3, 2 * num_blocks, (B, max_blocks), generator=gen)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = ids[start : start + n]
        start += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(case.dtype)

    inputs = dict(
        q=randn(B, S, H, D),
        k_cache=randn(num_blocks, bs, Hkv, D),
        v_cache=randn(num_blocks, bs, Hkv, D),
        block_table=table.to(torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
    )
    if case.suffix:
        inputs.update(suffix_k=randn(B, S, Hkv, D), suffix_v=randn(B, S, Hkv, D))
    if case.sinks:
        inputs["sinks"] = 2 * torch.randn(H, generator=gen)
    return {name: t.to(device) for name, t in inputs.items()}


def upcast(inputs: dict) -> dict:
    return {k: t.double() if t.is_floating_point() else t for k, t in inputs.items()}


def assert_close_to_reference(ours: torch.Tensor, exact: torch.Tensor, torch_half=None) -> None:
    """ours vs the float64 ``exact``; ``torch_half``: the oracle run in ours' half dtype."""
    assert ours.shape == exact.shape
    assert torch.isfinite(ours).all()
    err = (ours.double() - exact).abs()
    if ours.dtype == torch.float32:
        bound = 1e-5 * exact.abs() + 1e-5 * exact.abs().max().clamp_min(1.0)
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), (
            f"float32 error {err.flatten()[worst]:.3g} at flat index "
            f"{worst} (bound {bound.flatten()[worst]:.3g})"
        )
    else:
        torch_err = (torch_half.double() - exact).abs().max()
        eps = 1e-6 * exact.abs().max().clamp_min(1.0)
        assert err.max() <= 2 * torch_err + eps, (
            f"{ours.dtype} error {err.max():.3g} > 2 x torch's {torch_err:.3g}"
        )


def assert_lse_close(lse: torch.Tensor, exact: torch.Tensor) -> None:
    assert lse.dtype == torch.float32 and lse.shape == exact.shape
    empty = torch.isneginf(exact)
    assert torch.equal(torch.isneginf(lse), empty), (
        "lse must be -inf exactly where nothing is visible"
    )
    ours, ref = lse[~empty].double(), exact[~empty]
    assert torch.isfinite(ours).all()
    assert ((ours - ref).abs() <= 1e-5 * (1.0 + ref.abs())).all(), (
        f"lse error {(ours - ref).abs().max():.3g}"
    )


def check(case: Case, device: torch.device, gen: torch.Generator | None = None, threads=()) -> None:
    """ops.paged_attention on random inputs of ``case`` against the float64 oracle; on the CPU, at
    each kernel thread count of ``threads`` too, where it must give the same bits."""
    inputs = make_inputs(case, device, gen)
    kw = dict(scale=case.scale, window=case.window)
    out, lse = ops.paged_attention(**inputs, **kw, return_lse=True)
    assert out.dtype == case.dtype and out.device.type == device.type
    exact, exact_lse = reference.paged_attention(**upcast(inputs), **kw, return_lse=True)
    torch_half = None if case.dtype == torch.float32 else reference.paged_attention(**inputs, **kw)
    assert_close_to_reference(out, exact, torch_half)
    assert_lse_close(lse, exact_lse)
    assert torch.equal(ops.paged_attention(**inputs, **kw), out)  # same result without the LSE
    for n in threads if device.type == "cpu" else ():
        with using_threads(n):
            again, again_lse = ops.paged_attention(**inputs, **kw, return_lse=True)
        assert torch.equal(again, out) and torch.equal(again_lse, lse), f"{n} threads: other bits"


def all_pairs(params: dict[str, list]) -> list[dict]:
    """A small list of cases covering every pair of values of every two parameters (greedy)."""
    names = list(params)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(len(params[names[i]]))
        for b in range(len(params[names[j]]))
    }
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        choice = {i: a, j: b}
        for k in range(len(names)):
            if k not in choice:
                choice[k] = max(
                    range(len(params[names[k]])),
                    key=lambda v: sum(
                        (min(k, m), v if k < m else w, max(k, m), w if k < m else v) in uncovered
                        for m, w in choice.items()
                    ),
                )
        uncovered -= {
            (x, choice[x], y, choice[y]) for x, y in itertools.combinations(range(len(names)), 2)
        }
        cases.append({names[k]: params[names[k]][v] for k, v in choice.items()})
    return cases


GRID = all_pairs(
    {
        "q_len": [1, 2, 4, 16],
        "heads": [(4, 4), (8, 2), (8, 1), (12, 2)],
        "head_dim": [32, 48, 64, 96, 128, 256],
        "block_size": [8, 16, 32, 256],
        "dtype": list(DTYPES),
        "suffix": [False, True],
        "sinks": [False, True],
        "window": [None, 1, 7, HUGE_WINDOW],
        "scale": [None, 0.4],
    }
)


def _case_id(params: dict) -> str:
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in params.items())


@pytest.mark.parametrize("params", GRID, ids=[_case_id(p) for p in GRID])
def test_grid(backend, params):
    check(Case(**params), backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", range(32, 257, 16))
@pytest.mark.parametrize("q_len", [1, 3])  # 2 or 6 queries per kv head: both CPU query layouts
def test_every_head_dim(backend, head_dim, dtype, q_len):
    check(
        Case(
            batch=2,
            q_len=q_len,
            heads=(4, 2),
            head_dim=head_dim,
            block_size=8,
            dtype=dtype,
            sinks=True,
            seq_lens=(13, 24),
        ),
        backend,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("q_len,window", [(1, None), (4, 100)])
def test_long_rows(backend, dtype, block_size, q_len, window):
    """Rows of many pages, ending around multiples of 128 keys (the CPU amx build's blocks of
    tiles), with the suffix and a window that ends inside a block."""
    check(
        Case(
            batch=6,
            q_len=q_len,
            heads=(12, 2),
            head_dim=128,
            block_size=block_size,
            dtype=dtype,
            window=window,
            seq_lens=(127, 128, 129, 300, 1000, 0),
        ),
        backend,
        threads=KERNEL_THREADS,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [96, 128])
@pytest.mark.parametrize("group", [4, 6, 10, 14, 18])
def test_queries_per_kv_head(backend, dtype, head_dim, group):
    """4 queries of 4-18 query heads per kv head: 16, 24, 40, 56 and 72 queries fill 1, 2 (the
    amx build's paired query tiles), 3 (single ones), 4, and 4 + 1 query vectors on the CPU (24, 40
    and 56 end on a half vector: float scores by dim pairs there); head_dim 96 ends the amx build's
    P V on a half round of slot groups. Tiles of 16, 13 and 4 (the suffix) keys."""
    check(
        Case(
            batch=2,
            q_len=4,
            heads=(group, 1),
            head_dim=head_dim,
            block_size=16,
            dtype=dtype,
            window=150,
            seq_lens=(300, 141),
        ),
        backend,
        threads=KERNEL_THREADS,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [3, 5])
def test_rows_4k_apart(backend, dtype, group):
    """8 kv heads of 128 dims: float32 rows 4 KiB apart, where the AVX-512 CPU builds run P V 8
    queries per call instead of 6; 12 and 20 queries per kv head end on a 4-query call."""
    check(
        Case(
            batch=2,
            q_len=4,
            heads=(8 * group, 8),
            head_dim=128,
            block_size=16,
            dtype=dtype,
            seq_lens=(100, 37),
        ),
        backend,
        threads=KERNEL_THREADS,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("group", [5, 6, 7, 8])
def test_decode_groups(backend, dtype, block_size, group):
    """Decode (q_len 1) with 5-8 query heads per kv head (7: Qwen2.5-7B): on the AVX-512 CPU
    builds one 16-lane pass whose float scores run by dim pairs. Tiles of 8, 16 and 5 keys, the
    one-key suffix."""
    check(
        Case(
            batch=3,
            q_len=1,
            heads=(2 * group, 2),
            head_dim=128,
            block_size=block_size,
            dtype=dtype,
            sinks=True,
            window=70,
            seq_lens=(300, 141, 21),
        ),
        backend,
    )


@pytest.mark.parametrize("suffix", [False, True])
@pytest.mark.parametrize("window", [None, 1])
def test_nothing_visible(backend, suffix, window):
    """Rows of length 0 (no suffix: nothing to see, out 0, lse -inf; with sinks: lse = sink)."""
    case = Case(batch=3, q_len=2, seq_lens=(0, 0, 5), suffix=suffix, window=window)
    inputs = make_inputs(case, backend)
    out, lse = ops.paged_attention(**inputs, window=window, return_lse=True)
    if not suffix:
        assert (out[:2] == 0).all() and torch.isneginf(lse[:2]).all()
    inputs["sinks"] = torch.randn(8, device=backend)
    out, lse = ops.paged_attention(**inputs, window=window, return_lse=True)
    if not suffix:
        assert (out[:2] == 0).all()
        torch.testing.assert_close(lse[:2], inputs["sinks"].expand(2, 2, 8), rtol=0, atol=1e-6)
    check(replace(case, sinks=True), backend)


def test_empty_batch(backend):
    inputs = make_inputs(Case(batch=1), backend)
    inputs.update(
        q=inputs["q"][:0],
        block_table=inputs["block_table"][:0],
        seq_lens=inputs["seq_lens"][:0],
        suffix_k=inputs["suffix_k"][:0],
        suffix_v=inputs["suffix_v"][:0],
    )
    out, lse = ops.paged_attention(**inputs, return_lse=True)
    assert out.shape == (0, 4, 8, 64) and lse.shape == (0, 4, 8)


@settings(
    max_examples=examples(20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_configurations(backend, data):
    Hkv = data.draw(st.sampled_from([1, 2, 3, 4]), "num_kv_heads")
    bs = data.draw(st.sampled_from([8, 16, 32, 64, 128, 256]), "block_size")
    batch = data.draw(st.integers(1, 5), "batch")
    case = Case(
        batch=batch,
        q_len=data.draw(st.integers(1, 16), "q_len"),
        heads=(Hkv * data.draw(st.integers(1, 6), "group"), Hkv),
        head_dim=data.draw(st.sampled_from(range(32, 257, 16)), "head_dim"),
        block_size=bs,
        dtype=data.draw(st.sampled_from(DTYPES), "dtype"),
        suffix=data.draw(st.booleans(), "suffix"),
        sinks=data.draw(st.booleans(), "sinks"),
        window=data.draw(st.one_of(st.none(), st.integers(1, 3 * bs)), "window"),
        scale=data.draw(st.one_of(st.none(), st.floats(0.01, 1.0)), "scale"),
        seq_lens=tuple(
            data.draw(st.lists(st.integers(0, 3 * bs), min_size=batch, max_size=batch), "seq_lens")
        ),
    )
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), "seed"))
    check(case, backend, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "extras",
    [dict(), dict(suffix=True, sinks=True), dict(suffix=True, window=40)],
    ids=["plain", "suffix-sinks", "suffix-window"],
)
@pytest.mark.parametrize(
    "shape",
    [dict(batch=1, seq_lens=(3001,)), dict(batch=3, seq_lens=(2000, 0, 20))],
    ids=["one-row", "ragged"],
)
def test_split_context(backend, shape, extras, dtype):
    """One kv head and few rows of up to 3001 keys: the CPU kernels split rows into chunks of keys
    and merge them by LSE, the same bits at every kernel thread count; the CUDA kernel, forced to 1,
    2 and 7 splits, stays within float tolerance. Every result is close to the float64 reference."""
    case = Case(
        q_len=4,
        heads=(4, 1),
        head_dim=128,
        block_size=16,
        dtype=dtype,
        **{"suffix": False, **shape, **extras},
    )
    inputs = make_inputs(case, backend)
    kw = dict(window=case.window)
    exact, exact_lse = reference.paged_attention(**upcast(inputs), **kw, return_lse=True)
    torch_half = None if dtype == torch.float32 else reference.paged_attention(**inputs, **kw)
    results = []
    for n in KERNEL_THREADS if backend.type == "cpu" else (1, 2, 7):
        if backend.type == "cpu":
            with using_threads(n):
                out, lse = ops.paged_attention(**inputs, **kw, return_lse=True)
        else:  # the CUDA kernel's split count, forced
            from stopkit import _C_cuda

            _C_cuda.set_num_splits(n)
            try:
                out, lse = ops.paged_attention(**inputs, **kw, return_lse=True)
            finally:
                _C_cuda.set_num_splits(0)
        assert_close_to_reference(out, exact, torch_half)
        assert_lse_close(lse, exact_lse)
        results.append((out, lse))
    for out, lse in results[1:]:
        if backend.type == "cpu":
            assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
            continue
        if dtype == torch.float32:
            torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-6, atol=1e-6)


def rows_of(inputs: dict, rows: list[int]) -> dict:
    """The inputs of a batch made of ``rows`` of another (any order, repeats allowed): its queries,
    block table rows, lengths and suffix rows; the caches are shared."""
    index = torch.tensor(rows, dtype=torch.long)
    per_row = ("q", "block_table", "seq_lens", "suffix_k", "suffix_v")
    return {k: t[index] if k in per_row else t for k, t in inputs.items()}


# Rows of several of the CPU kernels' chunks of keys, of one chunk exactly, just over one, of one page
# and empty: the work of the batch and of its longest row alone is large enough for the kernels to
# start their threads.
SPLIT = _C.split_keys()
COMPOSITION_LENS = (3 * SPLIT - 36, 0, SPLIT + 18, 37, 2 * SPLIT + 76, SPLIT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,window", [(1, None), (4, None), (4, 700)])
def test_rows_keep_their_bits_across_batches_and_threads(dtype, q_len, window):
    """On every CPU build this processor runs and at each of KERNEL_THREADS kernel threads, a row's
    output and LSE are the same bits as the row alone on 1 thread: in its batch, in a pruned batch
    (rows kept in order) and in a larger shuffled batch with repeats (the split plan follows the
    row's length only); the batch is close to the float64 reference."""
    case = Case(
        batch=len(COMPOSITION_LENS),
        q_len=q_len,
        heads=(8, 2),
        head_dim=128,
        block_size=16,
        dtype=dtype,
        sinks=True,
        window=window,
        seq_lens=COMPOSITION_LENS,
    )
    inputs = make_inputs(case, torch.device("cpu"))
    exact, exact_lse = reference.paged_attention(**upcast(inputs), window=window, return_lse=True)
    torch_half = (
        None if dtype == torch.float32 else reference.paged_attention(**inputs, window=window)
    )
    B = case.batch
    batches = [list(range(B)), [0, 2, 4], [4, 1, 5, 0, 3, 2, 0, 4, 2]]
    for isa in runnable_isas():
        with using_isa(isa):
            alone = [
                ops.paged_attention(**rows_of(inputs, [b]), window=window, return_lse=True)
                for b in range(B)
            ]
            for n, rows in itertools.product(KERNEL_THREADS, batches):
                with using_threads(n):
                    out, lse = ops.paged_attention(
                        **rows_of(inputs, rows), window=window, return_lse=True
                    )
                for i, b in enumerate(rows):
                    where = f"{isa}, {n} threads, row {b} in batch {rows}"
                    assert torch.equal(out[i], alone[b][0][0]), (
                        f"{where}: output differs from the row alone"
                    )
                    assert torch.equal(lse[i], alone[b][1][0]), (
                        f"{where}: lse differs from the row alone"
                    )
        assert_close_to_reference(torch.cat([a[0] for a in alone]), exact, torch_half)
        assert_lse_close(torch.cat([a[1] for a in alone]), exact_lse)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_torch_set_num_threads_sets_the_kernel_threads(n):
    """torch and the CPU kernels share one OpenMP runtime: torch's thread count is the kernels'."""
    with using_threads(n):
        assert _C.num_threads() == n


def _default_isa_in_a_fresh_process() -> str:
    """The build the module picks when loaded afresh (this process's choice may have been set)."""
    load = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.isa())"
    )
    env = {k: v for k, v in os.environ.items() if k != "STOPKIT_CPU_ISA"}
    done = subprocess.run(
        [sys.executable, "-c", load, _C.__file__],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_dispatch_picks_the_best_build_the_processor_runs():
    """The default build is the most capable one compiled in whose instruction sets /proc/cpuinfo
    lists."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("needs /proc/cpuinfo of an x86 processor")
    assert _C.isas()[0] == "generic" and set(_C.isas()) <= set(ISA_FLAGS), (
        "a build _cpu.ISA_FLAGS lacks"
    )
    assert _default_isa_in_a_fresh_process() == runnable_isas()[-1]


def test_set_isa_refuses_builds_the_processor_cannot_run():
    default = _C.isa()
    try:
        for isa in _C.isas():
            if isa in runnable_isas():
                _C.set_isa(isa)
                assert _C.isa() == isa
            else:
                with pytest.raises(
                    ValueError, match=f"^stopkit: isa {isa}: this processor cannot run"
                ):
                    _C.set_isa(isa)
        with pytest.raises(
            ValueError, match=r"isa must be a build this module has .*generic.*, got sse9$"
        ):
            _C.set_isa("sse9")
    finally:
        _C.set_isa(default)


def test_strided_inputs(backend):
    """Non-contiguous q, suffix, sinks, block_table and seq_lens give the contiguous result."""
    case = Case(batch=3, q_len=4, heads=(8, 2), head_dim=64, suffix=True, sinks=True, window=30)
    inputs = make_inputs(case, backend)
    B, S, H, D = inputs["q"].shape
    strided = dict(inputs)
    q_t = torch.randn(B, H, S, D, device=backend).to(
        case.dtype
    )  # [B, H, S, D] seen as [B, S, H, D]
    q_t.copy_(inputs["q"].transpose(1, 2))
    strided["q"] = q_t.transpose(1, 2)
    for name in ("suffix_k", "suffix_v"):  # every other token of a wider tensor
        wide = torch.randn(B, 2 * S, *inputs[name].shape[2:], device=backend).to(case.dtype)
        wide[:, ::2] = inputs[name]
        strided[name] = wide[:, ::2]
    for name in ("block_table", "seq_lens", "sinks"):  # every other column / entry
        t = inputs[name]
        wide = torch.cat([t, t], dim=-1)
        wide[..., ::2] = t
        strided[name] = wide[..., ::2]
    assert not any(
        strided[n].is_contiguous()
        for n in ("q", "suffix_k", "suffix_v", "block_table", "seq_lens", "sinks")
    )
    expected = ops.paged_attention(**inputs, window=30, return_lse=True)
    got = ops.paged_attention(**strided, window=30, return_lse=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_noncontiguous_cache_rejected(device, name):
    inputs = make_inputs(Case(), device)
    c = inputs[name]
    inputs[name] = torch.cat([c, c], dim=-1)[..., ::2]  # same shape and values, strided
    with pytest.raises(ValueError, match=name):
        ops.paged_attention(**inputs)


def test_native_checks_block_ids():
    """With check_indices=False the kernel itself still refuses an out-of-range block id."""
    inputs = make_inputs(Case(batch=2, seq_lens=(20, 9)), torch.device("cpu"))
    inputs["block_table"][1, 0] = inputs["k_cache"].shape[0]
    with pytest.raises(ValueError, match="block_table"):
        ops.paged_attention(**inputs, check_indices=False)


@pytest.mark.parametrize("bad", [-1, 10_000])
def test_native_checks_seq_lens(bad):
    """With check_indices=False the kernel itself still refuses a length the block table cannot hold."""
    inputs = make_inputs(Case(batch=2, seq_lens=(20, 9)), torch.device("cpu"))
    inputs["seq_lens"][1] = bad
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_attention(**inputs, check_indices=False)


# ---- bad input: each rule of the foundation issue, the exception type, and the argument named ----


def _set(**changes):
    def apply(kw: dict) -> None:
        kw.update({k: (v(kw) if callable(v) else v) for k, v in changes.items()})

    return apply


def _poke(name: str, index: tuple, value):
    def apply(kw: dict) -> None:
        kw[name] = kw[name].clone()
        kw[name][index] = value

    return apply


META = torch.device("meta")
BAD = {  # id: (change to a valid call, exception, pattern the message must match)
    "q-not-tensor": (_set(q=lambda kw: kw["q"].tolist()), TypeError, "^q must be a torch.Tensor"),
    "q-dtype": (_set(q=lambda kw: kw["q"].double()), TypeError, "^q must be"),
    "q-int": (_set(q=lambda kw: kw["q"].int()), TypeError, "^q must be"),
    "q-device": (
        _set(
            **{
                n: (lambda kw, n=n: kw[n].to(META))
                for n in (
                    "q",
                    "k_cache",
                    "v_cache",
                    "block_table",
                    "seq_lens",
                    "suffix_k",
                    "suffix_v",
                )
            }
        ),
        ValueError,
        "^q must be on",
    ),
    "k_cache-dtype": (
        _set(k_cache=lambda kw: kw["k_cache"].half()),
        TypeError,
        "^k_cache must be float32",
    ),
    "v_cache-dtype": (
        _set(v_cache=lambda kw: kw["v_cache"].bfloat16()),
        TypeError,
        "^v_cache must be float32",
    ),
    "suffix_k-dtype": (
        _set(suffix_k=lambda kw: kw["suffix_k"].half()),
        TypeError,
        "^suffix_k must be float32",
    ),
    "block_table-dtype": (
        _set(block_table=lambda kw: kw["block_table"].long()),
        TypeError,
        "^block_table must be int32",
    ),
    "seq_lens-dtype": (
        _set(seq_lens=lambda kw: kw["seq_lens"].long()),
        TypeError,
        "^seq_lens must be int32",
    ),
    "sinks-dtype": (_set(sinks=torch.randn(8).half()), TypeError, "^sinks must be float32"),
    "k_cache-device": (
        _set(k_cache=lambda kw: kw["k_cache"].to(META)),
        ValueError,
        "^k_cache must be on",
    ),
    "block_table-device": (
        _set(block_table=lambda kw: kw["block_table"].to(META)),
        ValueError,
        "^block_table must be on",
    ),
    "seq_lens-device": (
        _set(seq_lens=lambda kw: kw["seq_lens"].to(META)),
        ValueError,
        "^seq_lens must be on",
    ),
    "q-rank": (_set(q=lambda kw: kw["q"][0]), ValueError, "^q must have 4 dimensions"),
    "k_cache-rank": (
        _set(k_cache=lambda kw: kw["k_cache"][None]),
        ValueError,
        "^k_cache must have 4 dimensions",
    ),
    "block_table-rank": (
        _set(block_table=lambda kw: kw["block_table"][0]),
        ValueError,
        "^block_table must have 2",
    ),
    "seq_lens-rank": (
        _set(seq_lens=lambda kw: kw["seq_lens"][None]),
        ValueError,
        "^seq_lens must have 1",
    ),
    "v_cache-shape": (
        _set(v_cache=lambda kw: kw["v_cache"][1:]),
        ValueError,
        "^v_cache must have shape",
    ),
    "suffix_k-shape": (
        _set(suffix_k=lambda kw: kw["suffix_k"][:, :, :1]),
        ValueError,
        "^suffix_k must have shape",
    ),
    "suffix_v-shape": (
        _set(suffix_v=lambda kw: kw["suffix_v"][:, :2]),
        ValueError,
        "^suffix_v must have shape",
    ),
    "sinks-shape": (_set(sinks=torch.randn(4)), ValueError, "^sinks must have shape"),
    "heads-not-multiple": (
        _set(q=lambda kw: kw["q"][:, :, :7]),
        ValueError,
        "num_heads .* multiple of num_kv_heads",
    ),
    "q_len-0": (
        _set(q=lambda kw: kw["q"][:, :0], suffix_k=None, suffix_v=None),
        ValueError,
        "^q_len .* 1..16",
    ),
    "q_len-17": (
        _set(q=lambda kw: kw["q"][:, :1].expand(-1, 17, -1, -1), suffix_k=None, suffix_v=None),
        ValueError,
        "^q_len .* 1..16, got 17",
    ),
    "head_dim-mismatch": (
        _set(
            k_cache=lambda kw: kw["k_cache"][..., :32].contiguous(),
            v_cache=lambda kw: kw["v_cache"][..., :32].contiguous(),
        ),
        ValueError,
        "head_dim",
    ),
    **{
        f"head_dim-{d}": (
            _set(
                **{
                    n: (lambda kw, n=n, d=d: torch.randn(*kw[n].shape[:-1], d))
                    for n in ("q", "k_cache", "v_cache", "suffix_k", "suffix_v")
                }
            ),
            ValueError,
            f"^head_dim must be a multiple of 16 in 32..256, got {d}",
        )
        for d in (16, 40, 272)
    },
    **{
        f"block_size-{bs}": (
            _set(
                **{
                    n: (lambda kw, n=n, bs=bs: torch.randn(40, bs, 2, 64))
                    for n in ("k_cache", "v_cache")
                }
            ),
            ValueError,
            "^block_size",
        )
        for bs in (4, 12, 512)
    },
    "suffix_k-alone": (_set(suffix_v=None), ValueError, "suffix_k and suffix_v"),
    "suffix_v-alone": (_set(suffix_k=None), ValueError, "suffix_k and suffix_v"),
    "block_table-batch": (
        _set(block_table=lambda kw: kw["block_table"][:2]),
        ValueError,
        "^block_table must have one row",
    ),
    "seq_lens-batch": (
        _set(seq_lens=lambda kw: kw["seq_lens"][:2]),
        ValueError,
        "^seq_lens must have shape",
    ),
    "suffix-batch": (
        _set(suffix_k=lambda kw: kw["suffix_k"][:2], suffix_v=lambda kw: kw["suffix_v"][:2]),
        ValueError,
        "^suffix_k must have shape",
    ),
    "block-id-high": (
        _poke("block_table", (0, 0), 10_000),
        ValueError,
        r"^block_table\[0, 0\] = 10000 .* \[0, ",
    ),
    "block-id-negative": (
        _poke("block_table", (2, 1), -1),
        ValueError,
        r"^block_table\[2, 1\] = -1",
    ),
    "seq_lens-negative": (_poke("seq_lens", (1,), -1), ValueError, "^seq_lens must be >= 0"),
    "seq_lens-beyond-table": (
        _set(
            seq_lens=lambda kw: torch.full_like(kw["seq_lens"], kw["block_table"].shape[1] * 16 + 1)
        ),
        ValueError,
        "^seq_lens must be <= max_blocks_per_row",
    ),
    "window-0": (_set(window=0), ValueError, "^window must be a positive int"),
    "window-float": (_set(window=2.5), ValueError, "^window must be a positive int"),
    "scale-nan": (_set(scale=float("nan")), ValueError, "^scale must be a finite float"),
    "scale-str": (_set(scale="0.1"), ValueError, "^scale must be a finite float"),
}


@pytest.mark.parametrize("rule", BAD)
def test_bad_input(rule):
    kw = make_inputs(Case(batch=3, seq_lens=(5, 0, 40)), torch.device("cpu"))
    kw["sinks"] = torch.randn(8)
    change, exc, pattern = BAD[rule]
    change(kw)
    with pytest.raises(exc, match=pattern):
        ops.paged_attention(**kw)


def test_block_ids_past_the_used_range_are_ignored():
    """Entries of a row past ceil(seq_lens / block_size) may hold anything (e.g. -1 padding)."""
    kw = make_inputs(Case(batch=2, seq_lens=(17, 3)), torch.device("cpu"))
    kw["block_table"][0, 2:] = -1
    kw["block_table"][1, 1:] = 1 << 30
    out = ops.paged_attention(**kw)
    assert_close_to_reference(out, reference.paged_attention(**upcast(kw)))


@pytest.mark.skipif(not ops.cuda_available(), reason="needs stopkit's CUDA kernels and a GPU")
def test_cuda_skips_out_of_range_block_ids():
    """check_indices=False with an in-use id past the cache: the CUDA kernel masks that page."""
    kw = make_inputs(Case(batch=2, seq_lens=(20, 9), suffix=False), torch.device("cuda"))
    kw["block_table"][1, 0] = kw["k_cache"].shape[0] + 100  # row 1's only page
    out, lse = ops.paged_attention(**kw, check_indices=False, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
