"""Paged KV cache: one storage tensor of fixed-size blocks, a refcounted block allocator and the
per-row block tables the attention kernels read (layouts: docs/DESIGN.md section 3).

A row is one live sequence. Forked rows share blocks (reference counts, no KV copied); the only
shared block a row can write is a partially filled last block, and :meth:`PagedKVCache.extend`
copies it first (copy-on-write). Allocator state lives on the CPU in numpy arrays (a decode step's
bookkeeping is a few dozen small array ops); ``block_table`` and ``seq_lens`` are device tensors
rebuilt only after they changed.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch

from stopkit import ops
from stopkit._checks import check_dtype, check_int

__all__ = ["PagedKVCache", "CacheFullError", "zeros_kv_storage"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HUGE_PAGE = 2 << 20
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
logger = logging.getLogger(__name__)


@functools.cache
def _warn_plain_pages(why: str) -> None:
    """Logged once per reason: the cache works, but attention on 4 KiB pages is slower."""
    logger.warning(
        "KV cache storage on 4 KiB pages (%s): paged attention reads scattered blocks "
        "and pays a TLB miss on nearly each one",
        why,
    )


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never); None where unknown."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


class CacheFullError(RuntimeError):
    """Not enough free blocks for a reservation. Raised before any state changes."""


# Row indices or per-row counts as callers give them: ints, or a 1-D integer tensor or array.
Ints: TypeAlias = "Sequence[int] | torch.Tensor | np.ndarray"


def _int_array(name: str, values: Ints, low: int, high: int) -> np.ndarray:
    """A 1-D int64 array in ``[low, high]`` from a sequence of ints or a 1-D integer tensor
    (vectorised: rows and counts come every decode step); errors worded as check_ints'."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(
                f"{name} must hold ints, got a {str(values.dtype).removeprefix('torch.')} tensor"
            )
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        out = values.detach().cpu().numpy().astype(np.int64)
    elif not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of ints or a 1-D integer tensor, "
            f"got {type(values).__name__}"
        )
    elif (
        isinstance(values, (list, tuple, np.ndarray))
        and (arr := np.asarray(values)).ndim == 1
        and arr.dtype.kind in "iu"
    ):  # the common case, without a Python loop
        out = arr.astype(np.int64, copy=False)
    else:
        out = np.array([check_int(f"{name}[{i}]", v) for i, v in enumerate(values)], dtype=np.int64)
    bad = np.flatnonzero((out < low) | (out > high))
    if bad.size:
        check_int(f"{name}[{bad[0]}]", int(out[bad[0]]), low, high)
    return out


def _cdiv(x: Any, d: int) -> Any:  # an int or an integer array
    return -(-x // d)


def zeros_kv_storage(
    shape: list[int] | tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A zero-filled tensor of ``shape`` for KV pages. On a Linux CPU, storage of 2 MiB or more
    is mapped on transparent huge pages where the kernel allows them (``madvise`` or ``always``
    mode): attention reads blocks scattered over the whole storage, and with 4 KiB pages nearly
    every block costs a TLB miss. Elsewhere, or when huge pages are off (logged once as a warning),
    plain pages."""
    if not isinstance(shape, (list, tuple)):
        raise TypeError(f"shape must be a list or tuple of ints, got {type(shape).__name__}")
    shape = [check_int(f"shape[{i}]", n, 0) for i, n in enumerate(shape)]
    check_dtype("dtype", dtype, _DTYPES)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    if device.type != "cpu" or nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    # Anonymous private memory is zero-filled and faulted in lazily, so the advice applies to every
    # page; over-allocate one huge page to start on a 2 MiB boundary.
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _thp_mode() == "never":
        _warn_plain_pages(f"transparent huge pages are off: {_THP_MODE} is [never]")
    else:
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:  # not supported here: the plain pages of the mapping serve as well
            _warn_plain_pages(f"madvise(MADV_HUGEPAGE) failed: {e.strerror}")
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


class PagedKVCache:
    """K/V of every layer in ``num_blocks`` blocks of ``block_size`` tokens, shared by the rows.

    storage ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; ``k_cache(l)`` /
    ``v_cache(l)`` are its ``[num_blocks, block_size, num_kv_heads, head_dim]`` views. Row b holds
    ``seq_lens[b]`` tokens; token t lives in block ``block_table[b, t // block_size]``. A row always
    owns exactly ``ceil(seq_lens[b] / block_size)`` blocks.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = [
            check_int(name, value, 1)
            for name, value in (
                ("num_layers", num_layers),
                ("num_blocks", num_blocks),
                ("block_size", block_size),
                ("num_kv_heads", num_kv_heads),
                ("head_dim", head_dim),
            )
        ]
        shape.insert(1, 2)
        # zeros, not empty: kernels may load a whole block even past a row's last token
        self.storage = zeros_kv_storage(shape, dtype, device)
        self.device = self.storage.device
        self._ref = np.zeros(num_blocks, dtype=np.int32)  # rows holding each block
        # free-block stack, popped from the end (lowest ids first on a fresh cache)
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)
        self._num_free = num_blocks
        self._table = np.zeros((0, 1), dtype=np.int32)  # [batch, column capacity]
        self._lens = np.zeros(0, dtype=np.int64)  # [batch]
        self._dev_table: torch.Tensor | None = None
        self._dev_lens: torch.Tensor | None = None

    @classmethod
    def for_model(
        cls,
        config: Any,
        *,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> PagedKVCache:
        """A cache shaped for a transformers config (its text config for multimodal wrappers):
        num_hidden_layers, num_key_value_heads (default num_attention_heads), head_dim (default
        hidden_size // num_attention_heads). Give exactly one of num_blocks and memory_bytes (the
        storage budget; the cache takes as many whole blocks as fit). dtype defaults to the
        config's dtype when it is float32/float16/bfloat16, else float32."""
        if (num_blocks is None) == (memory_bytes is None):
            raise ValueError("give exactly one of num_blocks and memory_bytes")
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        for attr in ("num_hidden_layers", "num_attention_heads"):
            if not isinstance(getattr(config, attr, None), int):
                raise ValueError(
                    f"config must have an int {attr}, got {getattr(config, attr, None)!r}"
                )
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, None)
            dtype = dtype if dtype in _DTYPES else torch.float32
        else:
            check_dtype("dtype", dtype, _DTYPES)
        if memory_bytes is not None:
            memory_bytes = check_int("memory_bytes", memory_bytes, 1)
            per_block = (
                config.num_hidden_layers
                * 2
                * check_int("block_size", block_size, 1)
                * kv_heads
                * head_dim
                * dtype.itemsize
            )
            num_blocks = memory_bytes // per_block
            if num_blocks < 1:
                raise ValueError(
                    f"memory_bytes = {memory_bytes} is less than one block "
                    f"({per_block} bytes for this config)"
                )
        assert num_blocks is not None
        return cls(
            config.num_hidden_layers,
            kv_heads,
            head_dim,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=dtype,
            device=device,
        )

    # ---- shape and state -------------------------------------------------------------------
    num_layers = property(lambda self: self.storage.shape[0])
    num_blocks = property(lambda self: self.storage.shape[2])
    block_size = property(lambda self: self.storage.shape[3])
    num_kv_heads = property(lambda self: self.storage.shape[4])
    head_dim = property(lambda self: self.storage.shape[5])
    dtype = property(lambda self: self.storage.dtype)

    @property
    def batch_size(self) -> int:
        """Number of live rows."""
        return self._lens.shape[0]

    @property
    def num_free_blocks(self) -> int:
        """Blocks no row holds."""
        return self._num_free

    @property
    def memory_bytes(self) -> int:
        """Bytes of KV storage."""
        return self.storage.numel() * self.storage.element_size()

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys, a view ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self.storage[self._layer(layer), 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s values, a view ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self.storage[self._layer(layer), 1]

    @property
    def block_table(self) -> torch.Tensor:
        """int32 ``[batch, max blocks any row uses (at least 1)]`` on the cache's device; entries
        past a row's blocks are padding (0). Rebuilt only after rows or blocks changed; treat it as
        read-only."""
        if self._dev_table is None:
            width = max(1, _cdiv(int(self._lens.max()), self.block_size)) if self.batch_size else 1
            ids = self._blocks_in_use(slice(None))
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):  # the kernels trust it
                raise RuntimeError(
                    f"PagedKVCache bug: a block id in use lies outside [0, {self.num_blocks})"
                )
            table = torch.from_numpy(self._table[:, :width])
            self._dev_table = torch.empty(table.shape, dtype=torch.int32, device=self.device).copy_(
                table
            )
        return self._dev_table

    @property
    def seq_lens(self) -> torch.Tensor:
        """int32 ``[batch]`` on the cache's device: tokens reserved in each row. Read-only."""
        if self._dev_lens is None:
            self._dev_lens = torch.empty(
                self.batch_size, dtype=torch.int32, device=self.device
            ).copy_(torch.from_numpy(self._lens))
        return self._dev_lens

    # ---- rows ------------------------------------------------------------------------------
    def add(self, n: int = 1) -> list[int]:
        """Append ``n`` empty rows; returns their indices."""
        n = check_int("n", n, 0)
        first = self.batch_size
        self._set_rows(
            np.concatenate([self._table, np.zeros((n, self._table.shape[1]), np.int32)]),
            np.concatenate([self._lens, np.zeros(n, np.int64)]),
        )
        return list(range(first, first + n))

    def fork(self, row: int, n: int = 1, *, length: int | None = None) -> list[int]:
        """Append ``n`` rows sharing the blocks of ``row``'s first ``length`` tokens (default: all
        of them; no KV copied); returns their indices. A shared, partially filled last block is
        copied only when a fork writes into it (:meth:`extend`)."""
        row = self._row(row)
        n = check_int("n", n, 0)
        own = int(self._lens[row])
        length = own if length is None else check_int("length", length, 0, own)
        first = self.batch_size
        shared = _cdiv(length, self.block_size)
        self._ref[self._table[row, :shared]] += n  # held once more by each fork
        table = np.zeros((n, self._table.shape[1]), np.int32)
        table[:, :shared] = self._table[row, :shared]
        self._set_rows(
            np.concatenate([self._table, table]),
            np.concatenate([self._lens, np.full(n, length, np.int64)]),
        )
        return list(range(first, first + n))

    def free(self, rows: Ints) -> int:
        """Drop ``rows`` (ints or a 1-D integer tensor), release blocks no row holds any more and
        compact the surviving rows to 0..k-1 in their original order (metadata only). Returns the
        number of blocks released."""
        rows = self._rows(rows)
        keep = np.ones(self.batch_size, dtype=bool)
        keep[rows] = False
        held = self._blocks_in_use(rows)
        drops = np.bincount(held, minlength=self.num_blocks)
        self._ref -= drops.astype(np.int32)
        freed = np.flatnonzero((drops > 0) & (self._ref == 0))
        self._free[self._num_free : self._num_free + freed.size] = freed
        self._num_free += freed.size
        self._set_rows(self._table[keep], self._lens[keep])
        return int(freed.size)

    def extend(self, num_tokens: int | Ints, *, rows: Ints | None = None) -> torch.Tensor:
        """Reserve the next ``num_tokens`` positions of every row (or of ``rows``) and return their
        slots, int64 ``[len(rows), T]`` on the cache's device, for :func:`stopkit.ops.write_kv`.

        num_tokens: an int (T = num_tokens) or one count per row (T = the largest; a row's slots
        past its count are -1, which write_kv skips). Allocates blocks as rows need them; a shared,
        partially filled last block about to be written is copied first (one holder keeps it when
        every holder is written). Raises CacheFullError, changing nothing, when the blocks do not
        fit. Write the reserved slots before forking the row.
        """
        rows, counts, T = self._counts(num_tokens, rows)
        bs = self.block_size
        old = self._lens[rows]
        old_blocks = _cdiv(old, bs)
        grow = _cdiv(old + counts, bs) - old_blocks
        cow_rows, cow_cols, cow_src = self._cow_plan(rows, counts, old, old_blocks)
        num_new = int(grow.sum())
        needed = num_new + len(cow_rows)
        if needed > self._num_free:
            raise CacheFullError(
                f"the KV cache needs {needed} blocks ({num_new} new, {len(cow_rows)} "
                f"copy-on-write) but only {self._num_free} of {self.num_blocks} "
                f"are free"
            )
        # nothing below can fail: state changes start here
        fresh = self._free[self._num_free - needed : self._num_free][::-1].copy()
        self._num_free -= needed
        self._ref[fresh] = 1
        if cow_rows:
            dst = fresh[: len(cow_rows)]
            self._copy_blocks(cow_src, dst)
            self._ref -= np.bincount(cow_src, minlength=self.num_blocks).astype(np.int32)
            self._table[cow_rows, cow_cols] = dst
        if num_new:
            width = int((old_blocks + grow).max())
            if width > self._table.shape[1]:
                extra = max(width, 2 * self._table.shape[1]) - self._table.shape[1]
                self._table = np.pad(self._table, ((0, 0), (0, extra)))
            offset = np.arange(num_new) - np.repeat(np.cumsum(grow) - grow, grow)
            self._table[np.repeat(rows, grow), np.repeat(old_blocks, grow) + offset] = fresh[
                len(cow_rows) :
            ]
        if needed:
            self._dev_table = None
        self._lens[rows] = old + counts
        self._dev_lens = None

        step = np.arange(T)
        pos = old[:, None] + step
        cols = np.minimum(pos // bs, self._table.shape[1] - 1)
        slots = self._table[rows[:, None], cols].astype(np.int64) * bs + pos % bs
        slots[step >= counts[:, None]] = -1
        return torch.from_numpy(slots).to(self.device)

    def blocks_needed(self, num_tokens: int | Ints, *, rows: Ints | None = None) -> int:
        """Free blocks :meth:`extend` would take for the same arguments (new blocks plus
        copy-on-write copies); changes nothing."""
        rows, counts, _ = self._counts(num_tokens, rows)
        old = self._lens[rows]
        old_blocks = _cdiv(old, self.block_size)
        grow = _cdiv(old + counts, self.block_size) - old_blocks
        return int(grow.sum()) + len(self._cow_plan(rows, counts, old, old_blocks)[0])

    def row_blocks_needed(self, num_tokens: int | Ints, rows: Ints | None) -> np.ndarray:
        """Per row, an upper bound of the blocks :meth:`extend` takes for it (a shared, partially
        filled last block counted as copied; extend copies one fewer when all its holders write):
        int64 ``[len(rows)]``. Changes nothing."""
        rows, counts, _ = self._counts(num_tokens, rows)
        bs = self.block_size
        old = self._lens[rows]
        need = _cdiv(old + counts, bs) - _cdiv(old, bs)
        partial = (counts > 0) & (old % bs != 0)
        if partial.any():
            last = self._table[rows[partial], old[partial] // bs]
            need[partial] += self._ref[last] > 1
        return need

    # ---- internals -------------------------------------------------------------------------
    def _counts(
        self, num_tokens: int | Ints, rows: Ints | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows, per-row counts, T) of an extend: num_tokens an int or one count per row."""
        rows = np.arange(self.batch_size) if rows is None else self._rows(rows)
        R = rows.size
        if isinstance(num_tokens, Iterable) and not (
            isinstance(num_tokens, torch.Tensor) and num_tokens.dim() == 0
        ):
            counts = _int_array("num_tokens", num_tokens, 0, 1 << 62)
            if counts.size != R:
                raise ValueError(f"num_tokens must have one count per row ({R}), got {counts.size}")
            return rows, counts, (int(counts.max()) if R else 0)
        T = check_int("num_tokens", num_tokens, 0)
        return rows, np.full(R, T, dtype=np.int64), T

    def _cow_plan(
        self, rows: np.ndarray, counts: np.ndarray, old: np.ndarray, old_blocks: np.ndarray
    ) -> tuple[list[int], list[int], list[int]]:
        """(rows, columns, source blocks) of the copies extend must make: rows about to write a
        partially filled last block that other rows hold too. When every holder writes, the first
        keeps the block and only the others copy."""
        partial = (counts > 0) & (old % self.block_size != 0)
        if not partial.any():
            return [], [], []
        rows, cols = rows[partial], old_blocks[partial] - 1
        last = self._table[rows, cols]
        refs = self._ref[last]
        shared = refs > 1
        if not shared.any():
            return [], [], []
        writers = Counter(last[shared].tolist())
        kept_in_place: set[int] = set()
        plan: tuple[list[int], list[int], list[int]] = ([], [], [])
        for r, c, b, n in zip(*(a[shared].tolist() for a in (rows, cols, last, refs)), strict=True):
            if writers[b] == n and b not in kept_in_place:
                kept_in_place.add(b)
                continue
            for out, x in zip(plan, (r, c, b), strict=True):
                out.append(x)
        return plan

    def _copy_blocks(self, src: list[int], dst: np.ndarray) -> None:
        """Copy block src[i] to dst[i] in every layer, K and V: one native call."""
        ops.copy_blocks(
            self.storage,
            torch.tensor(src, dtype=torch.int64, device=self.device),
            torch.from_numpy(dst.astype(np.int64)).to(self.device),
        )

    def _blocks_in_use(self, rows: np.ndarray | slice) -> np.ndarray:
        """The block ids ``rows`` (an index array or slice) hold: each row's first
        ``ceil(len / block_size)`` table entries."""
        used = np.arange(self._table.shape[1]) < _cdiv(self._lens[rows], self.block_size)[:, None]
        return self._table[rows][used]

    def _set_rows(self, table: np.ndarray, lens: np.ndarray) -> None:
        self._table, self._lens = table, lens
        self._dev_table = self._dev_lens = None

    def _layer(self, layer: int) -> int:
        return check_int("layer", layer, 0, self.num_layers - 1)

    def _row(self, row: int) -> int:
        return check_int("row", row, 0, self.batch_size - 1)

    def _rows(self, rows: Ints) -> np.ndarray:
        rows = _int_array("rows", rows, 0, self.batch_size - 1)
        if np.unique(rows).size != rows.size:
            raise ValueError(f"rows must be distinct, got {rows.tolist()}")
        return rows
