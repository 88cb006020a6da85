"""Who runs in the next step, under a fixed KV budget (nano-vllm's scheduler + block manager, with
the paged cache of :mod:`stopkit.cache` as the block manager).

State: ``running`` (rows in the KV cache, in cache-row order, with ``logits``: each running row's
next-token logits once it is fully cached) and the groups that still have rows waiting to run.
Priority is admission order: the oldest group first, and within a group the lowest sample index.
A row of higher priority may preempt rows of lower priority, never the reverse, so the oldest
unfinished group always makes progress.

One step (driven by :class:`~stopkit.engine.Engine`):

1. :meth:`Scheduler.schedule` picks what each running row feeds: the token a decoding row just
   sampled, or a chunk of a row's uncached tokens (a prompt, or a preempted row's tokens being
   recomputed), within ``max_batch_tokens``; blocks are reserved on demand (a row takes a block
   when it crosses a block boundary). When the blocks do not fit, the lowest-priority running
   rows are preempted: their blocks are freed, they keep every token and are recomputed when
   readmitted (vLLM's recompute mode). Then waiting rows are admitted, first come first served,
   while seats (``max_num_seqs``), tokens and blocks above a watermark allow (room for running
   rows to grow): a new group when its prompt and one block per path fit and every path has a
   seat; a preempted row forked from a running sibling's whole prompt blocks. When nothing at all
   can run (rows paused at checks hold the blocks a preempted row of an older group needs), idle
   rows of lower priority are preempted for it, so nothing deadlocks.
2. The model runs the packed batch.
3. :meth:`Scheduler.postprocess` counts the fed tokens, keeps the logits of rows now fully cached
   and forks a group's rows from its first row once the prompt is cached (its blocks are shared).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from stopkit.cache import CacheFullError, PagedKVCache
from stopkit.engine.sequence import Group, Row, RowStatus

__all__ = ["Scheduler", "ScheduledBatch", "SchedulerStats", "WATERMARK"]

log = logging.getLogger(__name__)

WATERMARK = 0.01  # share of the blocks admissions leave free (room for running rows to grow)


@dataclass
class ScheduledBatch:
    """What one step feeds: ``rows[i]`` (running, cache row ``cache_rows[i]``, ``starts[i]``
    tokens cached) feeds ``counts[i]`` of its uncached tokens, whose KV goes to ``slots``
    (packed, int64 ``[sum(counts)]``)."""

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
    """Counters since the scheduler was created."""

    steps: int = 0
    preemptions: int = 0  # rows preempted (freed, to be recomputed)
    recomputed_tokens: int = 0  # tokens fed again after a preemption
    prefill_tokens: int = 0  # prompt and recomputed tokens fed
    decode_tokens: int = 0  # sampled tokens fed
    peak_blocks: int = 0  # most blocks in use at once
    peak_rows: int = 0  # most rows in the cache at once


def _priority(row: Row) -> tuple[float, int]:
    return row.group.order, row.sample_index


class Scheduler:
    """Admission, preemption and block reservation over ``cache`` (module docstring).

    max_num_seqs: running rows at most (a new group's rows all need a seat to be admitted).
    max_batch_tokens: tokens fed in one step at most (decode tokens count one each).
    watermark: share of the blocks admissions leave free.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        *,
        max_num_seqs: int,
        max_batch_tokens: int,
        watermark: float = WATERMARK,
    ) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.watermark_blocks = math.ceil(watermark * cache.num_blocks)
        self.running: list[Row] = []
        self.logits: torch.Tensor | None = None  # float32 [len(running), V]
        self.groups: list[Group] = []  # unfinished groups, by priority
        self.stats = SchedulerStats()
        self._waiting: list[Group] = []  # groups with waiting rows, by priority
        self._ended: set[int] = set()  # id() of groups some row of which ended
        self._pos: dict[int, int] | None = None  # id(row) -> cache row, rebuilt on demand
        self._forks: dict[int, int] = {}  # id(group) -> groups forked from its rows
        self._next_order = 0
        # state of the schedule() call in progress
        self._session = False
        self._plan: dict[int, int] = {}  # id(row) -> tokens to feed
        self._reserved = 0  # blocks the plan takes (an upper bound)
        self._budget = 0  # tokens left in the step

    # ---- checks (nothing changes) --------------------------------------------------------------
    def min_blocks(self, group: Group) -> int:
        """Blocks ``group`` needs at once at least: its prompt's whole blocks (shared) plus, per
        row, its own blocks from there to its first check (to its first token without checks).
        A partly filled prompt block is one row's own: the last row to write it keeps it."""
        bs = self.cache.block_size
        P = len(group.prompt)
        upto = P + (group.checks[0] if group.checks else 1)
        return P // bs + group.n * (-(-upto // bs) - P // bs)

    def has_work(self) -> bool:
        """Some queued group has a live row."""
        return any(not g.done for g in self.groups)

    def index_of(self, rows: Iterable[Row]) -> list[int]:
        """Cache rows of running ``rows``."""
        if self._pos is None:
            self._pos = {id(r): i for i, r in enumerate(self.running)}
        return [self._pos[id(r)] for r in rows]

    def decode_rows(self) -> list[Row]:
        """Running rows that sample this step: fully cached, live, not at a check."""
        return [
            r for r in self.running if r.num_cached == r.num_tokens and r.live and not r.at_check
        ]

    def check_groups(self) -> list[Group]:
        """Groups whose live rows are all in the cache, fully cached, at their next check."""
        seen: dict[int, Group] = {}
        for r in self.running:
            if r.at_check and id(r.group) not in seen:
                seen[id(r.group)] = r.group
        return [g for g in seen.values() if g.ready_for_check]

    # ---- requests ------------------------------------------------------------------------------
    def add(self, group: Group, *, session: bool = False) -> None:
        """Queue ``group`` (lowest priority). CacheFullError when it can never fit; ValueError
        when it has more rows than seats. session: a batch driven by hand (no seat limit)."""
        bs, nb = self.cache.block_size, self.cache.num_blocks
        need = self.min_blocks(group)
        if need > nb:
            raise CacheFullError(
                f"a request of {group.n} paths with a {len(group.prompt)}-token prompt needs at "
                f"least {need} blocks of {bs} tokens at once; the KV cache has {nb}"
            )
        longest = len(group.prompt) + (group.sampling.max_new_tokens or 0)
        if -(-longest // bs) > nb:
            raise CacheFullError(
                f"a path of {longest} tokens (prompt + max_new_tokens) needs "
                f"{-(-longest // bs)} blocks of {bs} tokens; the KV cache has {nb}"
            )
        if group.n > self.max_num_seqs and not session:
            raise ValueError(
                f"n must be <= max_num_seqs ({self.max_num_seqs}) so that a request's "
                f"paths run together, got {group.n}"
            )
        group.order = self._next_order
        self._next_order += 1
        self.groups.append(group)
        self._waiting.append(group)

    def add_fork(self, group: Group, source: Row) -> None:
        """Queue ``group``, whose prompt is ``source``'s prompt and tokens, with its rows forked
        from ``source`` (running, fully cached: its blocks are shared and its logits copied) as
        seats allow; the others wait (forked from a running sibling later). It runs with the
        priority of ``source``'s group, before anything admitted after that."""
        if not (source.status is RowStatus.RUNNING and source.num_cached == source.num_tokens):
            raise ValueError("the source row must be in the cache and fully cached (at a check)")
        self._forks[id(source.group)] = k = self._forks.get(id(source.group), 0) + 1
        group.order = source.group.order + k / (1 << 20)
        group.started = True
        self.groups.insert(bisect.bisect([g.order for g in self.groups], group.order), group)
        idx = self.index_of([source])[0]
        fork = group.rows[: max(0, self._seats())]
        if fork:
            self.cache.fork(idx, len(fork))
            for r in fork:
                r.status, r.num_cached = RowStatus.RUNNING, source.num_tokens
            self.running += fork
            self._pos = None
            assert self.logits is not None  # the source row is running
            self.logits = torch.cat([self.logits, self.logits[idx].expand(len(fork), -1)])
            self._peaks()
        self._sync_waiting(group)

    def end(self, rows: Iterable[Row], reason: str) -> int:
        """End live ``rows`` (any state) with ``reason``; see :meth:`release`."""
        rows = [r for r in rows if r.live]
        for r in rows:
            r.finish_reason = reason
        return self.release(rows)

    def release(self, rows: Iterable[Row]) -> int:
        """Rows that just ended (finish_reason set) leave the cache and the queue at once.
        Returns the blocks freed."""
        rows = [r for r in rows if r.status is not RowStatus.DONE]
        running = [r for r in rows if r.status is RowStatus.RUNNING]
        waited = {id(r.group): r.group for r in rows if r.status is RowStatus.WAITING}
        for r in rows:
            r.status = RowStatus.DONE
            self._ended.add(id(r.group))
        for g in waited.values():
            self._sync_waiting(g)
        return self._release(running, RowStatus.DONE)

    def finished_groups(self) -> list[Group]:
        """Remove and return the groups whose rows all ended."""
        done = [g for g in self.groups if id(g) in self._ended and g.done]
        self._ended.clear()
        for g in done:
            self._forks.pop(id(g), None)
        if done:
            gone = {id(g) for g in done}
            self.groups = [g for g in self.groups if id(g) not in gone]
            self._waiting = [g for g in self._waiting if id(g) not in gone]
        return done

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self, *, session: bool = False) -> ScheduledBatch | None:
        """Plan and reserve one step (module docstring); None when nothing can be fed.

        session: a batch driven by hand (:class:`~stopkit.engine.Session`): no seat limit, no
        watermark, and CacheFullError (nothing changed) instead of preempting."""
        self._session = session
        self._plan, self._reserved, self._budget = {}, 0, self.max_batch_tokens
        feeding = [r for r in self.running if r.num_cached < r.num_tokens]
        # decode tokens (one each) first, then prefill chunks; oldest groups first within each
        feeding.sort(key=lambda r: (r.num_tokens - r.num_cached > 1, _priority(r)))
        if feeding and not self._plan_all(feeding):
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
        if slots.shape[1] > 1:
            valid = (
                torch.arange(slots.shape[1], device=slots.device)
                < torch.tensor(counts, device=slots.device)[:, None]
            )
            slots = slots[valid]
        self.stats.steps += 1
        self._peaks()
        return ScheduledBatch(
            rows, cache_rows, [r.num_cached for r in rows], counts, slots.reshape(-1)
        )

    def postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        """Count the fed tokens; ``logits`` float32 ``[R, V]`` are those of the batch rows now
        fully cached, in batch order. A row that just cached its prompt (no tokens yet) is forked
        for its waiting siblings (sharing its blocks and copying its logits)."""
        done = []
        for r, start, c in zip(batch.rows, batch.starts, batch.counts, strict=True):
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

    # ---- internals: planning -------------------------------------------------------------------
    def _available(self) -> int:
        return self.cache.num_free_blocks - self._reserved

    def _plan_all(self, feeding: list[Row]) -> bool:
        """The common case in one go: every feeding row's tokens (within the budget) fit in the
        free blocks. Returns whether it planned them."""
        wants, budget = [], self._budget
        for r in feeding:
            take = min(r.num_tokens - r.num_cached, budget)
            wants.append(take)
            budget -= take
        need = self.cache.row_blocks_needed(wants, self.index_of(feeding))
        if int(need.sum()) > self._available():
            return False
        for r, take in zip(feeding, wants, strict=True):
            if take:
                self._plan[id(r)] = take
        self._reserved += int(need.sum())
        self._budget = budget
        return True

    def _blocks(self, row: Row, count: int) -> int:
        return int(self.cache.row_blocks_needed([count], self.index_of([row]))[0])

    def _feed(self, row: Row, *, preempt: bool) -> None:
        """Plan as many of ``row``'s uncached tokens as the budget and the blocks allow,
        preempting lower-priority rows for blocks when ``preempt``."""
        want = min(row.num_tokens - row.num_cached, self._budget)
        while (need := self._blocks(row, want)) > self._available():
            if self._session:
                raise CacheFullError(
                    f"the KV cache needs {need} more blocks but only "
                    f"{self._available()} of {self.cache.num_blocks} are free"
                )
            victim = max(
                (r for r in self.running if id(r) not in self._plan and r is not row),
                key=_priority,
                default=None,
            )
            if not preempt or victim is None or _priority(victim) < _priority(row):
                lo, hi = 0, want  # the most tokens whose blocks fit
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (
                        (mid, hi) if self._blocks(row, mid) <= self._available() else (lo, mid - 1)
                    )
                want, need = lo, self._blocks(row, lo)
                break
            self._preempt(victim)
        if want:
            self._plan[id(row)] = want
            self._reserved += need
            self._budget -= want

    def _seats(self) -> int:
        return 1 << 30 if self._session else self.max_num_seqs - len(self.running)

    def _admit(self, *, stalled: bool = False) -> None:
        """Admit waiting rows by priority while seats, tokens and blocks above the watermark
        allow, first come first served (module docstring). stalled: nothing else can run, so idle
        rows of lower priority may be preempted to readmit the oldest waiting row."""
        bs = self.cache.block_size
        watermark = 0 if self._session or stalled else self.watermark_blocks
        for group in list(self._waiting):
            if self._budget == 0 or self._seats() <= 0:
                return
            waiting = [r for r in group.rows if r.status is RowStatus.WAITING and r.live]
            if not group.started:
                # a new group: its prompt's whole blocks and one block per path (a partly filled
                # prompt block is one path's), and a seat for every path (beside the rows that
                # started groups still have waiting)
                reserve = len(group.prompt) // bs + group.n
                promised = sum(
                    r.status is RowStatus.WAITING and r.live
                    for g in self._waiting
                    if g.started
                    for r in g.rows
                )
                if self._seats() - promised < group.n or self._available() - watermark < reserve:
                    if self._session:
                        raise CacheFullError(
                            f"the prompts need {reserve} more blocks of {bs} tokens; the KV cache "
                            f"has {self._available()} free"
                        )
                    return
                group.started = True
                self._start(waiting[0], None)
                self._feed(waiting[0], preempt=False)
                continue
            caching_prompt = any(
                r.status is RowStatus.RUNNING and not r.tokens and r.num_cached < r.num_tokens
                for r in group.rows
            )
            for row in waiting:
                if self._budget == 0 or self._seats() <= 0:
                    return
                if not row.tokens and caching_prompt:
                    continue  # forked from its sibling once the prompt is cached
                shared = min(len(row.prompt), row.num_tokens - 1) // bs * bs
                source = (
                    next(
                        (
                            r
                            for r in group.rows
                            if r.status is RowStatus.RUNNING and r.num_cached >= shared
                        ),
                        None,
                    )
                    if shared
                    else None
                )
                if source is None:
                    if shared and any(r.status is RowStatus.RUNNING for r in group.rows):
                        continue  # a sibling is caching the shared prefix: fork from it later
                    shared = 0
                chunk = min(row.num_tokens - shared, self._budget)
                need = -(-(shared + chunk) // bs) - shared // bs
                while stalled and self._available() < need:
                    idle = [
                        r
                        for r in self.running
                        if id(r) not in self._plan and _priority(r) > _priority(row)
                    ]
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

    # ---- internals: state changes --------------------------------------------------------------
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
        self._pos = None
        if self.logits is not None:
            self.logits = torch.cat([self.logits, self.logits.new_zeros(1, self.logits.shape[1])])
        self._sync_waiting(row.group)

    def _launch_forks(self, row: Row) -> None:
        """``row`` just cached its prompt (no tokens yet): fork it for each waiting sibling that
        has no tokens either, as seats allow."""
        waiting = [
            r for r in row.group.rows if r.status is RowStatus.WAITING and r.live and not r.tokens
        ]
        waiting = waiting[: max(0, self._seats())]
        if not waiting:
            return
        idx = self.index_of([row])[0]
        self.cache.fork(idx, len(waiting))
        for r in waiting:
            r.status, r.num_cached = RowStatus.RUNNING, row.num_cached
        self.running += waiting
        self._pos = None
        assert self.logits is not None  # the source row is running
        self.logits = torch.cat([self.logits, self.logits[idx].expand(len(waiting), -1)])
        self._sync_waiting(row.group)
        self._peaks()

    def _preempt(self, row: Row) -> int:
        """Free a running row's blocks; it waits to be recomputed. Returns the blocks freed."""
        self.stats.preemptions += 1
        log.debug(
            "preempting row %d of request %d (%d tokens)",
            row.sample_index,
            row.group.index,
            row.num_tokens,
        )
        freed = self._release([row], RowStatus.WAITING)
        self._sync_waiting(row.group)
        return freed

    def _release(self, rows: list[Row], status: RowStatus) -> int:
        """Free running ``rows`` from the cache (compacting the others) and set their status."""
        if not rows:
            return 0
        idx = self.index_of(rows)
        freed = self.cache.free(idx)
        gone = set(idx)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        self._pos = None
        if self.logits is not None:
            self.logits = self.logits[
                torch.tensor(keep, dtype=torch.int64, device=self.logits.device)
            ]
        for r in rows:
            r.status, r.num_cached = status, 0
        return freed

    def _sync_waiting(self, group: Group) -> None:
        """Keep ``group`` in the waiting list exactly while it has a waiting live row."""
        has = any(r.status is RowStatus.WAITING and r.live for r in group.rows)
        listed = any(g is group for g in self._waiting)
        if has and not listed:
            orders = [g.order for g in self._waiting]
            self._waiting.insert(bisect.bisect(orders, group.order), group)
        elif listed and not has:
            self._waiting = [g for g in self._waiting if g is not group]

    def _peaks(self) -> None:
        s = self.stats
        s.peak_blocks = max(s.peak_blocks, self.cache.num_blocks - self.cache.num_free_blocks)
        s.peak_rows = max(s.peak_rows, len(self.running))
