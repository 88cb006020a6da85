"""The sampling step: one token per decoding row from its pending logits, drawn from the row's own
random stream (:mod:`stopkit.sampling`), with what the row records (logprobs, entropies, top
logprobs). Rows of different requests may sample with different parameters."""

from __future__ import annotations

from collections import defaultdict

import torch

from stopkit.engine.sequence import Row
from stopkit.sampling import sample, uniforms

__all__ = ["sample_rows"]


def sample_rows(rows: list[Row], logits: torch.Tensor) -> list[int]:
    """Sample the next token of each row (``logits`` float32 ``[len(rows), V]``, the rows'
    pending logits), append it to the row with what the row records, and return the tokens. One
    device sync."""
    device = logits.device
    tokens = torch.empty(len(rows), dtype=torch.int64, device=device)
    by_params: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        sp = r.group.sampling
        by_params[(sp.temperature, sp.top_k, sp.top_p, sp.min_p)].append(i)
    for (temperature, top_k, top_p, min_p), idx in by_params.items():
        sel = None if len(idx) == len(rows) else torch.tensor(idx, device=device)
        part = logits if sel is None else logits[sel]
        u = None
        if temperature > 0:
            keys = torch.tensor([rows[i].stream for i in idx], dtype=torch.int64)
            counters = torch.tensor([len(rows[i].tokens) for i in idx], dtype=torch.int64)
            u = uniforms(keys.to(device), counters.to(device))
        drawn = sample(part, u, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        if sel is None:
            tokens = drawn
        else:
            tokens[sel] = drawn
    host = [tokens.double()]
    lp_rows = [i for i, r in enumerate(rows) if r.group.sampling.record_logprobs]
    top_k = max((r.group.sampling.top_logprobs for r in rows), default=0)
    if lp_rows or top_k:
        logp = torch.log_softmax(logits, dim=-1)
    if lp_rows:
        host += [
            logp.gather(1, tokens[:, None])[:, 0].double(),
            torch.special.entr(logp.exp()).sum(-1).double(),
        ]
    top: tuple[torch.Tensor, torch.Tensor] | None = None
    if top_k:
        t = torch.topk(logp, top_k, dim=-1)
        top = (t.values.cpu(), t.indices.cpu())
    values = torch.stack(host, dim=1).tolist()  # the one sync
    out = []
    for i, r in enumerate(rows):
        sp = r.group.sampling
        token = int(values[i][0])
        row_top = None
        if sp.top_logprobs:
            assert top is not None  # top_k >= sp.top_logprobs
            row_top = (top[0][i, : sp.top_logprobs].clone(), top[1][i, : sp.top_logprobs].clone())
        if sp.record_logprobs:
            r.record(token, values[i][1], values[i][2], row_top)
        else:
            r.record(token, None, None, row_top)
        out.append(token)
    return out
