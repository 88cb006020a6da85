"""Pure-torch oracles of stopkit's native ops (same signatures and semantics as stopkit.ops).

Used by tests and benchmarks, never on a hot path. They compute in the dtype of their inputs, so
passing float64 tensors gives the float64 reference of the flash-attention test rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
import torch.nn.functional as F

__all__ = [
    "gather_pages",
    "paged_attention",
    "paged_attention_sdpa",
    "write_kv",
    "copy_blocks",
    "stop_score",
]


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache ``[num_blocks, block_size, Hkv, D]``, block_table ``[B, M]`` -> ``[B, M*block_size, Hkv, D]``
    (entries past a row's length are garbage; out-of-range ids are clamped, callers mask them)."""
    num_blocks = cache.shape[0]
    idx = block_table.long().clamp(0, num_blocks - 1)
    return cache[idx].flatten(1, 2)


def _visible(
    seq_lens: torch.Tensor, total: int, S: int, has_suffix: bool, window: int | None
) -> torch.Tensor:
    """Boolean ``[B, S, total]``: which of the positions ``[0, total)`` query s of row b sees, where
    positions ``[0, M*bs)`` are cached and (with a suffix) ``M*bs + j`` is suffix position j."""
    B = seq_lens.shape[0]
    device = seq_lens.device
    L = seq_lens.long()[:, None, None]  # [B, 1, 1]
    s = torch.arange(S, device=device)[None, :, None]  # [1, S, 1]
    p = torch.arange(total, device=device)[None, None, :]  # [1, 1, total]
    cached_span = total - S if has_suffix else total
    is_cached = p < cached_span
    if has_suffix:
        j = p - cached_span
        visible = torch.where(is_cached, p < L, j <= s)
        abs_pos = torch.where(is_cached, p, L + j)
        q_pos = L + s
    else:
        visible = (p < L).expand(B, S, total)
        abs_pos = p
        q_pos = L - 1
    if window is not None:
        visible = visible & (abs_pos > q_pos - window)
    return visible.expand(B, S, total)


def _keys_values(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    suffix_k: torch.Tensor | None,
    suffix_v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's gathered pages, then its suffix: k, v ``[B, M*block_size (+ S), Hkv, D]``."""
    k, v = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    if suffix_k is not None:
        assert suffix_v is not None
        k, v = torch.cat([k, suffix_k], dim=1), torch.cat([v, suffix_v], dim=1)
    return k, v


@overload
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    suffix_k: torch.Tensor | None = ...,
    suffix_v: torch.Tensor | None = ...,
    scale: float | None = ...,
    sinks: torch.Tensor | None = ...,
    window: int | None = ...,
    return_lse: Literal[False] = ...,
    check_indices: bool = ...,
    max_seq_len: int | None = ...,
) -> torch.Tensor: ...
@overload
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    suffix_k: torch.Tensor | None = ...,
    suffix_v: torch.Tensor | None = ...,
    scale: float | None = ...,
    sinks: torch.Tensor | None = ...,
    window: int | None = ...,
    return_lse: Literal[True],
    check_indices: bool = ...,
    max_seq_len: int | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    return_lse: bool = False,
    check_indices: bool = True,
    max_seq_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`stopkit.ops.paged_attention` (explicit softmax in q's dtype)."""
    B, S, H, D = q.shape
    Hkv = k_cache.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _keys_values(k_cache, v_cache, block_table, suffix_k, suffix_v)
    has_suffix = suffix_k is not None
    total = k.shape[1]
    k = k.repeat_interleave(G, dim=2)  # [B, T, H, D]
    v = v.repeat_interleave(G, dim=2)
    logits = torch.einsum("bshd,bthd->bhst", q, k) * scale  # [B, H, S, T]
    visible = _visible(seq_lens, total, S, has_suffix, window)[:, None]  # [B, 1, S, T]
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(logits.dtype)[None, :, None, None].expand(B, H, S, 1)
        logits = torch.cat([logits, sink], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, S]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # rows with no key: all zero
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhst,bthd->bshd", probs, v).to(q.dtype)
    if return_lse:
        return out, lse.permute(0, 2, 1).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
    return out


def paged_attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The usual torch baseline: gather the pages, then ``F.scaled_dot_product_attention`` with
    ``enable_gqa`` and a boolean mask (no sinks, no LSE). Same semantics otherwise."""
    S = q.shape[1]
    k, v = _keys_values(k_cache, v_cache, block_table, suffix_k, suffix_v)
    visible = _visible(seq_lens, k.shape[1], S, suffix_k is not None, window)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).nan_to_num(0.0)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Oracle of :func:`stopkit.ops.write_kv`."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]


def copy_blocks(
    cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *, block_dim: int = -4
) -> None:
    """Oracle of :func:`stopkit.ops.copy_blocks`."""
    moved = cache.movedim(block_dim, 0)
    moved[dst] = moved[src]


_ACT: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "none": lambda x: x,
    None: lambda x: x,
}


def stop_score(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    hidden_weight: torch.Tensor | None = None,
    hidden_bias: torch.Tensor | None = None,
    activation: str | None = "gelu",
) -> torch.Tensor:
    """Oracle of :func:`stopkit.ops.stop_score`; computes in float32 (float64 if hidden is)."""
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(ct)
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(ct)
    if hidden_weight is not None:
        x = F.linear(x, hidden_weight.to(ct), None if hidden_bias is None else hidden_bias.to(ct))
        x = _ACT[activation](x)
    logits = F.linear(x, head_weight.to(ct), None if head_bias is None else head_bias.to(ct))
    return torch.softmax(logits, dim=-1)[:, 1]
