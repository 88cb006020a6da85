"""paged_attention: stopkit against the torch reference (gather the pages, then SDPA with
enable_gqa) in the same run, and against FlashInfer / flash-attn on CUDA when they import.

Shapes (issue 2): DeepSeek-R1-Distill-Qwen-1.5B (B=32, context 2048, 12/2 heads, head_dim 128) and
an 8B-class model (B=64, context 4096, 32/8 heads, head_dim 128); on CUDA also B=64, context 16384.
q_len 1 (decode) and 4; float32 and bfloat16; block size 16, shuffled block table, no suffix (every
query reads the whole context). Each benchmark records in ``extra_info`` the KV bytes read, the
achieved GB/s, its fraction of the device's measured copy bandwidth and (ours and peers) the
reference time / its time. Only one shape's caches are held at a time (tests run shape by shape).
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass

import pytest
import torch

from stopkit import _C, ops, reference
from stopkit.cache import zeros_kv_storage

OURS, REFERENCE = "stopkit", "torch-sdpa"  # the names the summary table (conftest.py) looks for

BLOCK_SIZE = 16
SHAPES = {  # name: (batch, context, num_heads, num_kv_heads, head_dim, devices)
    "1.5B": (32, 2048, 12, 2, 128, ("cpu", "cuda")),
    "8B": (64, 4096, 32, 8, 128, ("cpu", "cuda")),
    "8B-16k": (64, 16384, 32, 8, 128, ("cuda",)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@dataclass(frozen=True)
class Case:
    device: str
    shape: str
    q_len: int
    dtype: str

    @property
    def id(self) -> str:
        B, ctx, H, Hkv, _, _ = SHAPES[self.shape]
        return f"{self.device}-{self.shape}-B{B}-ctx{ctx}-H{H}-KV{Hkv}-q{self.q_len}-{self.dtype}"


def impls(case: Case) -> list[str]:
    """The reference first: the others divide its time by theirs."""
    names = [REFERENCE, OURS]
    if case.device == "cuda" and case.dtype != "fp32":  # the peers have no float32 kernels
        names += ["flashinfer"] * HAVE_FLASHINFER + ["flash-attn"] * HAVE_FLASH_ATTN
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"case", "impl"} <= set(metafunc.fixturenames):
        wanted = [d.strip() for d in metafunc.config.getoption("--bench-devices").split(",")]
        devices = [
            d for d in ("cpu", "cuda") if d in wanted and (d == "cpu" or ops.cuda_available())
        ]
        pairs = [
            (Case(dev, shape, q_len, dt), impl)
            for dev in devices
            for shape, spec in SHAPES.items()
            if dev in spec[-1]
            for dt in DTYPES
            for q_len in (1, 4)
            for impl in impls(Case(dev, shape, q_len, dt))
        ]
        metafunc.parametrize("case,impl", pairs, ids=[f"{c.id}-{i}" for c, i in pairs])


class Inputs:
    """Session cache holding one (device, shape, dtype)'s paged caches at a time."""

    def __init__(self) -> None:
        self.key = None
        self.kv: dict = {}
        self.outputs: dict[Case, torch.Tensor] = {}  # the reference's output per case
        self.seconds: dict[Case, float] = {}  # the reference's median time per case

    def get(self, case: Case) -> dict:
        key = (case.device, case.shape, case.dtype)
        if key != self.key:
            self.kv.clear()
            gc.collect()
            if case.device == "cuda":
                torch.cuda.empty_cache()
            self.kv = self._make(*key)
            self.key = key
        B, _, H, _, D, _ = SHAPES[case.shape]
        gen = torch.Generator().manual_seed(case.q_len)
        q = torch.randn(B, case.q_len, H, D, generator=gen).to(DTYPES[case.dtype]).to(case.device)
        return dict(q=q, **{k: v for k, v in self.kv.items() if not k.startswith("_")})

    @staticmethod
    def _make(device: str, shape: str, dtype: str) -> dict:
        B, ctx, _, Hkv, D, _ = SHAPES[shape]
        per_row = ctx // BLOCK_SIZE
        num_blocks = B * per_row
        gen = torch.Generator().manual_seed(0)

        def cache() -> torch.Tensor:
            # allocated as PagedKVCache allocates its storage (huge pages on a Linux CPU)
            out = zeros_kv_storage((num_blocks, BLOCK_SIZE, Hkv, D), DTYPES[dtype], device)
            for chunk in out.split(max(1, num_blocks // 16)):  # bounded float32 temporaries
                chunk.copy_(torch.randn(chunk.shape, generator=gen))
            return out

        return dict(
            k_cache=cache(),
            v_cache=cache(),
            block_table=torch.randperm(num_blocks, generator=gen, dtype=torch.int32)
            .view(B, per_row)
            .to(device),
            seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
        )

    def flash_attn_cache(self) -> dict:
        """The same KV as 256-token pages (flash-attn's paged mode needs page sizes % 256 == 0)."""
        if "_fa" not in self.kv:
            kv = self.kv
            B, M = kv["block_table"].shape

            def gather(c: torch.Tensor) -> torch.Tensor:  # [B, ctx, Hkv, D]
                return reference.gather_pages(c, kv["block_table"])

            pages = B * M * BLOCK_SIZE // 256
            perm = torch.randperm(pages, device=kv["k_cache"].device)
            k, v = (
                gather(c).reshape(pages, 256, *c.shape[2:])[perm]
                for c in (kv["k_cache"], kv["v_cache"])
            )
            table = torch.argsort(perm).to(torch.int32).view(B, -1)
            kv["_fa"] = dict(k_cache=k, v_cache=v, block_table=table)
        return kv["_fa"]


@pytest.fixture(scope="session")
def inputs() -> Inputs:
    return Inputs()


def make_fn(impl: str, case: Case, x: dict, store: Inputs):
    """A zero-argument callable running ``impl`` on inputs ``x``; its result is [B, S, H, D]."""
    if impl == OURS:
        return lambda: ops.paged_attention(**x, check_indices=False)
    if impl == REFERENCE:
        return lambda: reference.paged_attention_sdpa(**x)
    B, S, H, D = x["q"].shape
    Hkv = x["k_cache"].shape[2]
    if impl == "flash-attn":
        from flash_attn import flash_attn_with_kvcache

        fa = store.flash_attn_cache()
        return lambda: flash_attn_with_kvcache(
            x["q"],
            fa["k_cache"],
            fa["v_cache"],
            cache_seqlens=x["seq_lens"],
            block_table=fa["block_table"],
            causal=False,
        )
    if impl == "flashinfer":
        import flashinfer

        device, M = x["q"].device, x["block_table"].shape[1]
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        kv_indptr = torch.arange(B + 1, dtype=torch.int32, device=device) * M
        kv_indices = x["block_table"].flatten()
        last_page_len = (x["seq_lens"] - 1) % BLOCK_SIZE + 1
        dtype = x["q"].dtype
        paged = (x["k_cache"], x["v_cache"])
        if S == 1:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
            w.plan(
                kv_indptr,
                kv_indices,
                last_page_len,
                H,
                Hkv,
                D,
                BLOCK_SIZE,
                q_data_type=dtype,
                kv_data_type=dtype,
            )
            q = x["q"].view(B, H, D)
        else:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
            qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=device) * S
            w.plan(
                qo_indptr,
                kv_indptr,
                kv_indices,
                last_page_len,
                H,
                Hkv,
                D,
                BLOCK_SIZE,
                causal=False,
                q_data_type=dtype,
                kv_data_type=dtype,
            )
            q = x["q"].view(B * S, H, D)
        return lambda: w.run(q, paged).view(B, S, H, D)
    raise ValueError(f"unknown implementation {impl}")


def test_paged_attention(
    benchmark, case: Case, impl: str, inputs: Inputs, copy_bandwidth, bench_results
):
    device = torch.device(case.device)
    x = inputs.get(case)
    fn = make_fn(impl, case, x, inputs)
    out = fn()  # also the warm-up round
    if impl == REFERENCE:
        inputs.outputs[case] = out
    elif case in inputs.outputs:  # never time a wrong result
        ref = inputs.outputs[case].float()
        tol = 1e-4 if case.dtype == "fp32" else 2e-2
        err = (out.float() - ref).abs().max()
        assert err <= tol * ref.abs().max(), f"{impl} differs from the reference by {err:.3g}"
    del out

    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    slow = impl == REFERENCE  # up to seconds a call on the CPU: 3 rounds; ours: a median of 15
    if case.device == "cpu":
        benchmark.pedantic(run, rounds=3 if slow else 15, iterations=1)
    else:  # several launches per synchronisation
        benchmark.pedantic(
            run, rounds=3 if slow else 10, iterations=2 if slow else 10, warmup_rounds=1
        )
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    seconds = benchmark.stats.stats.median
    kv_bytes = (
        2
        * int(x["seq_lens"].sum())
        * x["k_cache"].shape[2]
        * x["k_cache"].shape[3]
        * x["k_cache"].element_size()
    )
    gbps = kv_bytes / seconds / 1e9
    copy_gbps = copy_bandwidth(device)
    info = dict(
        kv_bytes=kv_bytes,
        gbps=gbps,
        copy_gbps=copy_gbps,
        copy_fraction=gbps / copy_gbps,
        threads=_C.num_threads() if case.device == "cpu" else None,
        isa=_C.isa() if case.device == "cpu" else None,
    )
    if impl == REFERENCE:
        inputs.seconds[case] = seconds
    elif case in inputs.seconds:
        info.update(
            reference_seconds=inputs.seconds[case],
            speedup_vs_reference=inputs.seconds[case] / seconds,
        )
    benchmark.extra_info.update(info)
    bench_results.append(
        dict(
            case=case.id,
            impl=impl,
            seconds=seconds,
            gbps=gbps,
            copy_gbps=copy_gbps,
            fraction=gbps / copy_gbps,
        )
    )
