"""stopkit.prune: ranking rules, criteria, block release, compaction that keeps attention exact,
argument checks."""

import math

import pytest
import torch
from _cpu import kernel_threads  # noqa: F401 (a fixture)
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from stopkit import _C, ops, reference
from stopkit.cache import PagedKVCache
from stopkit.pruning import PruneResult, prune

NAN, INF = math.nan, math.inf


def filled_cache(gen: torch.Generator, dtype=torch.float32, prompt_lens=(13, 30)) -> PagedKVCache:
    """Seven rows of different lengths: two prompts, forks of each (shared blocks, partial last
    blocks copied on write), random K/V everywhere."""
    num_blocks = sum(math.ceil(n / 8) for n in prompt_lens) + 7 * 4  # + up to 19 tokens a row
    cache = PagedKVCache(2, 2, 32, num_blocks=num_blocks, block_size=8, dtype=dtype)

    def write(slots):
        flat = slots.reshape(-1)
        for layer in range(cache.num_layers):
            k, v = (torch.randn(flat.numel(), 2, 32, generator=gen).to(dtype) for _ in range(2))
            ops.write_kv(k, v, cache.k_cache(layer), cache.v_cache(layer), flat)

    cache.add(2)
    write(cache.extend(list(prompt_lens)))
    cache.fork(0, 3)
    cache.fork(1, 2)
    write(cache.extend(torch.randint(0, 20, (7,), generator=gen)))
    return cache


@pytest.mark.parametrize(
    "prompt_lens",
    [(13, 30), (_C.split_keys() + 188, 2 * _C.split_keys() + 76)],
    ids=["short", "long"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_threads")
def test_kept_rows_attend_exactly_as_before(dtype, prompt_lens):
    """The kept rows' attention is the same bits after pruning, at each of KERNEL_THREADS kernel
    threads. The guarantee: exact for a fixed split plan. On the CPU a row's plan (its chunks of
    _C.split_keys() keys, merged in order) follows its own length only, never the batch or the
    thread count, so compaction changes no bits; the CUDA kernel picks its split count from the
    whole batch, so there pruning keeps attention within float tolerance only."""
    gen = torch.Generator().manual_seed(10)
    cache = filled_cache(gen, dtype, prompt_lens)
    B = cache.batch_size
    q = torch.randn(B, 2, 4, 32, generator=gen).to(dtype)
    suffix = [torch.randn(B, 2, 2, 32, generator=gen).to(dtype) for _ in range(2)]

    def attend(rows):
        return [
            ops.paged_attention(
                q[rows],
                cache.k_cache(layer),
                cache.v_cache(layer),
                cache.block_table,
                cache.seq_lens,
                suffix_k=suffix[0][rows],
                suffix_v=suffix[1][rows],
                return_lse=True,
            )
            for layer in range(cache.num_layers)
        ]

    before = attend(torch.arange(B))
    expected = reference.paged_attention(
        q.double(),
        cache.k_cache(1).double(),
        cache.v_cache(1).double(),
        cache.block_table,
        cache.seq_lens,
        suffix_k=suffix[0].double(),
        suffix_v=suffix[1].double(),
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(before[1][0].double(), expected, rtol=tol, atol=tol)
    storage = cache.storage.clone()
    lens = cache.seq_lens.clone()
    scores = torch.rand(B, generator=gen)
    result = prune(cache, scores, keep=3)
    assert torch.equal(result.kept, scores.argsort(descending=True)[:3].sort().values)
    assert torch.equal(cache.storage, storage)  # compaction moved no KV
    assert torch.equal(cache.seq_lens, lens[result.kept])
    after = attend(result.kept)
    for (out0, lse0), (out1, lse1) in zip(before, after, strict=True):
        assert torch.equal(out0[result.kept], out1) and torch.equal(lse0[result.kept], lse1)


def test_ranking_nan_last_ties_to_the_lower_row():
    cache = PagedKVCache(1, 1, 16, num_blocks=4, block_size=8)
    cache.add(7)
    result = prune(cache, [0.5, NAN, 0.9, 0.5, -INF, 0.5, NAN], keep=3)
    assert isinstance(result, PruneResult)
    assert result.kept.tolist() == [0, 2, 3] and result.dropped.tolist() == [1, 4, 5, 6]
    assert result.kept.dtype == result.dropped.dtype == torch.int64 and cache.batch_size == 3
    cache.add(3)
    assert prune(cache, [NAN, -INF, NAN, NAN, NAN, NAN], keep=2).kept.tolist() == [0, 1]


@pytest.mark.parametrize(
    "batch, kwargs, kept",
    [
        (5, dict(keep=9), [0, 1, 2, 3, 4]),
        (5, dict(keep=1, min_keep=3), [1, 3, 4]),
        (30, dict(ratio=0.1), [27, 28, 29]),  # ceil(0.1 * 30) is 3, though 0.1 * 30 > 3 in floats
        (5, dict(ratio=0.5), [1, 3, 4]),
        (5, dict(ratio=0.01), [4]),
        (5, dict(ratio=0.01, min_keep=2), [1, 4]),
        (5, dict(threshold=0.3), [1, 3, 4]),
        (5, dict(threshold=0.3, min_keep=4), [1, 2, 3, 4]),
        (5, dict(threshold=7.0), [4]),  # none pass: the best min_keep
        (5, dict(threshold=7.0, min_keep=0), []),
        (5, dict(threshold=-INF), [0, 1, 2, 3, 4]),
    ],
)
def test_criteria(batch, kwargs, kept):
    scores = (
        torch.arange(batch, dtype=torch.float64) / 10
        if batch > 5
        else torch.tensor([0.1, 0.6, 0.2, 0.3, 0.9])
    )
    cache = PagedKVCache(1, 1, 16, num_blocks=4 * batch, block_size=8)
    cache.add(batch)
    cache.extend(torch.arange(1, batch + 1))
    lens = cache.seq_lens.clone()
    result = prune(cache, scores, **kwargs)
    assert result.kept.tolist() == kept
    assert result.dropped.tolist() == sorted(set(range(batch)) - set(kept))
    assert cache.seq_lens.tolist() == lens[kept].tolist()


@settings(max_examples=examples(150), deadline=None)
@given(
    scores=st.lists(
        st.sampled_from([0.0, 0.5, 1.0, -INF, INF, NAN]) | st.floats(-1, 1), min_size=0, max_size=12
    ),
    keep=st.integers(1, 14),
    min_keep=st.integers(0, 4),
)
def test_ranking_matches_a_python_sort(scores, keep, min_keep):
    order = sorted(
        range(len(scores)),
        key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else -scores[i], i),
    )
    cache = PagedKVCache(1, 1, 16, num_blocks=1, block_size=8)
    cache.add(len(scores))
    result = prune(cache, scores, keep=keep, min_keep=min_keep)
    assert result.kept.tolist() == sorted(order[: max(keep, min_keep)])


def test_scores_of_any_type_rank_alike():
    gen = torch.Generator().manual_seed(11)
    base = torch.rand(9, generator=gen)
    inputs = [
        base.tolist(),
        base,
        base.to(torch.bfloat16),
        base.to(torch.float16),
        base.double(),
        base.numpy(),
        (base * 1000).to(torch.int64),
        tuple(base.tolist()),
    ]
    results = []
    for scores in inputs:
        cache = PagedKVCache(1, 1, 16, num_blocks=1, block_size=8)
        cache.add(9)
        results.append(prune(cache, scores, ratio=0.5).kept.tolist())
    assert results[0] == sorted(base.argsort(descending=True)[:5].tolist())
    assert all(r == results[0] for r in results)


def test_freed_blocks_counts_only_blocks_no_kept_row_holds():
    cache = PagedKVCache(1, 1, 16, num_blocks=20, block_size=8)
    cache.add(1)
    cache.extend(20)  # 3 blocks, the last partial
    cache.fork(0, 2)
    cache.extend([0, 4, 12])  # row 1 copies the last block; row 2 copies it and adds one more
    assert cache.num_free_blocks == 20 - 3 - 1 - 2
    result = prune(cache, [0.1, 0.9, 0.2], keep=1)  # rows 0 and 2 go; row 1 keeps 2 shared blocks
    assert result.kept.tolist() == [1] and result.freed_blocks == 1 + 2
    assert cache.num_free_blocks == 20 - 3 and cache.seq_lens.tolist() == [24]
    assert prune(cache, [0.0], threshold=1.0, min_keep=0).freed_blocks == 3
    assert cache.num_free_blocks == 20 and cache.batch_size == 0


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        (([0.1, 0.2],), dict(keep=1), ValueError),  # wrong length
        ((torch.rand(3, 1),), dict(keep=1), ValueError),  # not 1-D
        (([0.1, 0.2, 0.3],), dict(), ValueError),  # no criterion
        (([0.1, 0.2, 0.3],), dict(keep=1, ratio=0.5), ValueError),
        (([0.1, 0.2, 0.3],), dict(keep=1, threshold=0.5), ValueError),
        (([0.1, 0.2, 0.3],), dict(keep=0), ValueError),
        (([0.1, 0.2, 0.3],), dict(keep=1.5), TypeError),
        (([0.1, 0.2, 0.3],), dict(ratio=0.0), ValueError),
        (([0.1, 0.2, 0.3],), dict(ratio=1.5), ValueError),
        (([0.1, 0.2, 0.3],), dict(ratio=NAN), ValueError),
        (([0.1, 0.2, 0.3],), dict(ratio="half"), TypeError),
        (([0.1, 0.2, 0.3],), dict(threshold=NAN), ValueError),
        (([0.1, 0.2, 0.3],), dict(keep=1, min_keep=-1), ValueError),
        ((torch.tensor([True, False, True]),), dict(keep=1), TypeError),
        ((["a", "b", "c"],), dict(keep=1), TypeError),
    ],
)
def test_bad_arguments_change_nothing(args, kwargs, error):
    cache = PagedKVCache(1, 1, 16, num_blocks=8, block_size=8)
    cache.add(3)
    cache.extend([3, 9, 17])
    before = (cache.block_table.clone(), cache.seq_lens.clone(), cache.num_free_blocks)
    with pytest.raises(error):
        prune(cache, *args, **kwargs)
    assert torch.equal(cache.block_table, before[0]) and torch.equal(cache.seq_lens, before[1])
    assert cache.num_free_blocks == before[2]


def test_cache_must_be_a_paged_kv_cache():
    with pytest.raises(TypeError, match="PagedKVCache"):
        prune(object(), [1.0], keep=1)
