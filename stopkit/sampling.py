"""Token sampling for the engine: temperature, top-k, top-p, min-p and greedy, with a random stream
per sample that no other row can disturb.

Randomness is counter-based: the uniform number that picks token t of a sample is a hash of the
sample's key (derived from ``(seed, prompt index, sample index)``) and t. A sample's tokens are
therefore a function of its own logits and key only, whichever other rows share the batch, however
the decode is split into steps, and on any device (the hash is exact integer arithmetic). The token
is then drawn by inverse-CDF over the filtered distribution, which is the same distribution
``torch.multinomial`` would sample from.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["sample_key", "uniforms", "sample", "filter_logits"]

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_key(seed: int, prompt_index: int, sample_index: int) -> tuple[int, int]:
    """The 64-bit key of one sample as two 32-bit halves ``(lo, hi)``."""
    x = _splitmix64(seed & _M64)
    x = _splitmix64(x ^ (prompt_index & _M64))
    x = _splitmix64(x ^ ((sample_index * 0xD1B54A32D192ED03) & _M64))
    return x & _M32, x >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 x in [0, 2**32) without int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """:func:`_mix32` on uint32 arrays, whose multiplication wraps modulo 2**32 by itself."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """keys int64 ``[B, 2]`` (from :func:`sample_key`), counters int64 ``[B]`` (token index within
    the sample) -> float64 ``[B]`` uniform in (0, 1), one independent number per (key, counter)."""
    if keys.device.type == "cpu":  # the same hash in a few numpy calls instead of ~50 torch ops
        k, c = keys.numpy().astype(np.uint32), counters.numpy()
        x = _mix32_numpy(c.astype(np.uint32) ^ k[:, 0])
        x = _mix32_numpy(x ^ k[:, 1])
        x = _mix32_numpy(x ^ (c >> 32).astype(np.uint32))
        return (torch.from_numpy(x).double() + 0.5) * (1.0 / 4294967296.0)
    return _uniforms_torch(keys, counters)


def _uniforms_torch(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    x = _mix32((counters & _M32) ^ keys[:, 0])
    x = _mix32(x ^ keys[:, 1])
    x = _mix32(x ^ (counters >> 32))
    return (x.double() + 0.5) * (1.0 / 4294967296.0)


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """float32 ``[B, V]`` logits -> the sampling distribution's logits, in the order of transformers'
    warpers: divide by temperature (> 0), keep the top_k largest (0: all; ties at the k-th value
    kept), keep the smallest set of tokens whose probability sums to at least top_p, drop tokens
    below ``min_p * max probability``. Removed tokens get -inf; at least one token always stays."""
    x = logits if temperature == 1.0 else logits / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1)  # ascending
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def sample(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Draw one token per row. logits float32 ``[B, V]``; u float64 ``[B]`` in (0, 1) (ignored when
    greedy). temperature 0 is greedy (argmax, the lowest id on ties). Returns int64 ``[B]``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if u is None:
        raise ValueError("u (one uniform per row) is needed when temperature > 0")
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return _inverse_cdf(torch.softmax(x, dim=-1), u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The first token whose cumulative probability reaches ``u * total``, found in two levels (a
    cumulative sum over blocks of ``block`` tokens, then within the chosen block) so that no
    ``[B, V]`` float64 cumsum is needed. The target is > 0, so zero-probability (filtered) tokens
    are never chosen."""
    B, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = torch.nn.functional.pad(probs, (0, nb * block - V))
    blocks = probs.view(B, nb, block)
    csum = blocks.sum(-1).double().cumsum_(-1)  # [B, nb]
    target = (u * csum[:, -1]).unsqueeze(1)
    j = torch.searchsorted(csum, target).clamp_(max=nb - 1)  # [B, 1]
    before = torch.where(j > 0, csum.gather(1, (j - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, j[:, :, None].expand(B, 1, block))[:, 0].cumsum(
        -1, dtype=torch.float64
    )
    # rounding may put the rest just past this block's own sum: take its last non-zero token then
    rest = torch.minimum(target - before, inner[:, -1:])
    i = torch.searchsorted(inner, rest).clamp_(max=block - 1)
    return (j * block + i)[:, 0]
