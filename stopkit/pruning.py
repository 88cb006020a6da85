"""Pruning a batch: :func:`prune` keeps the best-scoring rows of a PagedKVCache, frees the
others and compacts the kept ones (exported as ``stopkit.prune``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import torch

from stopkit._checks import check_int, check_real
from stopkit.cache import PagedKVCache

__all__ = ["prune", "PruneResult", "ranking", "select"]


class PruneResult(NamedTuple):
    """kept, dropped: int64 CPU tensors of old row indices, ascending; freed_blocks: blocks
    released. Kept row ``kept[i]`` is row i of the cache afterwards."""

    kept: torch.Tensor
    dropped: torch.Tensor
    freed_blocks: int


# One real score per row: a tensor (any real dtype and device) or a sequence of numbers.
Scores: TypeAlias = "torch.Tensor | Sequence[float]"


def _scores(scores: Scores, batch: int) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        if scores.dtype.is_complex or scores.dtype == torch.bool:
            raise TypeError(f"scores must be real numbers, got {scores.dtype}")
        scores = scores.detach().to("cpu", torch.float64)
    else:
        try:
            scores = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"scores must be a 1-D tensor or a list of numbers: {e}") from None
    if scores.shape != (batch,):
        raise ValueError(
            f"scores must have shape ({batch},), one per cache row, got {tuple(scores.shape)}"
        )
    return scores


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Row indices best first (int64 ``[batch]``) for float scores ``[batch]``: higher first, NaN
    last, ties to the lower index. The order stopkit.prune keeps rows in."""
    nan = scores.isnan()
    order = torch.sort(scores.masked_fill(nan, -math.inf), descending=True, stable=True).indices
    return order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]


def select(
    scores: Scores,
    batch: int,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    threshold: float | None = None,
    min_keep: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, dropped): int64 CPU tensors of row indices, ascending, for ``scores`` ``[batch]``
    under exactly one criterion (see :func:`prune`). Changes nothing."""
    scores = _scores(scores, batch)
    if sum(x is not None for x in (keep, ratio, threshold)) != 1:
        raise ValueError("give exactly one of keep, ratio and threshold")
    min_keep = check_int("min_keep", min_keep, 0)
    if keep is not None:
        k = check_int("keep", keep, 1)
    elif ratio is not None:
        ratio = check_real("ratio", ratio, 0, 1, low_open=True)
        k = math.ceil(round(ratio * batch, 9))  # round: 0.1 * 30 is 3.0000000000000004
    else:
        threshold = check_real(
            "threshold", threshold, -math.inf, math.inf
        )  # infinities pass, NaN not
        k = int((scores >= threshold).sum())
    k = min(batch, max(k, min_keep))
    order = ranking(scores)
    return order[:k].sort().values, order[k:].sort().values


def prune(
    cache: PagedKVCache,
    scores: Scores,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    threshold: float | None = None,
    min_keep: int = 1,
) -> PruneResult:
    """Keep the best rows of ``cache`` by ``scores`` (tensor or list ``[batch]``, higher is better,
    any real dtype and device), free the others' blocks and compact the kept rows to 0..k-1 in
    their original order (metadata only: no KV is copied).

    Exactly one criterion: ``keep`` rows (all when keep > batch); ``ratio`` in (0, 1] keeps
    ceil(ratio * batch) rows; ``threshold`` keeps rows scoring at least it. At least ``min_keep``
    rows are kept (all when the batch is smaller), the best-ranked first. NaN ranks last; ties keep
    the lower row index. Every argument is checked before the cache changes.
    """
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    kept, dropped = select(
        scores, cache.batch_size, keep=keep, ratio=ratio, threshold=threshold, min_keep=min_keep
    )
    return PruneResult(kept, dropped, cache.free(dropped))
