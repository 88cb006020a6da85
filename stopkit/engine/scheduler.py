"""Who runs in the next step, under a fixed KV budget (nano-vllm's scheduler + block manager, with
the paged cache of :mod:`stopkit.cache` as the block manager).

State: ``running`` (rows in the KV cache, in cache-row order, with ``logits``: each running row's
next-token logits once it is fully cached) and the groups still waiting to run rows. Priority is
admission order: the oldest group first, and within a group the lowest sample index; a row of
higher priority may preempt rows of lower priority, never the reverse, so the oldest unfinished
group always makes progress and nothing deadlocks.

One step (driven by :class:`~stopkit.engine.Engine`):

1. :meth:`Scheduler.schedule` picks what each running row feeds: the token a decoding row just
   sampled, or a chunk of a row's uncached tokens (a prompt, or a preempted row's tokens being
   recomputed), within ``max_batch_tokens``; blocks are reserved on demand (a row takes a block
   when it crosses a block boundary). When the blocks do not fit, the lowest-priority running
   rows are preempted: their blocks are freed, they keep every token and are recomputed when
   readmitted (vLLM's recompute mode). Then waiting rows are admitted while seats
   (``max_num_seqs``), tokens and blocks allow; a new group only when its prompt and one block per
   path fit above the watermark, so running rows have room to grow.
2. The model runs the packed batch.
3. :meth:`Scheduler.postprocess` counts the fed tokens, keeps the logits of rows now fully cached
   and forks a group's rows from its first row once the prompt is cached (its blocks are shared).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from stopkit.cache import CacheFullError, PagedKVCache
from stopkit.engine.sequence import Group, Row, RowStatus

__all__ = ["Scheduler", "ScheduledBatch", "SchedulerStats", "WATERMARK"]

log = logging.getLogger(__name__)

WATERMARK = 0.01  # share of the blocks a new group must leave free (room for running rows to grow)


@dataclass
class ScheduledBatch:
    """What one step feeds: ``rows[i]`` (running, cache row ``cache_rows[i]``) feeds ``counts[i]``
    of its uncached tokens, whose KV goes to ``slots`` (packed, int64 ``[sum(counts)]``)."""

    rows: list[Row]
    cache_rows: list[int]
    starts: list[int]
    counts: list[int]
    slots: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)


@dataclass
class SchedulerStats:
    """Counters since the scheduler was created (or :meth:`Scheduler.reset_stats`)."""

    steps: int = 0
    preemptions: int = 0          # rows preempted (freed, to be recomputed)
    recomputed_tokens: int = 0    # tokens fed again after a preemption
    prefill_tokens: int = 0
    decode_tokens: int = 0
    peak_blocks: int = 0          # most blocks in use at once
    peak_rows: int = 0
    extra: dict = field(default_factory=dict)


def _priority(row: Row) -> tuple[int, int]:
    return row.group.order, row.sample_index


class Scheduler:
    """Admission, preemption and block reservation over ``cache`` (module docstring).

    max_num_seqs: running rows at most (a group's rows all need a seat at once to be admitted).
    max_batch_tokens: tokens fed in one step at most (decode tokens count one each).
    """

    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int, max_batch_tokens: int,
                 watermark: float = WATERMARK) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.watermark_blocks = math.ceil(watermark * cache.num_blocks)
        self.running: list[Row] = []
        self.logits: torch.Tensor | None = None   # float32 [len(running), V]
        self.groups: list[Group] = []             # unfinished groups, by priority
        self._next_order = 0
        self._session = False
        self._plan: dict[int, int] = {}
        self._reserved = 0
        self._budget = 0
        self.stats = SchedulerStats()

    # ---- checks (nothing changes) --------------------------------------------------------------
    def min_blocks(self, group: Group) -> int:
        """Blocks ``group`` needs at once at least: its prompt's blocks plus, per row, the blocks
        from its partial prompt block to its first check (to its first token without checks)."""
        bs = self.cache.block_size
        P = len(group.prompt)
        upto = P + (group.checks[0] if group.checks else 1)
        return -(-P // bs) + group.n * (-(-upto // bs) - P // bs)

    def has_work(self) -> bool:
        """Some group has a live row."""
        return any(not g.done for g in self.groups)

    def index_of(self, rows: Iterable[Row]) -> list[int]:
        """Cache rows of running ``rows``."""
        where = {id(r): i for i, r in enumerate(self.running)}
        return [where[id(r)] for r in rows]

    def decode_rows(self) -> list[Row]:
        """Running rows that sample this step: fully cached, live, not at a check."""
        return [r for r in self.running
                if r.num_cached == r.num_tokens and r.live and not r.at_check]

    # ---- requests ------------------------------------------------------------------------------
    def add(self, group: Group, *, session: bool = False) -> None:
        """Queue ``group`` (lowest priority). CacheFullError when it can never fit. session: a
        batch driven by hand, which has no seat limit."""
        bs, nb = self.cache.block_size, self.cache.num_blocks
        need = self.min_blocks(group)
        if need > nb:
            raise CacheFullError(
                f"a request of {group.n} paths with a {len(group.prompt)}-token prompt needs at "
                f"least {need} blocks of {bs} tokens at once; the KV cache has {nb}")
        longest = len(group.prompt) + (group.sampling.max_new_tokens or 0)
        if -(-longest // bs) > nb:
            raise CacheFullError(f"a path of {longest} tokens (prompt + max_new_tokens) needs "
                                 f"{-(-longest // bs)} blocks of {bs} tokens; the KV cache has {nb}")
        if group.n > self.max_num_seqs and not session:
            raise ValueError(f"n must be <= max_num_seqs ({self.max_num_seqs}) so that a request's "
                             f"paths run together, got {group.n}")
        group.order = self._next_order
        self._next_order += 1
        self.groups.append(group)

    def end(self, rows: Iterable[Row], reason: str) -> int:
        """End live ``rows`` (any state) with ``reason``; see :meth:`release`."""
        rows = [r for r in rows if r.live]
        for r in rows:
            r.finish_reason = reason
        return self.release(rows)

    def release(self, rows: Iterable[Row]) -> int:
        """Rows that just ended (finish_reason set) leave the cache at once. Returns the blocks
        freed."""
        rows = [r for r in rows if r.status is not RowStatus.DONE]
        running = [r for r in rows if r.status is RowStatus.RUNNING]
        for r in rows:
            r.status = RowStatus.DONE
        return self._release(running, RowStatus.DONE)

    def finished_groups(self) -> list[Group]:
        """Remove and return the groups whose rows all ended."""
        done = [g for g in self.groups if g.done]
        if done:
            self.groups = [g for g in self.groups if not g.done]
        return done

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, *, session: bool = False) -> ScheduledBatch | None:
        """Plan and reserve one step (module docstring); None when nothing can be fed.

        session: a batch driven by hand (:class:`~stopkit.engine.Session`): no seat limit, no
        watermark, and CacheFullError (nothing changed) instead of preempting."""
        self._session = session
        self._plan: dict[int, int] = {}  # id(row) -> tokens fed
        self._reserved = 0               # blocks the plan takes (an upper bound)
        self._budget = self.max_batch_tokens
        feeding = sorted((r for r in self.running if r.num_cached < r.num_tokens), key=_priority)
        # decode tokens (one each) first, then prefill chunks; oldest groups first within each
        feeding.sort(key=lambda r: r.num_tokens - r.num_cached > 1)
        for row in feeding:
            if self._budget == 0:
                break
            if row.status is RowStatus.RUNNING:  # (not preempted earlier in this loop)
                self._feed(row, preempt=not session)
        self._admit()
        if not self._plan and not session:
            self._admit(stalled=True)
        if not self._plan:
            return None
        rows = [r for r in self.running if id(r) in self._plan]
        cache_rows = self.index_of(rows)
        counts = [self._plan[id(r)] for r in rows]
        slots = self.cache.extend(counts, rows=cache_rows)  # fits: the plan reserved a bound
        valid = torch.arange(slots.shape[1], device=slots.device) < torch.tensor(
            counts, device=slots.device)[:, None]
        self.stats.steps += 1
        self._peaks()
        return ScheduledBatch(rows, cache_rows, [r.num_cached for r in rows], counts, slots[valid])

    def postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        """Count the fed tokens; ``logits`` float32 ``[R, V]`` are those of the batch rows now
        fully cached, in batch order. A row that just cached its prompt (no tokens yet) is forked
        for its waiting siblings (sharing its blocks and copying its logits)."""
        done = []
        for r, start, c in zip(batch.rows, batch.starts, batch.counts):
            r.num_cached = start + c
            if c == 1 and start >= len(r.prompt) and r.num_cached == r.num_tokens:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += c
            if r.num_cached == r.num_tokens:
                done.append(r)
        if done:
            if self.logits is None or self.logits.shape[1] != logits.shape[1]:
                self.logits = logits.new_zeros(len(self.running), logits.shape[1])
            self.logits[torch.tensor(self.index_of(done), device=logits.device)] = logits
        for r in done:
            if not r.tokens:
                self._launch_forks(r)

    # ---- internals -----------------------------------------------------------------------------
    def _available(self) -> int:
        return self.cache.num_free_blocks - self._reserved

    def _feed(self, row: Row, *, preempt: bool) -> None:
        """Plan as many of ``row``'s uncached tokens as the budget and the blocks allow,
        preempting lower-priority rows for blocks when ``preempt``."""
        want = min(row.num_tokens - row.num_cached, self._budget)
        while True:
            idx = self.index_of([row])[0]
            need = self.cache.blocks_needed(want, rows=[idx])
            if need <= self._available():
                break
            if self._session:
                raise CacheFullError(f"the KV cache needs {need} more blocks but only "
                                     f"{self._available()} of {self.cache.num_blocks} are free")
            victims = [r for r in self.running if id(r) not in self._plan and r is not row]
            victim = max(victims, key=_priority, default=None)
            if not preempt or victim is None or _priority(victim) < _priority(row):
                want = self._tokens_fitting(idx, want)
                need = self.cache.blocks_needed(want, rows=[idx])
                break
            self._preempt(victim)
        if want:
            self._plan[id(row)] = want
            self._reserved += need
            self._budget -= want

    def _tokens_fitting(self, idx: int, want: int) -> int:
        """The most of ``want`` tokens cache row ``idx`` can store in the available blocks."""
        lo, hi = 0, want
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cache.blocks_needed(mid, rows=[idx]) <= self._available():
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _seats(self) -> int:
        return 1 << 30 if self._session else self.max_num_seqs - len(self.running)

    def _admit(self, *, stalled: bool = False) -> None:
        """Admit waiting rows by priority while seats, tokens and blocks (above the watermark)
        allow, first come first served. stalled: nothing else can run, so idle rows of lower
        priority may be preempted to readmit the oldest waiting row (no deadlock at checks)."""
        bs = self.cache.block_size
        watermark = 0 if self._session or stalled else self.watermark_blocks
        for group in list(self.groups):
            waiting = [r for r in group.rows if r.status is RowStatus.WAITING and r.live]
            if not waiting:
                continue
            if self._budget == 0 or self._seats() <= 0:
                return
            if not group.started:
                # a new group: its prompt and one block per path, and a seat for every path
                reserve = -(-len(group.prompt) // bs) + group.n
                if self._seats() < group.n or self._available() - watermark < reserve:
                    if self._session:
                        raise CacheFullError(
                            f"the prompts need {reserve} more blocks of {bs} tokens; the KV cache "
                            f"has {self._available()} free")
                    return
                group.started = True
                self._start(waiting[0], None)
                self._feed(waiting[0], preempt=False)
                continue
            caching_prompt = any(r.status is RowStatus.RUNNING and not r.tokens
                                 and r.num_cached < r.num_tokens for r in group.rows)
            for row in waiting:
                if self._budget == 0 or self._seats() <= 0:
                    return
                if not row.tokens and caching_prompt:
                    continue  # forked from its sibling once the prompt is cached
                shared = min(len(row.prompt), row.num_tokens - 1) // bs * bs
                source = next((r for r in group.rows if r.status is RowStatus.RUNNING
                               and r.num_cached >= shared), None) if shared else None
                if source is None:
                    shared = 0
                    if any(r.status is RowStatus.RUNNING for r in group.rows):
                        continue  # a sibling is caching the shared prefix: fork from it later
                chunk = min(row.num_tokens - shared, self._budget)
                need = -(-(shared + chunk) // bs) - shared // bs
                while self._available() - watermark < need and stalled:
                    idle = [r for r in self.running if id(r) not in self._plan
                            and _priority(r) > _priority(row)]
                    if not idle:
                        break
                    self._preempt(max(idle, key=_priority))
                if self._available() - watermark < need:
                    return
                self._start(row, source, shared)
                self._feed(row, preempt=False)
                self.stats.recomputed_tokens += self._plan.get(id(row), 0)
                if stalled:
                    return

    def _start(self, row: Row, source: Row | None, shared: int = 0) -> None:
        """Put a waiting row in the cache: sharing ``source``'s first ``shared`` tokens (whole
        blocks, so neither row ever copies one for the other), or empty."""
        if source is None:
            self.cache.add(1)
            row.num_cached = 0
        else:
            self.cache.fork(self.index_of([source])[0], 1, length=shared)
            row.num_cached = shared
        row.status = RowStatus.RUNNING
        self.running.append(row)
        if self.logits is not None:
            self.logits = torch.cat([self.logits, self.logits.new_zeros(1, self.logits.shape[1])])

    def _launch_forks(self, row: Row) -> None:
        """``row`` just cached its prompt (no tokens yet): fork it for each waiting sibling that
        has no tokens either, as seats allow."""
        waiting = [r for r in row.group.rows
                   if r.status is RowStatus.WAITING and r.live and not r.tokens]
        waiting = waiting[:max(0, self._seats())]
        if not waiting:
            return
        idx = self.index_of([row])[0]
        self.cache.fork(idx, len(waiting))
        for r in waiting:
            r.status, r.num_cached = RowStatus.RUNNING, row.num_cached
        self.running += waiting
        self.logits = torch.cat([self.logits, self.logits[idx].expand(len(waiting), -1)])
        self._peaks()

    def _preempt(self, row: Row) -> int:
        """Free a running row's blocks; it waits to be recomputed. Returns the blocks freed."""
        self.stats.preemptions += 1
        log.debug("preempting row %d of request %d (%d tokens)", row.sample_index,
                  row.group.index, row.num_tokens)
        return self._release([row], RowStatus.WAITING)

    def _release(self, rows: list[Row], status: RowStatus) -> int:
        """Free running ``rows`` from the cache (compacting the others) and set their status."""
        if not rows:
            return 0
        idx = self.index_of(rows)
        freed = self.cache.free(idx)
        gone = set(idx)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(keep, dtype=torch.int64,
                                                   device=self.logits.device)]
        for r in rows:
            r.status, r.num_cached = status, 0
        return freed

    def _peaks(self) -> None:
        s = self.stats
        s.peak_blocks = max(s.peak_blocks, self.cache.num_blocks - self.cache.num_free_blocks)
        s.peak_rows = max(s.peak_rows, len(self.running))
