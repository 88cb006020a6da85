"""CUDA-only behaviour of stopkit's kernels (skipped without a GPU): the launch plan against the
runtime's occupancy, plans forced to a 99 KB part's limit, the split-KV workspace from torch's
allocator, tensors on a device other than the current one, and CUDA-graph capture of a decode
step. bench/device_check.sh runs these on a lent GPU."""

from __future__ import annotations

import pytest
import torch

from stopkit import ops, reference

pytestmark = pytest.mark.skipif(
    not ops.cuda_available(), reason="needs stopkit's CUDA kernels and a GPU"
)

if ops.cuda_available():
    from stopkit import _C_cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SMEM_99KB = 101_376


def paged_inputs(
    device,
    *,
    dtype=torch.bfloat16,
    batch=3,
    q_len=1,
    heads=(8, 2),
    head_dim=128,
    block_size=16,
    lens=(300, 17, 1000),
    suffix=False,
) -> dict:
    """Random inputs: rows of `lens` cached tokens on shuffled blocks (spare blocks filled too)."""
    H, Hkv = heads
    used = [-(-n // block_size) for n in lens]
    num_blocks = sum(used) + 2
    ids = torch.randperm(num_blocks)
    table = torch.full((batch, max(used) + 1), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(used):
        table[b, :n] = ids[at : at + n]
        at += n
    kw = dict(
        q=torch.randn(batch, q_len, H, head_dim),
        k_cache=torch.randn(num_blocks, block_size, Hkv, head_dim),
        v_cache=torch.randn(num_blocks, block_size, Hkv, head_dim),
        block_table=table,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
    )
    if suffix:
        kw.update(
            suffix_k=torch.randn(batch, q_len, Hkv, head_dim),
            suffix_v=torch.randn(batch, q_len, Hkv, head_dim),
        )
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in kw.items()}


def assert_matches_reference(out, lse, kw, **options):
    exact, exact_lse = reference.paged_attention(
        **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()},
        **options,
        return_lse=True,
    )
    half = None if out.dtype == torch.float32 else reference.paged_attention(**kw, **options)
    err = (out.double() - exact).abs().max()
    bound = (
        1e-5 * exact.abs().max().clamp_min(1.0)
        if out.dtype == torch.float32
        else 2 * (half.double() - exact).abs().max() + 1e-6
    )
    assert torch.isfinite(out).all() and err <= bound, f"error {err:.3g} > {bound:.3g}"
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert ((lse.double() - exact_lse)[finite].abs() <= 1e-5 * (1 + exact_lse[finite].abs())).all()


@pytest.fixture
def forced_splits():
    """Sets the CUDA split count for a test and restores automatic splits after."""
    yield _C_cuda.set_num_splits
    _C_cuda.set_num_splits(0)


@pytest.fixture
def smem_limit():
    before = _C_cuda.smem_limit()
    yield _C_cuda.set_smem_limit
    _C_cuda.set_smem_limit(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_is_what_the_runtime_fits(dtype, smem_limit):
    """The plan (the same function on CPU) agrees with the device: its shared memory fits the
    device's opt-in limit and the runtime's occupancy holds at least its blocks per SM."""
    props = _C_cuda.device_properties(torch.cuda.current_device())
    limit = props["max_smem_per_block_optin"]
    for forced in (0, SMEM_99KB):
        smem_limit(forced)
        for head_dim in (64, 96, 128, 256):
            for q_len, group in ((1, 1), (1, 8), (16, 4)):
                plan = ops.cuda_launch_plan(
                    dtype, head_dim, q_len, min(limit, forced or limit), group_size=group
                )
                occupancy = _C_cuda.paged_attention_occupancy(
                    dtype=CODES[dtype],
                    head_dim=head_dim,
                    rows=q_len * group,
                    device=torch.cuda.current_device(),
                )
                assert occupancy >= plan["blocks_per_sm"], (head_dim, q_len, group, plan, occupancy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_at_the_99kb_limit(dtype, head_dim, smem_limit, forced_splits):
    """Plans for a 99 KB part (2 stages, smaller query tiles for large head_dim) compute the same
    attention, split or not."""
    smem_limit(SMEM_99KB)
    for splits in (0, 3):
        forced_splits(splits)
        kw = paged_inputs(
            "cuda", dtype=dtype, q_len=16, heads=(8, 2), head_dim=head_dim, suffix=True
        )
        out, lse = ops.paged_attention(**kw, return_lse=True)
        assert_matches_reference(out, lse, kw)


def test_split_workspace_comes_from_torch(forced_splits):
    """The split-KV workspace is a torch allocation: the peak of torch's accounting covers it."""
    kw = paged_inputs("cuda", batch=2, lens=(3000, 40))
    forced_splits(8)
    B, S, H, D = kw["q"].shape
    need = _C_cuda.paged_attention_workspace_bytes(
        batch=B,
        q_len=S,
        num_heads=H,
        num_kv_heads=2,
        head_dim=D,
        block_size=16,
        max_blocks_per_row=kw["block_table"].shape[1],
        window=0,
        dtype=CODES[torch.bfloat16],
        max_seq_len=3000,
        device=torch.cuda.current_device(),
    )
    assert need == 8 * B * S * H * (D + 1) * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = ops.paged_attention(**kw, return_lse=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base >= need + out.numel() * out.element_size()
    assert_matches_reference(out, lse, kw)


def test_max_seq_len_sizes_the_split():
    """Short real rows in a wide block table: the hint (or the checked lengths) plans from them."""
    args = dict(
        batch=1,
        q_len=1,
        num_heads=8,
        num_kv_heads=1,
        head_dim=128,
        block_size=16,
        max_blocks_per_row=4096,
        window=0,
        dtype=CODES[torch.bfloat16],
        device=torch.cuda.current_device(),
    )
    assert _C_cuda.paged_attention_workspace_bytes(**args, max_seq_len=100) == 0
    assert (
        _C_cuda.paged_attention_workspace_bytes(**args, max_seq_len=-1) > 0
    )  # the table's 65536 keys


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device():
    """Every op runs on its tensors' device with another one current, and leaves the current one."""
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        kw = paged_inputs(dev, suffix=True, q_len=4)
        out, lse = ops.paged_attention(**kw, return_lse=True)
        assert out.device == dev and torch.cuda.current_device() == 0
        assert_matches_reference(out, lse, kw)

        k, v = torch.randn(2, 5, 2, 128, device=dev).bfloat16().unbind(0)
        kc, vc = kw["k_cache"].clone(), kw["v_cache"].clone()
        slots = torch.tensor([3, -1, 40, 7, 12], device=dev)
        ops.write_kv(k, v, kc, vc, slots)
        want_k, want_v = kw["k_cache"].clone(), kw["v_cache"].clone()
        reference.write_kv(k, v, want_k, want_v, slots)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)

        cache = torch.randn(2, 2, 6, 4, 2, 16, device=dev)
        want = cache.clone()
        src, dst = torch.tensor([0, 1], device=dev), torch.tensor([4, 5], device=dev)
        reference.copy_blocks(want, src, dst)
        ops.copy_blocks(cache, src, dst)
        assert torch.equal(cache, want)

        x, w = torch.randn(20, 64, device=dev), torch.randn(2, 48, device=dev)
        hw = torch.randn(48, 64, device=dev) / 8
        torch.testing.assert_close(
            ops.stop_score(x, w, hidden_weight=hw).double(),
            reference.stop_score(x.double(), w.double(), hidden_weight=hw.double()),
            rtol=1e-5,
            atol=1e-6,
        )
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("splits", [0, 4])
def test_decode_step_in_a_cuda_graph(splits, forced_splits):
    """One decode step (write the new token's K/V, attend over the pages) captured in a CUDA graph
    and replayed on new inputs: the split-KV workspace and every launch go into the graph."""
    forced_splits(splits)
    B, H, Hkv, D, bs = 4, 8, 2, 128, 16
    lens = [33, 200, 7, 64]
    static = paged_inputs(
        "cuda", batch=B, heads=(H, Hkv), head_dim=D, block_size=bs, lens=[n + 1 for n in lens]
    )
    new_k, new_v = torch.randn(2, B, Hkv, D, device="cuda").bfloat16().unbind(0)
    table = static["block_table"]
    slots = torch.stack([table[b, n // bs].long() * bs + n % bs for b, n in enumerate(lens)])
    max_seq_len = max(lens) + 1

    def step():
        ops.write_kv(new_k, new_v, static["k_cache"], static["v_cache"], slots, check_indices=False)
        return ops.paged_attention(
            **static, check_indices=False, max_seq_len=max_seq_len, return_lse=True
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph (attributes, device properties)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()

    for _ in range(2):
        for name in ("q", "k_cache", "v_cache"):
            static[name].copy_(torch.randn_like(static[name], dtype=torch.float32))
        new_k.copy_(torch.randn_like(new_k, dtype=torch.float32))
        new_v.copy_(torch.randn_like(new_v, dtype=torch.float32))
        want_k, want_v = static["k_cache"].clone(), static["v_cache"].clone()
        reference.write_kv(new_k, new_v, want_k, want_v, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static["k_cache"], want_k) and torch.equal(static["v_cache"], want_v)
        assert_matches_reference(out, lse, static)


def test_stop_score_in_a_cuda_graph():
    """The hidden-layer head (its tickets reset by a memset node) replays in a graph."""
    x = torch.randn(24, 256, device="cuda")
    kw = dict(
        norm_weight=torch.randn(256, device="cuda"),
        hidden_weight=torch.randn(96, 256, device="cuda") / 16,
        hidden_bias=torch.randn(96, device="cuda"),
    )
    w = torch.randn(2, 96, device="cuda") / 8
    ops.stop_score(x, w, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.stop_score(x, w, **kw)
    for _ in range(3):
        x.copy_(3 * torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(
            out.double(),
            reference.stop_score(x.double(), w.double(), **{k: v.double() for k, v in kw.items()}),
            rtol=1e-5,
            atol=1e-6,
        )
