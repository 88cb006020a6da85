"""Cache bookkeeping against the attention it serves: prune + compaction of 64 rows x 256 blocks,
and one decode step's extend(1) + block_table + seq_lens for 64 rows, each as a fraction of one
ops.paged_attention call over the same cache (64 rows of 256 blocks x 16 tokens, 32 heads / 8 kv
heads, head_dim 128, bfloat16, q_len 1) timed in the same run. Target: under 5%.

Run: pytest bench/test_bench_cache.py --benchmark-only
"""

import statistics
import time

import pytest
import torch

from stopkit import ops
from stopkit.cache import PagedKVCache
from stopkit.pruning import prune

ROWS, BLOCKS_PER_ROW, BLOCK_SIZE, HEADS, KV_HEADS, HEAD_DIM = 64, 256, 16, 32, 8, 128
TARGET = 0.05
# rows end anywhere in their 256th block, so decode steps cross block boundaries row by row
LENS = torch.tensor([(BLOCKS_PER_ROW - 1) * BLOCK_SIZE + 1 + i % BLOCK_SIZE for i in range(ROWS)])


def reset(cache: PagedKVCache) -> None:
    cache.free(range(cache.batch_size))
    cache.add(ROWS)
    cache.extend(LENS)


@pytest.fixture(scope="module")
def setup():
    """The cache (about 1 GiB of random bfloat16 K/V) and the times of one attention call."""
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(
        1,
        KV_HEADS,
        HEAD_DIM,
        num_blocks=ROWS * (BLOCKS_PER_ROW + 1),
        block_size=BLOCK_SIZE,
        dtype=torch.bfloat16,
    )
    cache.storage.normal_(generator=gen)
    reset(cache)
    q = torch.randn(ROWS, 1, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    args = (q, cache.k_cache(0), cache.v_cache(0), cache.block_table, cache.seq_lens)
    ops.paged_attention(*args)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        ops.paged_attention(*args)
        times.append(time.perf_counter() - start)
    return cache, times


def record(benchmark, attention_s: list[float]) -> None:
    """Store both fractions; judge the target on the minima, the least noisy estimate of each
    cost on a machine shared with other jobs (medians are recorded too)."""
    benchmark.extra_info["attention_ms_median"] = statistics.median(attention_s) * 1e3
    benchmark.extra_info["attention_ms_min"] = min(attention_s) * 1e3
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    benchmark.extra_info["fraction_of_attention_median"] = stats.median / statistics.median(
        attention_s
    )
    fraction = stats.min / min(attention_s)
    benchmark.extra_info["fraction_of_attention_min"] = fraction
    assert fraction < TARGET, f"bookkeeping takes {fraction:.1%} of one attention call"


def test_bench_prune_64_rows_x_256_blocks(benchmark, setup):
    cache, attention_s = setup
    gen = torch.Generator().manual_seed(1)

    def fresh():
        reset(cache)
        return (torch.rand(ROWS, generator=gen),), {}

    def step(scores):
        prune(cache, scores, keep=8)
        _ = cache.block_table, cache.seq_lens  # the compacted tables the next step reads

    benchmark.pedantic(step, setup=fresh, rounds=50, warmup_rounds=2)
    assert cache.batch_size == 8 and cache.num_free_blocks == cache.num_blocks - 8 * BLOCKS_PER_ROW
    record(benchmark, attention_s)


def test_bench_extend_1_for_64_rows(benchmark, setup):
    cache, attention_s = setup

    def fresh():
        reset(cache)
        _ = cache.block_table, cache.seq_lens
        return (), {}

    def step():
        cache.extend(1)
        _ = cache.block_table, cache.seq_lens

    benchmark.pedantic(step, setup=fresh, rounds=200, warmup_rounds=5)
    assert cache.seq_lens.tolist() == (LENS + 1).tolist()
    record(benchmark, attention_s)
