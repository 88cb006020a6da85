"""Runs a Hugging Face causal LM on stopkit's paged KV cache (the transformers glue).

No layer of the model is copied: an attention function is registered under the name
``"stopkit_paged"`` in transformers' ``AttentionInterface``, and a ``transformers.Cache`` subclass
whose ``update`` writes each layer's new keys/values into the pages (``stopkit.ops.write_kv``) is
passed as the model's cache. The attention function reads the pages through
``stopkit.ops.paged_attention`` with the model's own scale (``module.scaling``, e.g. Granite's
attention multiplier), sliding window and attention sinks (gpt-oss). The model is switched to this
attention only for the duration of the runner's own forward passes, so ``model.generate`` and
plain calls keep working in between; with an unknown attention name transformers builds no mask.

Every forward is PACKED: the scheduled tokens of all rows sit in one ``[1, T]`` sequence with
their own position ids (vLLM's layout), so prefill chunks and decode tokens share a step without
padding the batch. In each layer the attention function regroups the queries: a row feeding one
token (decode) reads its pages, its own key/value already written; a row feeding several (a
prefill chunk, or the read-only [STOP] suffix) is cut into pieces of up to ``ops.MAX_Q_LEN``
queries, each attending to the row's earlier tokens in the pages plus the piece itself as a causal
suffix, so windows and sinks behave exactly as in decode.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from transformers import AttentionInterface, Cache, PretrainedConfig, PreTrainedModel

from stopkit import ops, reference
from stopkit.cache import PagedKVCache

if TYPE_CHECKING:
    from stopkit.engine.compiled import CompiledDecode

__all__ = [
    "ModelRunner",
    "ForwardBatch",
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "model_head_dim",
]

ATTENTION_NAME = "stopkit_paged"
# Families whose attention goes through AttentionInterface with RoPE, GQA and RMSNorm; each has a
# greedy-equality test against model.generate in tests/test_engine.py.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "granite",
    "olmo2",
    "phi3",
    "gpt_oss",
)


@dataclass
class ForwardBatch:
    """How the queries of one packed forward attend (built by :meth:`ModelRunner.batch`).

    single_*: queries that are a row's only new token, written before attention (decode):
    positions in the packed axis (None: every query is one, in order), their rows' block tables
    and lengths (the token included). piece_*: pieces of up to MAX_Q_LEN queries attending to
    ``piece_lens`` cached tokens and causally to themselves: packed positions ``[P, Q]`` (T marks
    padding; None when the pieces tile the packed axis in order), block tables, lengths.
    """

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    slots: torch.Tensor | None  # int64 [T]; None: read-only (nothing is written)
    max_seq_len: int  # every row's tokens after the pass, at most (CUDA's
    # split plan, without a device sync)
    single_index: torch.Tensor | None = None
    single_table: torch.Tensor | None = None
    single_lens: torch.Tensor | None = None
    single_all: bool = False
    piece_index: torch.Tensor | None = None
    piece_table: torch.Tensor | None = None
    piece_lens: torch.Tensor | None = None
    differentiable: bool = False  # under autograd: the torch oracle, not the kernel


class _PagedCache(Cache):
    """A transformers Cache whose ``update`` writes the new keys/values into the pages and hands
    them back unchanged (the attention function reads the pages)."""

    def __init__(self, batch: ForwardBatch) -> None:
        super().__init__(layers=[])
        self.batch = batch

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states ``[1, Hkv, T, D]`` (packed) or ``[T, Hkv, 1, D]`` (a decode
        step); returned as they are."""
        b = self.batch
        if b.slots is not None:
            Hkv, D = key_states.shape[1], key_states.shape[3]
            ops.write_kv(
                key_states.transpose(1, 2).reshape(-1, Hkv, D),
                value_states.transpose(1, 2).reshape(-1, Hkv, D),
                b.k_caches[layer_idx],
                b.v_caches[layer_idx],
                b.slots,
                check_indices=False,
            )  # the cache handed out these slots
        return key_states, value_states


def _pad_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` where index may hold ``len(x)`` (padding: a row of zeros)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    stopkit_batch: ForwardBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function. query ``[1, H, T, D]``, key/value ``[1, Hkv, T, D]`` (this
    pass's tokens, packed) -> ``([1, T, H, D], None)``; in a decode step (``single_all``) the
    tokens are a batch instead: ``[T, H, 1, D]`` -> ``[T, 1, H, D]``."""
    if stopkit_batch is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside stopkit.Engine")
    b = stopkit_batch
    layer = cast(int, module.layer_idx)
    kc, vc = b.k_caches[layer], b.v_caches[layer]
    extra: dict[str, Any] = {
        "scale": scaling,
        "window": sliding_window or None,
        "sinks": None if s_aux is None else s_aux.detach().float(),
        "check_indices": False,
        "max_seq_len": b.max_seq_len,
    }
    if b.single_all:
        assert b.single_table is not None and b.single_lens is not None
        return ops.paged_attention(
            query.transpose(1, 2), kc, vc, b.single_table, b.single_lens, **extra
        ), None
    q = query[0].transpose(0, 1)  # [T, H, D]
    out = torch.zeros_like(q) if b.differentiable else torch.empty_like(q)
    if b.single_index is not None:
        assert b.single_table is not None and b.single_lens is not None
        out[b.single_index] = ops.paged_attention(
            q[b.single_index][:, None], kc, vc, b.single_table, b.single_lens, **extra
        )[:, 0]
    if b.piece_lens is not None:
        assert b.piece_table is not None
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        attend = reference.paged_attention if b.differentiable else ops.paged_attention
        if b.piece_index is None:  # the pieces tile the packed axis: a plain reshape
            P = b.piece_lens.shape[0]
            shape = (P, q.shape[0] // P)
            res = attend(
                q.reshape(*shape, *q.shape[1:]),
                kc,
                vc,
                b.piece_table,
                b.piece_lens,
                suffix_k=k.reshape(*shape, *k.shape[1:]),
                suffix_v=v.reshape(*shape, *v.shape[1:]),
                **extra,
            )
            return res.reshape(1, *q.shape), None
        res = attend(
            _pad_gather(q, b.piece_index),
            kc,
            vc,
            b.piece_table,
            b.piece_lens,
            suffix_k=_pad_gather(k, b.piece_index),
            suffix_v=_pad_gather(v, b.piece_index),
            **extra,
        )
        valid = b.piece_index < q.shape[0]
        out = out.index_put((b.piece_index[valid],), res[valid])
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, _attention)


def model_head_dim(config: PretrainedConfig) -> int:
    heads = config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // heads


class ModelRunner:
    """Forward passes of ``model`` (a transformers causal LM whose ``config.model_type`` is in
    SUPPORTED_MODEL_TYPES) over a PagedKVCache. A PEFT wrapper is unwrapped to its base model."""

    def __init__(self, model: PreTrainedModel) -> None:
        if hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):
            model = model.get_base_model()  # peft.PeftModel
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
            )
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: stopkit.Engine supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        head_dim = model_head_dim(config)
        if head_dim % 16 or not ops.MIN_HEAD_DIM <= head_dim <= ops.MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim must be a multiple of 16 in {ops.MIN_HEAD_DIM}.."
                f"{ops.MAX_HEAD_DIM}, got {head_dim}"
            )
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.norm = self.backbone.norm
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.device, self.dtype = model.device, model.dtype
        # every config object an attention module may read its implementation from
        self._configs = list(
            {
                id(c): c
                for m in model.modules()
                if isinstance(c := getattr(m, "config", None), PretrainedConfig)
            }.values()
        )
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        # set by Engine(compile=True): runs the decode steps it accepts (stopkit.engine.compiled)
        self.compiled_decode: CompiledDecode | None = None

    def bind(self, cache: PagedKVCache) -> None:
        """Run on ``cache`` from now on."""
        self._k = [cache.k_cache(i) for i in range(cache.num_layers)]
        self._v = [cache.v_cache(i) for i in range(cache.num_layers)]

    def final_norm_params(self) -> tuple[torch.Tensor, float]:
        """(weight ``[hidden_size]``, eps) of the final RMSNorm, for ``ops.stop_score``."""
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", None))
        if eps is None:
            raise TypeError(f"the final norm {type(self.norm).__name__} has no eps")
        return self.norm.weight, float(eps)

    # ---- batches -----------------------------------------------------------------------------
    def batch(
        self,
        block_table: torch.Tensor,
        starts: Sequence[int] | np.ndarray,
        counts: Sequence[int] | np.ndarray,
        *,
        slots: torch.Tensor | None,
        differentiable: bool = False,
    ) -> ForwardBatch:
        """The ForwardBatch of rows feeding ``counts[i]`` tokens after ``starts[i]`` cached ones.

        block_table int32 ``[R, M]``: the rows' block tables (rows in packed order). slots int64
        ``[T]`` (T = sum of counts) where the tokens are written, None for a read-only pass."""
        dev = self.device
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        max_len = int((starts + counts).max()) if counts.size else 0
        b = ForwardBatch(self._k, self._v, slots, max_len, differentiable=differentiable)
        single = (counts == 1) if slots is not None else np.zeros(counts.size, dtype=np.bool_)
        offsets = np.cumsum(counts) - counts
        if single.all():
            b.single_all = True
            b.single_table = block_table
            b.single_lens = torch.from_numpy((starts + 1).astype(np.int32)).to(dev)
            return b
        if single.any():
            idx = np.flatnonzero(single)
            b.single_index = torch.from_numpy(offsets[idx]).to(dev)
            b.single_table = block_table[torch.from_numpy(idx).to(dev)]
            b.single_lens = torch.from_numpy((starts[idx] + 1).astype(np.int32)).to(dev)
        multi = np.flatnonzero(~single)
        Q = min(ops.MAX_Q_LEN, int(counts[multi].max()))
        npieces = -(-counts[multi] // Q)
        rows = np.repeat(multi, npieces)
        first = np.arange(rows.size) - np.repeat(np.cumsum(npieces) - npieces, npieces)  # piece no.
        lo = first * Q  # offset within the row
        n = np.minimum(counts[rows] - lo, Q)
        tiled = not single.any() and bool((n == Q).all())
        if not tiled:
            pos = offsets[rows, None] + lo[:, None] + np.arange(Q)
            pos[np.arange(Q) >= n[:, None]] = int(counts.sum())
            b.piece_index = torch.from_numpy(pos).to(dev)
        b.piece_table = block_table[torch.from_numpy(rows).to(dev)]
        b.piece_lens = torch.from_numpy((starts[rows] + lo).astype(np.int32)).to(dev)
        return b

    # ---- forwards ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        batch: ForwardBatch,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        logits_at: torch.Tensor,
    ) -> torch.Tensor:
        """One forward writing the cache. token_ids, positions int64 ``[T]``; logits_at int64
        ``[R]``: packed positions whose next-token logits are returned, float32 ``[R, V]``. A
        decode step (one token per row) runs as a batch of T rows, which spares the copies that
        turn a packed row into per-token keys and values; compiled (:attr:`compiled_decode`)
        where one is set and takes the step."""
        if batch.single_all:
            if self.compiled_decode is not None and self.compiled_decode.accepts(batch):
                return self.compiled_decode(batch, token_ids, positions)[logits_at]
            out = self.run(
                self.model, batch, input_ids=token_ids[:, None], position_ids=positions[:, None]
            )
            return out.logits[logits_at, -1].float()
        out = self.run(
            self.model,
            batch,
            input_ids=token_ids[None],
            position_ids=positions[None],
            logits_to_keep=logits_at,
        )
        return out.logits[0].float()

    def forward_suffix(
        self,
        batch: ForwardBatch,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        adapter: contextlib.AbstractContextManager | None = None,
        *,
        final_norm: bool = False,
    ) -> torch.Tensor:
        """A read-only pass of ``inputs_embeds`` ``[B, K, hidden]`` (K tokens after each row's
        cached ones, positions int64 ``[B, K]``) inside ``adapter``; returns the last decoder
        layer's hidden states ``[B, K, hidden]`` before the final norm (after it with
        ``final_norm``)."""
        B, K, d = inputs_embeds.shape
        captured: list[torch.Tensor] = []  # the final norm's input: the last layer's output
        hook = (
            None
            if final_norm
            else self.norm.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        )
        try:
            with adapter if adapter is not None else contextlib.nullcontext():
                out = self.run(
                    self.backbone,
                    batch,
                    inputs_embeds=inputs_embeds.reshape(1, B * K, d),
                    position_ids=positions.reshape(1, B * K),
                )
        finally:
            if hook is not None:
                hook.remove()
        hidden = out.last_hidden_state if final_norm else captured[-1]
        return hidden.reshape(B, K, d)

    def run(self, module: torch.nn.Module, batch: ForwardBatch, **inputs: Any) -> Any:
        """One forward of ``module`` (the LM or its backbone) with stopkit's attention and cache."""
        with self.paged_attention():
            return self.call(module, batch, **inputs)

    def call(self, module: torch.nn.Module, batch: ForwardBatch, **inputs: Any) -> Any:
        """``module``'s forward on stopkit's cache, inside :meth:`paged_attention` (traced by
        torch.compile in a compiled decode step)."""
        return module(
            **inputs, **{self._cache_arg: _PagedCache(batch)}, use_cache=True, stopkit_batch=batch
        )

    @contextlib.contextmanager
    def paged_attention(self) -> Iterator[None]:
        """The model's attention switched to stopkit's for the duration."""
        saved = [c._attn_implementation for c in self._configs]
        for c in self._configs:
            c._attn_implementation_internal = ATTENTION_NAME
        try:
            yield
        finally:
            for c, impl in zip(self._configs, saved, strict=True):
                c._attn_implementation_internal = impl


def enter(
    adapter: contextlib.AbstractContextManager | Callable | None,
) -> contextlib.AbstractContextManager | None:
    """A context manager from ``adapter``: one, a zero-argument callable returning one, or None."""
    if adapter is None or (hasattr(adapter, "__enter__") and hasattr(adapter, "__exit__")):
        return adapter
    if callable(adapter):
        ctx = adapter()
        if hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__"):
            return ctx
    raise TypeError(
        f"adapter must be a context manager or a callable returning one, got "
        f"{type(adapter).__name__}"
    )
