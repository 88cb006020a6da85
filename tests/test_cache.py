"""PagedKVCache: block accounting, copy-on-write forks, CacheFullError, argument checks, sizing,
and a hypothesis state machine against a pure-Python model of the cache."""

import gc
import logging
import math
import mmap
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import examples
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from stopkit import ops
from stopkit.cache import CacheFullError, PagedKVCache, zeros_kv_storage
from stopkit.pruning import prune


def snapshot(cache: PagedKVCache) -> list:
    """Everything a failed call must leave as it was (allocator internals included)."""
    return [
        cache.batch_size,
        cache.num_free_blocks,
        cache.block_table.clone(),
        cache.seq_lens.clone(),
        cache._ref.copy(),
        cache._free[: cache._num_free].copy(),
        cache.storage.clone(),
    ]


def assert_same(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)


def check_accounting(cache: PagedKVCache) -> None:
    """Refcounts equal the references from rows; the free stack holds exactly the unreferenced
    blocks, once each; block_table is as wide as the longest row needs."""
    table, lens = cache.block_table.cpu().long(), cache.seq_lens.cpu().long()
    refs = torch.zeros(cache.num_blocks, dtype=torch.int64)
    widest = 1
    for b in range(cache.batch_size):
        blocks = table[b, : math.ceil(int(lens[b]) / cache.block_size)]
        widest = max(widest, blocks.numel())
        assert blocks.unique().numel() == blocks.numel(), f"row {b} holds a block twice"
        refs[blocks] += 1
    assert table.shape == (cache.batch_size, widest)
    assert torch.equal(refs, torch.from_numpy(cache._ref).long())
    free = torch.from_numpy(cache._free[: cache._num_free])
    assert free.unique().numel() == free.numel() == cache.num_free_blocks
    assert torch.equal(free.sort().values, (refs == 0).nonzero().squeeze(1))


def write_random(cache: PagedKVCache, slots: torch.Tensor, gen: torch.Generator) -> None:
    flat = slots.reshape(-1)
    for layer in range(cache.num_layers):
        k, v = (
            torch.randn(flat.numel(), cache.num_kv_heads, cache.head_dim, generator=gen).to(
                cache.dtype
            )
            for _ in range(2)
        )
        ops.write_kv(k, v, cache.k_cache(layer), cache.v_cache(layer), flat)


def row_contents(cache: PagedKVCache, row: int) -> torch.Tensor:
    """``[num_layers, 2, seq_len, Hkv, D]``: row's tokens read back through the block table."""
    t = torch.arange(int(cache.seq_lens[row]))
    blocks = cache.block_table[row].long()[t // cache.block_size]
    return cache.storage[:, :, blocks, t % cache.block_size]


def test_storage_views_and_lazy_tables():
    cache = PagedKVCache(3, 2, 32, num_blocks=10, block_size=8, dtype=torch.bfloat16)
    assert cache.storage.shape == (3, 2, 10, 8, 2, 32) and cache.storage.dtype == torch.bfloat16
    assert cache.memory_bytes == 3 * 2 * 10 * 8 * 2 * 32 * 2
    assert cache.k_cache(2).data_ptr() == cache.storage[2, 0].data_ptr()
    assert cache.v_cache(1).shape == (10, 8, 2, 32) and cache.v_cache(1).is_contiguous()
    assert cache.batch_size == 0 and cache.block_table.shape == (0, 1)
    assert cache.add(2) == [0, 1] and cache.seq_lens.tolist() == [0, 0]
    cache.extend(5)
    table = cache.block_table
    assert cache.block_table is table  # not rebuilt while nothing changed
    cache.extend(3)  # fills the first block: no new block, same table object
    assert cache.block_table is table and cache.seq_lens.tolist() == [8, 8]
    cache.extend(1)
    assert cache.block_table is not table and cache.block_table.shape == (2, 2)
    check_accounting(cache)


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((3, 5), torch.float32),
        ((2, 2, 64, 16, 2, 64), torch.bfloat16),
        ((1, 2, 300, 16, 4, 128), torch.float16),
    ],
)
def test_zeros_kv_storage(shape, dtype):
    t = zeros_kv_storage(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    nbytes = t.numel() * t.element_size()
    if nbytes >= 2 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):  # on huge-page boundaries
        assert t.data_ptr() % (2 << 20) == 0
    t.view(-1)[-1] = 3  # the whole range is writable
    view = t.view(-1)[-4:]
    del t
    gc.collect()
    assert view.tolist() == [0, 0, 0, 3]  # views keep the mapping alive


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise huge pages here")
@pytest.mark.parametrize(
    "mode,warned", [("always [madvise] never", False), ("always madvise [never]", True)]
)
def test_zeros_kv_storage_warns_without_huge_pages(tmp_path, monkeypatch, caplog, mode, warned):
    """Huge pages off: a warning, logged once however many caches are made."""
    from stopkit import cache as cache_module

    (tmp_path / "enabled").write_text(mode + "\n")
    monkeypatch.setattr(cache_module, "_THP_MODE", tmp_path / "enabled")
    cache_module._warn_plain_pages.cache_clear()
    with caplog.at_level(logging.WARNING, logger="stopkit.cache"):
        for _ in range(2):
            assert not zeros_kv_storage((4, 1 << 18), torch.float32).any()
    messages = [r.getMessage() for r in caplog.records if r.name == "stopkit.cache"]
    assert len(messages) == warned and all("[never]" in m and "4 KiB pages" in m for m in messages)
    cache_module._warn_plain_pages.cache_clear()


@pytest.mark.parametrize(
    "shape,dtype,error,match",
    [
        ((2, -1), torch.float32, ValueError, r"^shape\[1\] must be an int >= 0, got -1$"),
        ((2, 1.5), torch.float32, TypeError, r"^shape\[1\] must be an int, got float$"),
        (4, torch.float32, TypeError, "^shape must be a list or tuple"),
        ((2, 3), torch.int32, TypeError, "^dtype must be float32, float16 or bfloat16"),
    ],
)
def test_zeros_kv_storage_bad_input(shape, dtype, error, match):
    with pytest.raises(error, match=match):
        zeros_kv_storage(shape, dtype)


def test_cache_storage_on_huge_page_boundary():
    cache = PagedKVCache(2, 2, 64, num_blocks=512, block_size=16, dtype=torch.bfloat16)  # 8 MiB
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert cache.storage.data_ptr() % (2 << 20) == 0
    assert not cache.storage.any()


def test_extend_slots_follow_the_block_table():
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(2, 2, 16, num_blocks=40, block_size=8)
    cache.add(4)
    before = cache.seq_lens.long().clone()
    slots = cache.extend([3, 0, 17, 9])
    assert slots.dtype == torch.int64 and slots.shape == (4, 17)
    slots2 = cache.extend(5, rows=torch.tensor([3, 0]))  # a subset, in any order
    assert slots2.shape == (2, 5) and cache.seq_lens.tolist() == [8, 0, 17, 14]
    table = cache.block_table.long()
    for b, count in enumerate([3, 0, 17, 9]):
        t = before[b] + torch.arange(count)
        assert torch.equal(slots[b, :count], table[b, t // 8] * 8 + t % 8)
        assert (slots[b, count:] == -1).all()
    for i, b in enumerate([3, 0]):
        t = torch.arange(5) + [9, 3][i]
        assert torch.equal(slots2[i], table[b, t // 8] * 8 + t % 8)
    valid = torch.cat([slots[slots >= 0], slots2.reshape(-1)])
    assert valid.unique().numel() == valid.numel()
    assert cache.extend(0).shape == (4, 0) and cache.extend([], rows=[]).shape == (0, 0)
    assert cache.extend(torch.tensor(0), rows=np.array([1])).shape == (1, 0)
    write_random(cache, slots, gen)
    k = torch.randn(1, 2, 16, generator=gen)
    ops.write_kv(k, -k, cache.k_cache(1), cache.v_cache(1), slots[2, 16:17])
    assert torch.equal(row_contents(cache, 2)[1, 0, 16], k[0])
    check_accounting(cache)


def test_fork_shares_blocks_and_copies_a_partial_last_block_on_write():
    gen = torch.Generator().manual_seed(1)
    cache = PagedKVCache(2, 2, 16, num_blocks=20, block_size=8)
    cache.add(1)
    write_random(cache, cache.extend(11), gen)  # 2 blocks, the last one partial
    prompt = row_contents(cache, 0).clone()
    assert cache.fork(0, 3) == [1, 2, 3]
    assert cache.num_free_blocks == 18 and cache._ref[cache.block_table[0].numpy()].tolist() == [
        4,
        4,
    ]
    slots = cache.extend(2)
    # every row writes the shared partial block: row 0 keeps it, rows 1-3 copy it; nothing else
    assert cache.num_free_blocks == 15
    table = cache.block_table
    assert (table[:, 0] == table[0, 0]).all() and table[:, 1].unique().numel() == 4
    for b in range(4):
        assert torch.equal(row_contents(cache, b)[:, :, :11], prompt)  # copies carry the prompt
    new = []
    for b in range(4):
        write_random(cache, slots[b : b + 1], gen)
        new.append(cache.storage[:, :, slots[b] // 8, slots[b] % 8].clone())
    for b in range(4):  # each row sees the prompt and only its own new tokens
        assert torch.equal(row_contents(cache, b), torch.cat([prompt, new[b]], dim=2))
    assert cache.extend(3).shape == (4, 3) and cache.num_free_blocks == 15  # no second copy
    check_accounting(cache)


def test_only_the_writing_fork_copies_and_full_blocks_are_never_copied():
    gen = torch.Generator().manual_seed(2)
    cache = PagedKVCache(1, 1, 16, num_blocks=12, block_size=8)
    cache.add(1)
    write_random(cache, cache.extend(12), gen)
    cache.fork(0, 1)
    parent = row_contents(cache, 0).clone()
    write_random(cache, cache.extend(3, rows=[1]), gen)  # the child copies; the parent keeps
    assert cache.num_free_blocks == 9 and cache.block_table[0, 1] != cache.block_table[1, 1]
    assert torch.equal(row_contents(cache, 0), parent)
    assert torch.equal(row_contents(cache, 1)[:, :, :12], parent)

    cache = PagedKVCache(1, 1, 16, num_blocks=12, block_size=8)
    cache.add(1)
    write_random(cache, cache.extend(16), gen)
    cache.fork(0, 2)
    cache.extend(1)  # the shared last block is full: 3 new blocks, no copy
    assert cache.num_free_blocks == 12 - 2 - 3
    assert (cache.block_table[:, :2] == cache.block_table[0, :2]).all()
    check_accounting(cache)


def test_freeing_every_row_frees_every_block():
    gen = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, 1, 16, num_blocks=30, block_size=8)
    cache.add(3)
    write_random(cache, cache.extend([5, 17, 8]), gen)
    cache.fork(1, 2)
    cache.fork(0, 1)
    write_random(cache, cache.extend([1, 0, 4, 9, 0, 30]), gen)
    # row 0 alone holds its block (row 5 copied it on write); rows 1 and 3 hold all of row 4's
    assert cache.free([4, 0]) == 1
    check_accounting(cache)
    in_use = 30 - cache.num_free_blocks
    assert cache.free(torch.arange(cache.batch_size)) == in_use
    assert cache.batch_size == 0 and cache.num_free_blocks == 30
    assert (cache._ref == 0).all() and cache.block_table.shape == (0, 1)
    check_accounting(cache)
    assert cache.add() == [0] and cache.fork(0, 2) == [1, 2] and cache.fork(2, 0) == []
    assert cache.seq_lens.tolist() == [0, 0, 0] and cache.num_free_blocks == 30


def test_cache_full_raises_before_changing_anything():
    gen = torch.Generator().manual_seed(4)
    cache = PagedKVCache(1, 1, 16, num_blocks=6, block_size=8)
    cache.add(2)
    write_random(cache, cache.extend([12, 5]), gen)
    cache.fork(0, 1)
    before = snapshot(cache)
    assert cache.num_free_blocks == 3
    with pytest.raises(CacheFullError, match=r"needs 4 blocks .* only 3 of 6 are free"):
        cache.extend(8)  # 3 new blocks fit, but row 2 must also copy row 0's shared last block
    assert_same(snapshot(cache), before)
    with pytest.raises(RuntimeError, match=r"needs 6 blocks \(5 new, 1 copy-on-write\)"):
        cache.extend([0, 0, 40])
    assert_same(snapshot(cache), before)
    cache.extend([4, 0, 0])  # no new block, but row 0 copies the block it shares with row 2
    assert cache.num_free_blocks == 2
    check_accounting(cache)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda c: c.free([3]), ValueError),
        (lambda c: c.free([0, 0]), ValueError),
        (lambda c: c.free([-1]), ValueError),
        (lambda c: c.free([0.5]), TypeError),
        (lambda c: c.free(torch.tensor([0.0])), TypeError),
        (lambda c: c.free(1), TypeError),
        (lambda c: c.fork(3, 1), ValueError),
        (lambda c: c.fork(0, -1), ValueError),
        (lambda c: c.fork(True, 1), TypeError),
        (lambda c: c.add(-1), ValueError),
        (lambda c: c.add(1.0), TypeError),
        (lambda c: c.extend(-1), ValueError),
        (lambda c: c.extend([1, 2]), ValueError),
        (lambda c: c.extend([1, -2, 0]), ValueError),
        (lambda c: c.extend(1, rows=[0, 0]), ValueError),
        (lambda c: c.extend(1, rows=[2, 3]), ValueError),
        (lambda c: c.extend([1, 1], rows=[0]), ValueError),
        (lambda c: c.k_cache(2), ValueError),
        (lambda c: c.v_cache(-1), ValueError),
    ],
)
def test_bad_arguments_raise_and_change_nothing(call, error):
    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache(2, 1, 16, num_blocks=8, block_size=8)
    cache.add(2)
    write_random(cache, cache.extend([9, 3]), gen)
    cache.fork(0, 1)
    before = snapshot(cache)
    with pytest.raises(error):
        call(cache)
    assert_same(snapshot(cache), before)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_blocks=0), ValueError),
        (dict(num_blocks=4, block_size=0), ValueError),
        (dict(num_blocks=4, dtype=torch.int8), TypeError),
        (dict(num_blocks=4.0), TypeError),
    ],
)
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        PagedKVCache(1, 1, 16, **kwargs)


def test_for_model_reads_the_config():
    from transformers import LlamaConfig, LlavaConfig

    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    cache = PagedKVCache.for_model(config, num_blocks=5, block_size=8)
    assert cache.storage.shape == (3, 2, 5, 8, 2, 32) and cache.dtype == torch.float32
    per_block = 3 * 2 * 16 * 2 * 32 * 2
    cache = PagedKVCache.for_model(
        config, memory_bytes=7 * per_block + per_block // 2, dtype=torch.bfloat16
    )
    assert cache.num_blocks == 7 and cache.memory_bytes == 7 * per_block
    config.head_dim, config.num_key_value_heads = 48, None
    config.dtype = torch.float16
    assert PagedKVCache.for_model(config, num_blocks=2).storage.shape == (3, 2, 2, 16, 4, 48)
    assert PagedKVCache.for_model(config, num_blocks=2).dtype == torch.float16
    wrapped = LlavaConfig(text_config=config.to_dict())
    assert PagedKVCache.for_model(wrapped, num_blocks=2).storage.shape == (3, 2, 2, 16, 4, 48)
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.for_model(config)
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.for_model(config, num_blocks=2, memory_bytes=10**6)
    with pytest.raises(ValueError, match="less than one block"):
        PagedKVCache.for_model(config, memory_bytes=100)


# ---- stateful test against a pure-Python model ---------------------------------------------
# The model is a list of rows, each the list of integer markers written at its positions. The
# cache stores marker m of layer l as K = m + l / 4, V = -(m + l / 4) (exact in float32).

NUM_BLOCKS, BLOCK_SIZE, LAYERS = 40, 4, 2
SCORES = st.sampled_from([0.0, 0.5, 1.0, -math.inf, math.inf, math.nan]) | st.floats(-2, 2)
RATIOS = [0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0]


def oracle_kept(scores: list[float], keep, ratio, threshold, min_keep: int) -> list[int]:
    B = len(scores)
    order = sorted(
        range(B),
        key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else -scores[i], i),
    )
    if keep is not None:
        k = keep
    elif ratio is not None:
        k = math.ceil(Fraction(str(ratio)) * B)
    else:
        k = sum(1 for s in scores if s >= threshold)
    return sorted(order[: min(B, max(k, min_keep))])


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(LAYERS, 1, 4, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
        self.rows: list[list[int]] = []
        self.marker = 1

    def draw_rows(self, data) -> list[int]:
        B = len(self.rows)
        return data.draw(
            st.lists(st.integers(0, B - 1), unique=True, max_size=B) if B else st.just([])
        )

    @initialize(lens=st.lists(st.integers(0, 9), min_size=1, max_size=3), n=st.integers(0, 3))
    def prompts(self, lens, n):  # a start that shares partially filled blocks
        self.add(len(lens))
        self.extend_and_write(lens, None)
        if any(lens):
            self.fork(lens.index(max(lens)), n)

    @rule(n=st.integers(0, 3))
    def add(self, n):
        assert self.cache.add(n) == list(range(len(self.rows), len(self.rows) + n))
        self.rows += [[] for _ in range(n)]

    @precondition(lambda self: any(self.rows))
    @rule(data=st.data(), n=st.integers(0, 3))
    def fork_some(self, data, n):  # a non-empty row: forking an empty one shares nothing
        self.fork(data.draw(st.sampled_from([i for i, r in enumerate(self.rows) if r])), n)

    def fork(self, row, n):
        free = self.cache.num_free_blocks
        assert self.cache.fork(row, n) == list(range(len(self.rows), len(self.rows) + n))
        assert self.cache.num_free_blocks == free
        self.rows += [list(self.rows[row]) for _ in range(n)]

    # two rules for extend so that it runs about as often as everything else together
    @rule(data=st.data(), per_row=st.booleans())
    def extend_all_and_write(self, data, per_row):
        self.extend_and_write(self.draw_counts(data, len(self.rows), per_row), None)

    @rule(data=st.data(), per_row=st.booleans())
    def extend_some_and_write(self, data, per_row):
        rows = self.draw_rows(data)
        self.extend_and_write(self.draw_counts(data, len(rows), per_row), rows)

    @staticmethod
    def draw_counts(data, R: int, per_row: bool) -> int | list[int]:
        return (
            data.draw(st.lists(st.integers(0, 7), min_size=R, max_size=R))
            if per_row
            else data.draw(st.integers(0, 7))
        )

    def extend_and_write(self, counts: int | list[int], rows: list[int] | None):
        idx = range(len(self.rows)) if rows is None else rows
        R = len(idx)
        per_row = isinstance(counts, list)
        per = counts if per_row else [counts] * R
        lens = [len(self.rows[r]) for r in idx]
        new_blocks = sum(
            -(-(n + c) // BLOCK_SIZE) - (-(-n // BLOCK_SIZE))
            for n, c in zip(lens, per, strict=True)
        )
        may_copy = sum(1 for n, c in zip(lens, per, strict=True) if c and n % BLOCK_SIZE)
        free = self.cache.num_free_blocks
        try:
            slots = self.cache.extend(counts, rows=rows)
        except CacheFullError:
            assert new_blocks + may_copy > free
            return
        assert new_blocks <= free
        assert free - self.cache.num_free_blocks in range(new_blocks, new_blocks + may_copy + 1)
        assert slots.shape == (R, max(per, default=0) if per_row else counts)
        valid = slots[slots >= 0]
        assert valid.unique().numel() == valid.numel() == sum(per)
        markers = torch.zeros(slots.shape, dtype=torch.float32)
        for i, (r, c) in enumerate(zip(idx, per, strict=True)):
            assert (slots[i, c:] == -1).all()
            markers[i, :c] = torch.arange(self.marker, self.marker + c, dtype=torch.float32)
            self.rows[r] += list(range(self.marker, self.marker + c))
            self.marker += c
        for layer in range(LAYERS):
            k = (markers.reshape(-1) + layer / 4)[:, None, None].expand(-1, 1, 4).contiguous()
            ops.write_kv(
                k, -k, self.cache.k_cache(layer), self.cache.v_cache(layer), slots.reshape(-1)
            )

    @rule(
        data=st.data(),
        criterion=st.sampled_from(["keep", "ratio", "threshold"]),
        min_keep=st.integers(0, 3),
    )
    def prune(self, data, criterion, min_keep):
        B = len(self.rows)
        scores = data.draw(st.lists(SCORES, min_size=B, max_size=B))
        value = {
            "keep": st.integers(1, 8),
            "ratio": st.sampled_from(RATIOS),
            "threshold": st.floats(-1, 1.5),
        }[criterion]
        kwargs = {criterion: data.draw(value)}
        kept = oracle_kept(
            scores, kwargs.get("keep"), kwargs.get("ratio"), kwargs.get("threshold"), min_keep
        )
        free = self.cache.num_free_blocks
        result = prune(self.cache, scores, min_keep=min_keep, **kwargs)
        assert result.kept.tolist() == kept
        assert result.dropped.tolist() == sorted(set(range(B)) - set(kept))
        assert result.freed_blocks == self.cache.num_free_blocks - free
        self.rows = [self.rows[i] for i in kept]

    @rule(data=st.data())
    def free(self, data):
        rows = self.draw_rows(data)
        free = self.cache.num_free_blocks
        freed = self.cache.free(rows)
        assert freed == self.cache.num_free_blocks - free
        self.rows = [r for i, r in enumerate(self.rows) if i not in set(rows)]

    @rule(data=st.data())
    def bad_call(self, data):
        B = len(self.rows)
        call = data.draw(
            st.sampled_from(
                [
                    lambda: self.cache.free([B]),
                    lambda: self.cache.free([0, 0]) if B else self.cache.free([0]),
                    lambda: self.cache.extend(-1),
                    lambda: self.cache.extend([1] * (B + 1)),
                    lambda: self.cache.fork(B, 1),
                    lambda: prune(self.cache, [0.0] * (B + 1), keep=1),
                    lambda: prune(self.cache, [0.0] * B, keep=1, ratio=0.5),
                ]
            )
        )
        with pytest.raises(ValueError):  # noqa: PT011 (one of several calls, each its own message)
            call()

    @invariant()
    def matches_the_model(self):
        cache = self.cache
        assert cache.batch_size == len(self.rows)
        assert cache.seq_lens.tolist() == [len(r) for r in self.rows]
        check_accounting(cache)
        layer = torch.arange(LAYERS, dtype=torch.float32)[:, None] / 4
        for b, markers in enumerate(self.rows):
            k = torch.tensor(markers, dtype=torch.float32)[None] + layer  # [layers, len]
            expected = torch.stack([k, -k], dim=1)[..., None, None].expand(-1, -1, -1, 1, 4)
            assert torch.equal(row_contents(cache, b), expected)


CacheMachine.TestCase.settings = settings(
    max_examples=examples(60),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_machine = CacheMachine.TestCase
