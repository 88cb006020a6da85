"""The native ops of stopkit: the only Python that calls compiled code.

Every function validates its tensors (device, dtype, shape, strides, index ranges) and raises
``ValueError`` / ``TypeError`` naming the argument before any native code runs, then dispatches to
``stopkit._C`` (CPU) or ``stopkit._C_cuda`` (CUDA: on the tensors' device and that device's current
stream, with scratch memory from torch's allocator). The pure-torch oracle of each op lives in
:mod:`stopkit.reference`. Layouts: docs/DESIGN.md section 3.

Each public function reaches its native call through a torch custom op,
``torch.ops.stopkit.{paged_attention, write_kv, copy_blocks, stop_score}`` (registered with
torch.library, with fake implementations and mutation annotations), so ``torch.compile``,
``torch.export`` and CUDA graphs see one opaque op per call. The checks of shapes, dtypes and
devices run here, before the op, and trace under torch.compile (they become guards); the checks
that read index tensors (``check_indices``; copy_blocks' src and dst) run inside the op on the real
data. The ops themselves trust the metadata they are given: call them through these functions.

``STOPKIT_CUDA_SMEM_LIMIT=<bytes>`` makes the CUDA kernels plan for at most that much shared memory
per block (e.g. 101376 runs a 99 KB part's plans on an A100 or H100; tests and benchmarks).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, overload

import torch

from stopkit import _C

__all__ = [
    "paged_attention",
    "write_kv",
    "copy_blocks",
    "stop_score",
    "cuda_available",
    "cuda_launch_plan",
    "check_block_table",
    "MAX_Q_LEN",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
]

# Kernel limits, read by every layer above (the engine checks a model against them).
MAX_Q_LEN = 16  # queries per row in one paged_attention call
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256  # head_dim: a multiple of 16 in this range
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256  # block_size: a power of two in this range
_DTYPE_CODES = {getattr(torch, name): code for name, code in _C.dtype_codes().items()}
_ACTIVATIONS = {None: _C.activation_codes()["none"], **_C.activation_codes()}

try:  # built only where nvcc was found
    from stopkit import _C_cuda
except ImportError:
    _C_cuda = None  # type: ignore[assignment]  # the module, or None where not built

# The current stream of a device as a cudaStream_t address, without building a torch Stream
# object per call (torch's inductor reads it the same way); the public route where absent.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


def _smem_limit_from_env() -> int:
    value = os.environ.get("STOPKIT_CUDA_SMEM_LIMIT", "0")
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"STOPKIT_CUDA_SMEM_LIMIT must be a byte count >= 0, got {value!r}")
    return limit


if _C_cuda is not None:
    _C_cuda.set_smem_limit(_smem_limit_from_env())

# The CPU kernels share torch's OpenMP runtime: reading torch's thread count sets the runtime to
# torch's default (the physical cores) for the kernels too; torch.set_num_threads sets both after.
_C.set_num_threads(max(1, torch.get_num_threads()))


def cuda_available() -> bool:
    """True when stopkit was built with its CUDA kernels and torch sees a GPU."""
    return _C_cuda is not None and torch.cuda.is_available()


def _backend(device: torch.device) -> tuple[ModuleType, dict]:
    """The native module for ``device`` and the keyword arguments that place a call: for CUDA the
    tensors' device index (torch's current device may be another) and that device's current stream."""
    if device.type == "cpu":
        return _C, {}
    if device.type == "cuda":
        if _C_cuda is None:
            raise RuntimeError(
                "stopkit was built without CUDA kernels (nvcc was not found at build "
                "time, or STOPKIT_CUDA=0); reinstall with STOPKIT_CUDA=1"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _C_cuda, {"stream": _raw_stream(index), "device": index}
    raise ValueError(f"stopkit ops run on cpu or cuda tensors, got device {device}")


def _workspace(nbytes: int, device: torch.device, extra: dict) -> torch.Tensor | None:
    """Scratch memory for a CUDA kernel from torch's caching allocator (stream-ordered, seen by
    torch.cuda.memory_* and captured into CUDA graphs' pools), added to the native call's keyword
    arguments. The caller holds the tensor until the launch is queued."""
    if nbytes == 0:
        return None
    ws = torch.empty((nbytes + 3) // 4, dtype=torch.float32, device=device)
    extra.update(workspace=ws.data_ptr(), workspace_bytes=ws.numel() * 4)
    return ws


def cuda_launch_plan(
    dtype: torch.dtype, head_dim: int, q_len: int, max_shared_memory: int, *, group_size: int = 1
) -> dict:
    """The CUDA paged-attention kernel's launch plan on a GPU whose opt-in shared memory per block
    is ``max_shared_memory`` bytes (101376 on sm_86/89/120 parts, 166912 on A100, 232448 on
    H100/H200); ``group_size`` query heads share a kv head. Needs no GPU: the CUDA module launches
    by the same function. Returns ``{"stages", "smem_bytes", "blocks_per_sm", "keys_per_stage",
    "query_rows", "head_dim_bucket", "threads"}``: pipeline depth, dynamic shared memory per block,
    resident blocks per multiprocessor, keys per pipeline stage, query rows per block, the
    compiled head_dim serving ``head_dim``, and threads per block."""
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    for name, value, lo, hi in (
        ("head_dim", head_dim, 32, 256),
        ("q_len", q_len, 1, MAX_Q_LEN),
        ("group_size", group_size, 1, 1 << 16),
        ("max_shared_memory", max_shared_memory, 1, 1 << 30),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    if head_dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16 in 32..256, got {head_dim}")
    plan = _C.cuda_launch_plan(
        elem_bytes=dtype.itemsize,
        head_dim=head_dim,
        rows=group_size * q_len,
        max_shared_memory=max_shared_memory,
    )
    if plan["blocks_per_sm"] == 0:
        raise ValueError(
            f"no launch plan of the CUDA paged-attention kernel fits {max_shared_memory} "
            f"bytes of shared memory per block ({dtype}, head_dim {head_dim})"
        )
    return plan


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _tensor(
    name: str, t: object, *, ndim: int | None = None, dtype: Any = None, device: Any = None
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a cpu or cuda device, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other tensors, got {t.device}")
    return t


def _shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A dense row-major, 16-byte-aligned tensor (the CUDA kernels' vector loads need it) with the
    same values; no copy when it already is one."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _dense_cache(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (a cache is written and read in place; "
            f"got strides {t.stride()})"
        )
    return t


def check_block_table(
    block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int
) -> None:
    """Raise ValueError unless every block a row uses (``ceil(seq_lens[b] / block_size)`` entries of
    ``block_table[b]``) lies in ``[0, num_blocks)``. One reduction; syncs once on CUDA."""
    max_blocks = block_table.shape[1]
    used = (seq_lens.to(torch.int64) + block_size - 1) // block_size  # [B]
    cols = torch.arange(max_blocks, device=block_table.device)
    in_use = cols[None, :] < used[:, None]
    bad = in_use & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {j}] = {int(block_table[b, j])} is in use by row {b} "
            f"(seq_lens[{b}] = {int(seq_lens[b])}) but must lie in [0, {num_blocks})"
        )


# ---- the custom ops: the native calls behind the public functions --------------------------------
# Library.define + impl rather than torch.library.custom_op: the same registration (schema, fake
# kernel, mutation annotations) with a fraction of custom_op's per-call Python dispatch overhead.
_LIB = torch.library.Library("stopkit", "DEF")


def _register(schema: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"stopkit::{name}", fake, lib=_LIB)


def _paged_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    suffix_k: torch.Tensor | None,
    suffix_v: torch.Tensor | None,
    sinks: torch.Tensor | None,
    scale: float,
    window: int,
    max_seq_len: int,
    return_lse: bool,
    check_indices: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = q.device
    B, S, H, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    longest = max_seq_len  # -1: the block table's capacity
    if B > 0 and check_indices:
        lo, hi = (int(x) for x in torch.aminmax(seq_lens))
        if lo < 0:
            raise ValueError(f"seq_lens must be >= 0, got a minimum of {lo}")
        if hi > max_blocks * block_size:
            raise ValueError(
                f"seq_lens must be <= max_blocks_per_row * block_size = "
                f"{max_blocks * block_size}, got {hi}"
            )
        if max_seq_len >= 0 and hi > max_seq_len:
            raise ValueError(
                f"max_seq_len must be >= every seq_lens entry, got {max_seq_len} below {hi}"
            )
        check_block_table(block_table, seq_lens, block_size, num_blocks)
        longest = hi
    q, block_table, seq_lens = _dense(q), _dense(block_table), _dense(seq_lens)
    if suffix_k is not None and suffix_v is not None:
        suffix_k, suffix_v = _dense(suffix_k), _dense(suffix_v)
    if sinks is not None:
        sinks = _dense(sinks)
    out = torch.empty_like(q)
    lse = torch.empty((B, S, H), dtype=torch.float32, device=device) if return_lse else None
    if B > 0:
        backend, extra = _backend(device)
        workspace = None
        if backend is _C_cuda:  # plans its context split from max_seq_len; the split's workspace
            extra["max_seq_len"] = longest
            workspace = _workspace(
                _C_cuda.paged_attention_workspace_bytes(
                    batch=B,
                    q_len=S,
                    num_heads=H,
                    num_kv_heads=Hkv,
                    head_dim=D,
                    block_size=block_size,
                    max_blocks_per_row=max_blocks,
                    window=window,
                    dtype=_DTYPE_CODES[q.dtype],
                    max_seq_len=longest,
                    device=extra["device"],
                ),
                device,
                extra,
            )
        backend.paged_attention(
            out=_addr(out),
            lse=_addr(lse),
            q=_addr(q),
            k_cache=_addr(k_cache),
            v_cache=_addr(v_cache),
            block_table=_addr(block_table),
            seq_lens=_addr(seq_lens),
            suffix_k=_addr(suffix_k),
            suffix_v=_addr(suffix_v),
            sinks=_addr(sinks),
            batch=B,
            q_len=S,
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=D,
            block_size=block_size,
            num_blocks=num_blocks,
            max_blocks_per_row=max_blocks,
            scale=scale,
            window=window,
            dtype=_DTYPE_CODES[q.dtype],
            **extra,
        )
        del workspace  # freed in stream order, after the launch that uses it
    return out, lse


def _paged_attention_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    suffix_k: torch.Tensor | None,
    suffix_v: torch.Tensor | None,
    sinks: torch.Tensor | None,
    scale: float,
    window: int,
    max_seq_len: int,
    return_lse: bool,
    check_indices: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    lse = q.new_empty(q.shape[:3], dtype=torch.float32) if return_lse else None
    return torch.empty_like(q), lse


_register(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
    "Tensor seq_lens, Tensor? suffix_k, Tensor? suffix_v, Tensor? sinks, float scale, "
    "int window, int max_seq_len, bool return_lse, bool check_indices) -> (Tensor, Tensor?)",
    _paged_attention_impl,
    _paged_attention_fake,
)


def _write_kv_impl(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_indices: bool,
) -> None:
    num_blocks, block_size, Hkv, D = k_cache.shape
    if k.shape[0] == 0:
        return
    if check_indices:
        _check_slots(slot_mapping, num_blocks * block_size)
    k, v, slot_mapping = _dense(k), _dense(v), _dense(slot_mapping)
    backend, extra = _backend(k_cache.device)
    backend.write_kv(
        k=_addr(k),
        v=_addr(v),
        k_cache=_addr(k_cache),
        v_cache=_addr(v_cache),
        slot_mapping=_addr(slot_mapping),
        num_tokens=k.shape[0],
        num_kv_heads=Hkv,
        head_dim=D,
        block_size=block_size,
        num_blocks=num_blocks,
        dtype=_DTYPE_CODES[k_cache.dtype],
        **extra,
    )


_register(
    "write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, bool check_indices) -> ()",
    _write_kv_impl,
    lambda k, v, k_cache, v_cache, slot_mapping, check_indices: None,
)


def _copy_blocks_impl(
    cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_dim: int
) -> None:
    num_blocks = cache.shape[block_dim]
    P = src.shape[0]
    if P == 0:
        return
    both = torch.cat([src, dst])
    lo, hi = (int(x) for x in torch.aminmax(both))
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"src and dst must lie in [0, {num_blocks}), got values in [{lo}, {hi}]")
    if torch.unique(dst).numel() != P or bool(torch.isin(dst, src).any()):
        raise ValueError(
            "dst entries must be distinct and disjoint from src "
            "(a block cannot be both read and written; a src may repeat)"
        )
    src, dst = _dense(src), _dense(dst)
    num_planes = math.prod(cache.shape[:block_dim])
    block_bytes = math.prod(cache.shape[block_dim + 1 :]) * cache.element_size()
    backend, extra = _backend(cache.device)
    backend.copy_blocks(
        cache=_addr(cache),
        src=_addr(src),
        dst=_addr(dst),
        num_pairs=P,
        num_planes=num_planes,
        num_blocks=num_blocks,
        block_bytes=block_bytes,
        **extra,
    )


_register(
    "copy_blocks(Tensor(a!) cache, Tensor src, Tensor dst, int block_dim) -> ()",
    _copy_blocks_impl,
    lambda cache, src, dst, block_dim: None,
)


def _stop_score_impl(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    hidden_weight: torch.Tensor | None,
    hidden_bias: torch.Tensor | None,
    eps: float,
    activation: int,
) -> torch.Tensor:
    device = hidden.device
    B, d = hidden.shape
    h = 0 if hidden_weight is None else hidden_weight.shape[0]
    hidden, head_weight = _dense(hidden), _dense(head_weight)
    head_bias, norm_weight, hidden_weight, hidden_bias = (
        None if t is None else _dense(t)
        for t in (head_bias, norm_weight, hidden_weight, hidden_bias)
    )
    out = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return out
    backend, extra = _backend(device)
    workspace = None
    if backend is _C_cuda:  # the hidden layer's per-tile shares of the logits
        workspace = _workspace(
            _C_cuda.stop_score_workspace_bytes(batch=B, hidden_dim=h), device, extra
        )
    backend.stop_score(
        out=_addr(out),
        hidden=_addr(hidden),
        norm_weight=_addr(norm_weight),
        hidden_weight=_addr(hidden_weight),
        hidden_bias=_addr(hidden_bias),
        head_weight=_addr(head_weight),
        head_bias=_addr(head_bias),
        batch=B,
        dim=d,
        hidden_dim=h,
        eps=eps,
        activation=activation,
        hidden_dtype=_DTYPE_CODES[hidden.dtype],
        weight_dtype=_DTYPE_CODES[head_weight.dtype],
        **extra,
    )
    del workspace  # freed in stream order, after the launch that uses it
    return out


_register(
    "stop_score(Tensor hidden, Tensor head_weight, Tensor? head_bias, Tensor? norm_weight, "
    "Tensor? hidden_weight, Tensor? hidden_bias, float eps, int activation) -> Tensor",
    _stop_score_impl,
    lambda hidden, *args: hidden.new_empty(hidden.shape[:1], dtype=torch.float32),
)


# ---- the public functions: checks, then the custom op ----------------------------------------------
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
    """Attention of a few queries per row against that row's paged KV cache (and a causal suffix).

    q ``[B, S, H, D]`` (S in 1..16); k_cache, v_cache ``[num_blocks, block_size, Hkv, D]``;
    block_table int32 ``[B, max_blocks]``; seq_lens int32 ``[B]``; suffix_k, suffix_v
    ``[B, S, Hkv, D]``. Query s of row b attends to cached positions ``[0, seq_lens[b])`` and, with
    a suffix, to suffix positions ``0..s``; without one every query sees all cached positions.
    sinks: float32 ``[H]`` extra softmax logit per head (gpt-oss); window: attend only to the last
    ``window`` positions (the query's own included). Returns out ``[B, S, H, D]`` (q's dtype) and,
    with return_lse, float32 ``[B, S, H]``: the natural log of the softmax normaliser (sink
    included); ``-inf`` for a query that sees no position and has no sink.
    ``check_indices=False`` skips the checks that read seq_lens and block_table (a device sync
    each; the caller made sure, e.g. once per decode step for every layer); the kernels still never
    read outside the cache (CPU: they raise; CUDA: a length is clamped, a bad page masked).
    max_seq_len: an upper bound of ``seq_lens`` that the caller knows without a device sync (the
    engine's longest row); it sizes the CUDA kernel's context split. None: the longest row where
    the checks read seq_lens anyway, else the block table's capacity. It never changes the result.
    """
    q = _tensor("q", q, ndim=4, dtype=tuple(_DTYPE_CODES))
    device, dtype = q.device, q.dtype
    B, S, H, D = q.shape
    k_cache = _tensor("k_cache", k_cache, ndim=4, dtype=dtype, device=device)
    v_cache = _tensor("v_cache", v_cache, ndim=4, dtype=dtype, device=device)
    _, block_size, Hkv, Dk = k_cache.shape
    _shape("v_cache", v_cache, tuple(k_cache.shape))
    if not 1 <= S <= MAX_Q_LEN:
        raise ValueError(f"q_len (q.shape[1]) must be in 1..{MAX_Q_LEN}, got {S}")
    if Dk != D:
        raise ValueError(f"k_cache head_dim (shape[3]) must equal q's head_dim {D}, got {Dk}")
    if D % 16 != 0 or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim must be a multiple of 16 in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {D}"
        )
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block_size (k_cache.shape[1]) must be a power of two in "
            f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}, got {block_size}"
        )
    if Hkv < 1 or H < 1 or H % Hkv != 0:
        raise ValueError(
            f"num_heads (q.shape[2] = {H}) must be a multiple of num_kv_heads "
            f"(k_cache.shape[2] = {Hkv})"
        )
    block_table = _tensor("block_table", block_table, ndim=2, dtype=torch.int32, device=device)
    seq_lens = _tensor("seq_lens", seq_lens, ndim=1, dtype=torch.int32, device=device)
    if block_table.shape[0] != B:
        raise ValueError(
            f"block_table must have one row per batch row ({B}), got {block_table.shape[0]}"
        )
    _shape("seq_lens", seq_lens, (B,))
    if (suffix_k is None) != (suffix_v is None):
        raise ValueError("suffix_k and suffix_v must be given together")
    if suffix_k is not None:
        suffix_k = _tensor("suffix_k", suffix_k, ndim=4, dtype=dtype, device=device)
        suffix_v = _tensor("suffix_v", suffix_v, ndim=4, dtype=dtype, device=device)
        _shape("suffix_k", suffix_k, (B, S, Hkv, D))
        _shape("suffix_v", suffix_v, (B, S, Hkv, D))
    if sinks is not None:
        sinks = _tensor("sinks", sinks, ndim=1, dtype=torch.float32, device=device)
        _shape("sinks", sinks, (H,))
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if max_seq_len is not None and (
        isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0
    ):
        raise ValueError(f"max_seq_len must be an int >= 0 or None, got {max_seq_len!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    k_cache = _dense_cache("k_cache", k_cache)
    v_cache = _dense_cache("v_cache", v_cache)
    out, lse = torch.ops.stopkit.paged_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        suffix_k,
        suffix_v,
        sinks,
        float(scale),
        window or 0,
        -1 if max_seq_len is None else max_seq_len,
        bool(return_lse),
        bool(check_indices),
    )
    return (out, lse) if return_lse else out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Write k, v ``[T, Hkv, D]`` into the caches ``[num_blocks, block_size, Hkv, D]`` in place.

    slot_mapping int64 ``[T]``: token t goes to slot ``slot_mapping[t]`` (block
    ``slot // block_size``, offset ``slot % block_size``); -1 skips the token. A slot other than -1
    appears at most once (two tokens for one slot are a ValueError).
    ``check_indices=False`` skips the checks of slot_mapping (one device sync; the caller made
    sure, e.g. once per step for every layer); the kernels still never write outside the cache
    (CPU: they raise; CUDA: an out-of-range slot is skipped), but a repeated slot is then the
    caller's bug: the CPU keeps the last token's values, CUDA may mix pieces of the tokens' rows.
    Under torch.compile, hand the compiled function the cache storage whole and cut the layers'
    views inside it: views of one tensor passed as separate inputs to a graph that writes them make
    AOTAutograd copy the whole tensor per call.
    """
    k_cache = _tensor("k_cache", k_cache, ndim=4, dtype=tuple(_DTYPE_CODES))
    device, dtype = k_cache.device, k_cache.dtype
    v_cache = _tensor("v_cache", v_cache, ndim=4, dtype=dtype, device=device)
    _shape("v_cache", v_cache, tuple(k_cache.shape))
    _, _, Hkv, D = k_cache.shape
    k = _tensor("k", k, ndim=3, dtype=dtype, device=device)
    T = k.shape[0]
    v = _tensor("v", v, ndim=3, dtype=dtype, device=device)
    _shape("k", k, (T, Hkv, D))
    _shape("v", v, (T, Hkv, D))
    slot_mapping = _tensor("slot_mapping", slot_mapping, ndim=1, dtype=torch.int64, device=device)
    _shape("slot_mapping", slot_mapping, (T,))
    k_cache, v_cache = _dense_cache("k_cache", k_cache), _dense_cache("v_cache", v_cache)
    torch.ops.stopkit.write_kv(k, v, k_cache, v_cache, slot_mapping, bool(check_indices))


def _check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every entry -1 or in [0, num_slots), none but -1 repeated; one device sync."""
    slots = torch.sort(slot_mapping).values
    repeated = (slots[1:] == slots[:-1]) & (slots[1:] >= 0)
    lo, hi, n_repeated = torch.stack([slots[0], slots[-1], repeated.sum()]).tolist()
    if lo < -1 or hi >= num_slots:
        raise ValueError(
            f"slot_mapping entries must be -1 or in [0, {num_slots}), got values in [{lo}, {hi}]"
        )
    if n_repeated:
        slot = int(slots[1:][repeated][0])
        raise ValueError(
            f"slot_mapping must not repeat a slot (only -1 may repeat): slot {slot} "
            f"appears more than once"
        )


def copy_blocks(
    cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *, block_dim: int = -4
) -> None:
    """Copy block ``src[i]`` to block ``dst[i]`` in place, in every plane of ``cache``.

    cache: ``[..., num_blocks, block_size, Hkv, D]`` (dense; e.g. PagedKVCache's
    ``[layers, 2, num_blocks, ...]`` storage, so one call copies a block in every layer, K and V);
    ``block_dim`` names the blocks dimension. src, dst: int64 ``[P]`` in ``[0, num_blocks)``; the
    dst entries must be distinct and none may also be a src (a src may repeat).
    """
    cache = _tensor("cache", cache)
    device = cache.device
    if cache.dim() < 2:
        raise ValueError(
            f"cache must have a blocks dimension and per-block data, got shape {tuple(cache.shape)}"
        )
    if not (isinstance(block_dim, int) and -cache.dim() <= block_dim < cache.dim()):
        raise ValueError(
            f"block_dim must be an int in [{-cache.dim()}, {cache.dim()}) for a cache of "
            f"shape {tuple(cache.shape)}, got {block_dim!r}"
        )
    block_dim = block_dim % cache.dim()
    src = _tensor("src", src, ndim=1, dtype=torch.int64, device=device)
    dst = _tensor("dst", dst, ndim=1, dtype=torch.int64, device=device)
    _shape("dst", dst, tuple(src.shape))
    cache = _dense_cache("cache", cache)
    torch.ops.stopkit.copy_blocks(cache, src, dst, block_dim)  # checks src and dst on the data


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
    """STOP score head in one native call: optional RMSNorm (``norm_weight`` ``[d]``) ->
    optional hidden layer (``hidden_weight`` ``[h, d]``, ``hidden_bias`` ``[h]``) + activation
    (gelu (erf), relu, silu, tanh) -> Linear (``head_weight`` ``[2, h or d]``, ``head_bias`` ``[2]``)
    -> softmax. hidden ``[B, d]``. Returns float32 ``[B]``: the probability of class 1.
    All weights share one dtype (float32, float16 or bfloat16); hidden may differ."""
    hidden = _tensor("hidden", hidden, ndim=2, dtype=tuple(_DTYPE_CODES))
    device = hidden.device
    d = hidden.shape[1]
    head_weight = _tensor(
        "head_weight", head_weight, ndim=2, dtype=tuple(_DTYPE_CODES), device=device
    )
    wdtype = head_weight.dtype
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of gelu, relu, silu, tanh, none; got {activation!r}"
        )
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if hidden_bias is not None and hidden_weight is None:
        raise ValueError("hidden_bias needs hidden_weight")
    if d < 1:
        raise ValueError(
            f"hidden must have at least one feature (shape[1] >= 1), got {tuple(hidden.shape)}"
        )
    h = 0
    if norm_weight is not None:
        norm_weight = _tensor("norm_weight", norm_weight, ndim=1, dtype=wdtype, device=device)
        _shape("norm_weight", norm_weight, (d,))
    if hidden_weight is not None:
        hidden_weight = _tensor("hidden_weight", hidden_weight, ndim=2, dtype=wdtype, device=device)
        h = hidden_weight.shape[0]
        if h < 1:
            raise ValueError("hidden_weight must have at least one output row")
        _shape("hidden_weight", hidden_weight, (h, d))
        if hidden_bias is not None:
            hidden_bias = _tensor("hidden_bias", hidden_bias, ndim=1, dtype=wdtype, device=device)
            _shape("hidden_bias", hidden_bias, (h,))
    _shape("head_weight", head_weight, (2, h or d))
    if head_bias is not None:
        head_bias = _tensor("head_bias", head_bias, ndim=1, dtype=wdtype, device=device)
        _shape("head_bias", head_bias, (2,))
    return torch.ops.stopkit.stop_score(
        hidden,
        head_weight,
        head_bias,
        norm_weight,
        hidden_weight,
        hidden_bias,
        float(eps),
        _ACTIVATIONS[activation],
    )


if os.environ.get("STOPKIT_CPU_ISA"):  # force an instruction-set build (benchmarks, tests)
    _C.set_isa(os.environ["STOPKIT_CPU_ISA"])
