"""The CUDA paged-attention kernel's launch plan and split heuristic, which need no GPU: stopkit._C
binds the same C++ functions (csrc/include/stopkit/cuda/launch_plan.h) that stopkit._C_cuda
launches by. Also the ``max_seq_len`` hint's argument rules."""

from __future__ import annotations

import pytest
import torch

from stopkit import _C, ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = range(32, 257, 16)
# Opt-in shared memory per block: sm_86/89/120 (A10, L4, L40S, RTX 30-50), A100, H100/H200.
LIMITS = {"99KB": 101_376, "163KB": 166_912, "227KB": 232_448}
RESERVED = 1024  # per resident block, on top of the per-block limit per multiprocessor


def layout_bytes(dtype: torch.dtype, head_dim: int, stages: int, query_rows: int) -> int:
    """The kernel's shared memory, re-derived from its documented layout: K and V tiles of 16 KiB
    of keys each per stage (rows padded by 16 bytes), int32 key positions per stage, float32 P
    staging on the float32 path, the query rows; the epilogue's float32 rows reuse it."""
    e = dtype.itemsize
    dmax = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    keys, ld = 16384 // (dmax * e), dmax + 16 // e
    kv = stages * 2 * keys * ld * e
    kpos = stages * keys * 4
    p_staging = 4 * 16 * 17 * 4 if e == 4 else 0
    q = query_rows * ld * e
    epilogue = 4 * 16 * (dmax + 6) * 4
    return max(kv + kpos + p_staging + q, epilogue)


@pytest.mark.parametrize("limit", LIMITS.values(), ids=LIMITS.keys())
def test_every_configuration_fits(limit):
    """Every dtype x head_dim x q_len (with 1 and 8 query heads per kv head) gets a plan within the
    limit whose shared memory is the layout's and whose blocks per SM follow from it."""
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for q_len in range(1, ops.MAX_Q_LEN + 1):
                for group in (1, 8):
                    plan = ops.cuda_launch_plan(dtype, head_dim, q_len, limit, group_size=group)
                    where = f"{dtype} head_dim={head_dim} q_len={q_len} group={group}: {plan}"
                    assert 2 <= plan["stages"] <= 4, where
                    assert plan["smem_bytes"] <= limit, where
                    assert plan["smem_bytes"] == layout_bytes(
                        dtype, head_dim, plan["stages"], plan["query_rows"]
                    ), where
                    by_smem = (limit + RESERVED) // (plan["smem_bytes"] + RESERVED)
                    assert plan["blocks_per_sm"] == min(2, by_smem) >= 1, where
                    assert plan["query_rows"] in (16, 32, 64), where
                    assert plan["head_dim_bucket"] >= head_dim and plan["threads"] == 128, where


def test_plans_fill_the_query_tile_when_they_fit():
    """The query tile covers all rows (up to 64) wherever 2 stages of that tile fit."""
    for limit in LIMITS.values():
        for dtype in DTYPES:
            for head_dim in (64, 128, 256):
                for rows in (16, 32, 64):
                    plan = ops.cuda_launch_plan(dtype, head_dim, rows // 16, limit, group_size=16)
                    if layout_bytes(dtype, head_dim, 2, rows) <= limit:
                        assert plan["query_rows"] == rows, (limit, dtype, head_dim, plan)
                    else:
                        assert plan["query_rows"] < rows, (limit, dtype, head_dim, plan)


def test_99kb_parts_run_two_stages():
    """On 99 KB parts every plan is 2 stages deep, one block per SM (3 stages never fit there)."""
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for q_len in (1, 16):
                plan = ops.cuda_launch_plan(dtype, head_dim, q_len, LIMITS["99KB"], group_size=4)
                assert plan["stages"] == 2 and plan["blocks_per_sm"] == 1, (dtype, head_dim, plan)


def test_plans_prefer_two_blocks_then_depth():
    """Two blocks per SM wherever two fit, then the deepest pipeline that keeps that many."""

    def fits(blocks: int, smem: int, limit: int) -> bool:
        return smem <= limit and blocks * (smem + RESERVED) <= limit + RESERVED

    for limit in LIMITS.values():
        for dtype in DTYPES:
            for head_dim in (64, 96, 128, 256):
                for q_len, group in ((1, 1), (1, 8), (4, 8), (16, 4)):
                    plan = ops.cuda_launch_plan(dtype, head_dim, q_len, limit, group_size=group)
                    rows = plan["query_rows"]
                    blocks = 2 if fits(2, layout_bytes(dtype, head_dim, 2, rows), limit) else 1
                    stages = max(
                        s
                        for s in (2, 3, 4)
                        if fits(blocks, layout_bytes(dtype, head_dim, s, rows), limit)
                    )
                    assert (plan["blocks_per_sm"], plan["stages"]) == (blocks, stages), (
                        limit,
                        dtype,
                        head_dim,
                        plan,
                    )


def test_decode_keeps_two_blocks_per_sm_on_h100():
    """Decode (q_len 1, up to 16 query heads per kv head) runs two blocks per SM on H100/H200."""
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for group in (1, 4, 8, 16):
                plan = ops.cuda_launch_plan(dtype, head_dim, 1, LIMITS["227KB"], group_size=group)
                assert plan["blocks_per_sm"] == 2, (dtype, head_dim, group, plan)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(dtype=torch.float64), TypeError, "^dtype must be"),
        (dict(head_dim=40), ValueError, "^head_dim must be a multiple of 16"),
        (dict(head_dim=272), ValueError, "^head_dim must be an int in 32..256"),
        (dict(q_len=0), ValueError, "^q_len must be an int in 1..16"),
        (dict(q_len=17), ValueError, "^q_len must be an int in 1..16"),
        (dict(group_size=0), ValueError, "^group_size must be"),
        (dict(max_shared_memory=True), ValueError, "^max_shared_memory must be an int"),
        (dict(max_shared_memory=48 * 1024), ValueError, "^no launch plan .* fits 49152 bytes"),
    ],
)
def test_launch_plan_bad_input(kwargs, exc, pattern):
    args = (
        dict(dtype=torch.bfloat16, head_dim=128, q_len=1, max_shared_memory=LIMITS["99KB"]) | kwargs
    )
    with pytest.raises(exc, match=pattern):
        ops.cuda_launch_plan(**args)


# ---- the split heuristic: splits of the context from waves and the longest row ----


def splits(blocks: int, max_keys: int, num_sms: int = 132, blocks_per_sm: int = 2) -> int:
    return _C.cuda_num_splits(
        blocks=blocks, max_keys=max_keys, num_sms=num_sms, blocks_per_sm=blocks_per_sm
    )


def waves_time(blocks: int, n: int, max_keys: int, slots: int) -> float:
    """Waves x keys per split: the attention kernel's time in key steps, merge aside."""
    return -(-blocks * n // slots) * -(-max_keys // n)


def test_no_split_when_the_blocks_fill_whole_waves():
    for num_sms, per_sm in ((132, 2), (108, 2), (142, 1)):
        slots = num_sms * per_sm
        for waves in (1, 2, 3):
            assert splits(waves * slots, 4096, num_sms, per_sm) == 1


def test_no_split_for_short_rows():
    """Fewer than 256 keys: a split would hold fewer than 128 keys, not worth a merge."""
    for max_keys in (0, 1, 100, 255):
        assert splits(1, max_keys) == 1


def test_a_sliver_of_a_second_wave_is_split_away():
    """1.1 waves of blocks (the issue's case: one split wasted 45% of the second wave) split so
    that the waves come out fuller and the kernel shorter."""
    slots = 264
    blocks = 290
    n = splits(blocks, 4096)
    assert n > 1
    assert waves_time(blocks, n, 4096, slots) < 0.75 * waves_time(blocks, 1, 4096, slots)


@pytest.mark.parametrize("num_sms,per_sm", [(132, 2), (108, 2), (58, 1)])
def test_one_long_row_spreads_over_the_gpu(num_sms, per_sm):
    """Decode of one row (8 kv heads) over 32k keys: enough splits for about one wave of the GPU."""
    slots = num_sms * per_sm
    n = splits(8, 32768, num_sms, per_sm)
    assert 0.5 * slots <= 8 * n <= slots or n == 64, n
    assert 32768 / n >= 128


def test_splits_follow_the_longest_row_not_the_table():
    """Short rows in a wide block table: planning from the real length keeps the split count down
    (the native call is given the longest seq_lens when known)."""
    assert splits(16, 256) < splits(16, 65536)
    assert splits(16, 256) <= 2


def test_split_bounds_over_many_shapes():
    for num_sms in (16, 58, 108, 132):
        for per_sm in (1, 2):
            for blocks in (1, 3, 8, 31, 64, 200, 1000):
                for max_keys in (64, 300, 1000, 5000, 40000, 1 << 20):
                    n = splits(blocks, max_keys, num_sms, per_sm)
                    assert 1 <= n <= 64
                    assert n == 1 or max_keys // n >= 128, (num_sms, per_sm, blocks, max_keys, n)
                    # never slower than not splitting, by the waves-x-keys measure plus the merge
                    slots = num_sms * per_sm
                    assert waves_time(blocks, n, max_keys, slots) <= waves_time(
                        blocks, 1, max_keys, slots
                    )


# ---- the max_seq_len hint of paged_attention ----


def _attention_inputs() -> dict:
    table = torch.tensor([[3, 0, 1], [2, 4, -1]], dtype=torch.int32)
    return dict(
        q=torch.randn(2, 1, 4, 32),
        k_cache=torch.randn(5, 8, 2, 32),
        v_cache=torch.randn(5, 8, 2, 32),
        block_table=table,
        seq_lens=torch.tensor([20, 11], dtype=torch.int32),
    )


@pytest.mark.parametrize("value", [-1, 2.0, True, "20"])
def test_max_seq_len_must_be_a_count(value):
    with pytest.raises(ValueError, match=r"^max_seq_len must be an int >= 0 or None"):
        ops.paged_attention(**_attention_inputs(), max_seq_len=value)


def test_max_seq_len_below_a_row_is_rejected_when_checked():
    kw = _attention_inputs()
    with pytest.raises(
        ValueError, match=r"^max_seq_len must be >= every seq_lens entry, got 19 below 20"
    ):
        ops.paged_attention(**kw, max_seq_len=19)
    ops.paged_attention(**kw, max_seq_len=19, check_indices=False)  # a hint only: not checked


def test_max_seq_len_does_not_change_the_result():
    kw = _attention_inputs()
    expected = ops.paged_attention(**kw)
    for hint in (20, 24, 1000):
        assert torch.equal(ops.paged_attention(**kw, max_seq_len=hint), expected)
