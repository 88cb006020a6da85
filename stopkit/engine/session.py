"""A batch of samples driven by hand (:meth:`Engine.start`): step, score, prune, resume.

Every row of a session stays in the KV cache until it ends (nothing is preempted), so the
session's live rows are always the cache's rows, in cache order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from stopkit._checks import check_int
from stopkit.engine.sequence import Group, Row
from stopkit.pruning import PruneResult, Scores, select

if TYPE_CHECKING:
    from stopkit.engine.engine import Engine

__all__ = ["Session"]


class Session:
    """Live decoding state of a batch of samples on an :class:`~stopkit.engine.Engine`.

    ``rows`` are the LIVE rows in cache order: row i of :meth:`forward_suffix`'s output, entry i of
    the scores given to :meth:`prune`. ``all_rows`` lists every row in launch order (prompt, then
    sample). A row that finishes (EOS or max_new_tokens) or is dropped leaves ``rows`` and the cache
    at once (its blocks are freed); its tokens stay readable in ``all_rows``. One session per
    engine at a time; :meth:`Engine.start` closes the previous one. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, engine: Engine, groups: list[Group]) -> None:
        self.engine = engine
        self.groups = groups
        self.all_rows = [r for g in groups for r in g.rows]
        self.closed = False

    @property
    def rows(self) -> list[Row]:
        """The live rows, in cache order."""
        return [] if self.closed else list(self.engine.scheduler.running)

    # ---- decoding ------------------------------------------------------------------------------
    def step(self, max_tokens: int = 1) -> int:
        """Decode up to ``max_tokens`` tokens for every live row (fewer for rows that finish).
        Returns the number of tokens generated. Raises CacheFullError when the cache cannot hold
        the next token; rows that finished in that step are recorded, the others are unchanged."""
        self._check_open()
        max_tokens = check_int("max_tokens", max_tokens, low=1)
        produced = 0
        for _ in range(max_tokens):
            if not self.engine.scheduler.running:
                break
            produced += len(self.engine._step(session=True).sampled)
        return produced

    # ---- pruning -------------------------------------------------------------------------------
    def prune(
        self,
        scores: Scores,
        *,
        keep: int | None = None,
        ratio: float | None = None,
        threshold: float | None = None,
        min_keep: int = 1,
    ) -> PruneResult:
        """Keep the best live rows by ``scores`` (``[len(rows)]``, higher is better) with
        :func:`stopkit.prune`'s criteria (NaN last, ties to the lower index); the others end as
        "pruned", their blocks freed. Returns the PruneResult (indices into the rows before)."""
        self._check_open()
        rows = self.rows
        kept, dropped = select(
            scores, len(rows), keep=keep, ratio=ratio, threshold=threshold, min_keep=min_keep
        )
        freed = self.engine.end_rows([rows[i] for i in dropped.tolist()], "pruned")
        return PruneResult(kept, dropped, freed)

    def drop(self, rows: Sequence[int] | torch.Tensor) -> int:
        """End the live rows at indices ``rows`` as "pruned"; returns the number of blocks freed."""
        self._check_open()
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        rows = sorted({check_int("rows[i]", r, low=0) for r in rows})
        live = self.rows
        if rows and rows[-1] >= len(live):
            raise ValueError(f"rows must lie in [0, {len(live)}), got {rows[-1]}")
        return self.engine.end_rows([live[i] for i in rows], "pruned")

    # ---- scoring -------------------------------------------------------------------------------
    def forward_suffix(
        self,
        inputs_embeds: torch.Tensor,
        adapter: AbstractContextManager | Callable | None = None,
        *,
        final_norm: bool = False,
    ) -> torch.Tensor:
        """:meth:`Engine.forward_suffix` over every live row (``inputs_embeds`` ``[len(rows), K,
        hidden_size]``)."""
        self._check_open()
        return self.engine.forward_suffix(self.rows, inputs_embeds, adapter, final_norm=final_norm)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """End every live row ("aborted") and free its blocks. Idempotent."""
        if self.closed:
            return
        self.engine.end_rows(self.all_rows, "aborted")
        self.engine.scheduler.finished_groups()
        self.closed = True
        if self.engine._session is self:
            self.engine._session = None

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "this session is closed (closed explicitly, or the engine started another one)"
            )

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
