"""Run a Hugging Face causal LM on stopkit's paged KV cache: prefill, batched decode, sampling,
per-token logprobs, row pruning and a read-only "suffix" forward against each row's cache.

How it plugs into transformers (no layer of the model is copied): an attention function is
registered under the name ``"stopkit_paged"`` in transformers' ``AttentionInterface``, and a
``transformers.Cache`` subclass whose ``update`` writes each layer's new keys/values into the pages
(``stopkit.ops.write_kv``) is passed as the model's cache. The attention function reads the pages
through ``stopkit.ops.paged_attention`` with the model's own scale (``module.scaling``, e.g.
Granite's attention multiplier), sliding window and attention sinks (gpt-oss). The engine switches
the model to this attention only for the duration of its own forward passes, so ``model.generate``
and plain calls keep working unchanged in between. With an unknown attention implementation name
transformers builds no dense mask, so decode never materialises one.

* Prefill: the prompts' tokens go through the model once (right-padded; pad tokens are never
  written and only later pad queries can see them). Attention runs in chunks of up to 16 queries,
  each reading the row's earlier tokens from the pages plus the chunk itself as a causal suffix, so
  windows and sinks behave exactly as in decode. Each prompt's row is then forked ``n`` times; the
  samples share the prompt's blocks.
* Decode: the whole live batch, one token per row per step (``q_len`` 1).
* Between steps the cache holds exactly each row's prompt and generated tokens; the engine keeps the
  next-token logits of every live row, so a row can be scored (:meth:`Session.forward_suffix`) and
  resumed as if it had never been scored.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, Cache, PretrainedConfig, PreTrainedModel

from stopkit import ops, reference
from stopkit._checks import check_int
from stopkit.cache import CacheFullError, PagedKVCache
from stopkit.pruning import PruneResult, prune
from stopkit.sampling import sample, sample_key, uniforms

__all__ = ["Engine", "Session", "Row", "SUPPORTED_MODEL_TYPES", "ATTENTION_NAME"]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "stopkit_paged"
# Families whose attention goes through AttentionInterface with RoPE, GQA and RMSNorm; each has a
# greedy-equality test against model.generate in tests/test_engine.py.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "granite",
                         "olmo2", "phi3", "gpt_oss")
PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward (bounds activation memory)


# ---- the transformers side ---------------------------------------------------------------------
@dataclass
class _Step:
    """What the cache and the attention function need to know about one forward pass.

    mode "prefill": rows hold ``seq_lens`` tokens before the pass and receive ``counts`` new ones
    (queries padded to the longest); "decode": one new token per row, already counted in
    ``seq_lens``; "suffix": the queries are a causal suffix after ``seq_lens`` cached tokens and
    nothing is written.
    """

    mode: str
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor | None = None          # int64 [B * q_len], -1 skips (pads)
    counts: torch.Tensor | None = None         # prefill: int32 [B] new tokens per row
    differentiable: bool = False               # suffix under autograd: torch attention


class _PagedCache(Cache):
    """A transformers Cache whose ``update`` writes the new keys/values into the pages of a
    PagedKVCache and hands them back unchanged (the attention function reads the pages)."""

    def __init__(self, step: _Step) -> None:
        super().__init__(layers=[])
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states ``[B, Hkv, q_len, D]``; returned as they are."""
        step = self.step
        if step.slots is not None:
            B, Hkv, S, D = key_states.shape
            ops.write_kv(key_states.transpose(1, 2).reshape(B * S, Hkv, D),
                         value_states.transpose(1, 2).reshape(B * S, Hkv, D),
                         step.k_caches[layer_idx], step.v_caches[layer_idx], step.slots,
                         check_indices=False)  # the cache handed out these slots
        return key_states, value_states


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, sliding_window: int | None = None,
               s_aux: torch.Tensor | None = None, stopkit_step: _Step | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function. query ``[B, H, S, D]``, key/value ``[B, Hkv, S, D]`` (this
    pass's tokens only) -> ``([B, S, H, D], None)``."""
    if stopkit_step is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside stopkit.Engine")
    step = stopkit_step
    layer = module.layer_idx
    kc, vc = step.k_caches[layer], step.v_caches[layer]
    q = query.transpose(1, 2)
    extra = {"scale": scaling, "window": sliding_window or None,
             "sinks": None if s_aux is None else s_aux.detach().float()}
    if step.mode == "decode":
        return ops.paged_attention(q, kc, vc, step.block_table, step.seq_lens, check_indices=False,
                                   **extra), None
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    if step.mode == "suffix":
        attend = reference.paged_attention if step.differentiable else ops.paged_attention
        return attend(q, kc, vc, step.block_table, step.seq_lens, suffix_k=k, suffix_v=v,
                      check_indices=False, **extra), None
    outs = []
    for start in range(0, q.shape[1], ops.MAX_Q_LEN):
        chunk = slice(start, start + ops.MAX_Q_LEN)
        # a row's tokens before this chunk; past its own count the queries are pads
        lens = step.seq_lens + step.counts.clamp(max=start)
        outs.append(ops.paged_attention(q[:, chunk], kc, vc, step.block_table, lens,
                                        suffix_k=k[:, chunk], suffix_v=v[:, chunk],
                                        check_indices=False, **extra))
    return torch.cat(outs, dim=1), None


AttentionInterface.register(ATTENTION_NAME, _attention)


# ---- validation helpers ------------------------------------------------------------------------
def _real(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    eos: tuple[int, ...]
    max_new_tokens: int | None
    record_logprobs: bool
    top_logprobs: int


# ---- rows and sessions -------------------------------------------------------------------------
@dataclass(eq=False)
class Row:
    """One sample (path) of a session.

    prompt_index, sample_index: which prompt and which of its ``n`` samples. tokens: the new tokens
    (up to and including EOS). logprobs / entropies (with ``record_logprobs``): per token, the log
    probability of the chosen token and the entropy (nats) of the MODEL's next-token distribution,
    i.e. ``log_softmax(logits)`` at temperature 1 before top-k/top-p/min-p; the sampler draws from
    the tempered, filtered distribution, these describe the model itself. finish_reason: None while
    the row is live, ``"eos"``, ``"length"`` (max_new_tokens reached) or ``"dropped"`` (pruned).
    """

    prompt_index: int
    sample_index: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    _top_values: list[torch.Tensor] = field(default_factory=list, repr=False, init=False)
    _top_ids: list[torch.Tensor] = field(default_factory=list, repr=False, init=False)

    @property
    def live(self) -> bool:
        """Still in the batch (decoding continues on :meth:`Session.step`)."""
        return self.finish_reason is None

    @property
    def finished(self) -> bool:
        """Ended by EOS or by max_new_tokens (not by pruning)."""
        return self.finish_reason in ("eos", "length")

    @property
    def top_logprobs(self) -> torch.Tensor:
        """float32 ``[T, k]``: the k largest log-probabilities of the model's distribution (as for
        :attr:`logprobs`) at each generated token, descending; ``[0, 0]`` when not recorded."""
        return torch.stack(self._top_values) if self._top_values else torch.zeros(0, 0)

    @property
    def top_ids(self) -> torch.Tensor:
        """int64 ``[T, k]``: the token ids of :attr:`top_logprobs`."""
        return (torch.stack(self._top_ids) if self._top_ids
                else torch.zeros(0, 0, dtype=torch.int64))


class Session:
    """Live decoding state of a batch of samples on an :class:`Engine` (from :meth:`Engine.start`).

    ``rows`` are the LIVE rows in cache order: row i of :meth:`forward_suffix`'s output, entry i of
    the scores given to :meth:`prune`. ``all_rows`` lists every row in launch order (prompt, then
    sample). A row that finishes (EOS or max_new_tokens) or is dropped leaves ``rows`` and the cache
    at once (its blocks are freed); its tokens stay readable in ``all_rows``. Finished rows can no
    longer be scored: they are excluded from :meth:`forward_suffix`. One session per engine at a
    time; :meth:`Engine.start` closes the previous one. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], n: int, sampling: _Sampling):
        self.engine = engine
        self.sampling = sampling
        self.all_rows = [Row(p, s, prompt) for p, prompt in enumerate(prompts) for s in range(n)]
        self.rows = list(self.all_rows)
        dev = engine.device
        self._keys = torch.tensor([sample_key(sampling.seed, r.prompt_index, r.sample_index)
                                   for r in self.rows], dtype=torch.int64, device=dev)
        self._counts = torch.zeros(len(self.rows), dtype=torch.int64, device=dev)
        self._eos = torch.tensor(sampling.eos, dtype=torch.int64, device=dev)
        self._logits: torch.Tensor | None = None  # float32 [B, V]: next-token logits of each row
        self.closed = False

    # ---- decoding ------------------------------------------------------------------------------
    def step(self, max_tokens: int = 1) -> int:
        """Decode up to ``max_tokens`` tokens for every live row (fewer for rows that finish).
        Returns the number of tokens generated. Raises CacheFullError when the cache cannot hold
        the next token; rows that finished in that step are recorded, the others are unchanged."""
        self._check_open()
        max_tokens = check_int("max_tokens", max_tokens, low=1)
        produced = 0
        for _ in range(max_tokens):
            if not self.rows:
                break
            produced += self._decode_one()
        return produced

    def _decode_one(self) -> int:
        sp, engine = self.sampling, self.engine
        logits = self._logits
        u = uniforms(self._keys, self._counts) if sp.temperature > 0 else None
        tokens = sample(logits, u, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                        min_p=sp.min_p)
        done = torch.isin(tokens, self._eos)
        if sp.max_new_tokens is not None:
            done |= self._counts + 1 >= sp.max_new_tokens
        host = [tokens.double(), done.double()]
        top = None
        if sp.record_logprobs or sp.top_logprobs:
            logp = torch.log_softmax(logits, dim=-1)
            if sp.record_logprobs:
                host += [logp.gather(1, tokens[:, None])[:, 0].double(),
                         torch.special.entr(logp.exp()).sum(-1).double()]
            if sp.top_logprobs:
                top = torch.topk(logp, sp.top_logprobs, dim=-1)
                top = (top.values.cpu().unbind(0), top.indices.cpu().unbind(0))
        host = torch.stack(host, dim=1).tolist()  # one device sync per step

        def record(i: int) -> None:
            row, h = self.rows[i], host[i]
            row.tokens.append(int(h[0]))
            if sp.record_logprobs:
                row.logprobs.append(h[2])
                row.entropies.append(h[3])
            if top is not None:
                row._top_values.append(top[0][i])
                row._top_ids.append(top[1][i])

        finished = [i for i, h in enumerate(host) if h[1]]
        if finished:
            for i in finished:
                record(i)
                self.rows[i].finish_reason = "eos" if int(host[i][0]) in sp.eos else "length"
            keep = torch.ones(len(self.rows), dtype=torch.bool)
            keep[finished] = False
            engine.cache.free(finished)
            self._compact(keep.nonzero()[:, 0].tolist())
            tokens = tokens[keep.to(tokens.device)]
            host = [h for h, k in zip(host, keep.tolist()) if k]
            if top is not None:
                top = tuple([t for t, k in zip(part, keep.tolist()) if k] for part in top)
            if not self.rows:
                return len(finished)
        slots = engine.cache.extend(1)  # raises CacheFullError with nothing changed
        for i in range(len(self.rows)):
            record(i)
        self._counts += 1
        self._logits = engine._decode(tokens, slots)
        return len(finished) + len(self.rows)

    def _compact(self, keep: list[int]) -> None:
        """Keep the session's per-row state of ``keep`` (current indices, ascending)."""
        idx = torch.tensor(keep, dtype=torch.int64, device=self.engine.device)
        self.rows = [self.rows[i] for i in keep]
        self._keys, self._counts = self._keys[idx], self._counts[idx]
        self._logits = self._logits[idx]

    # ---- pruning -------------------------------------------------------------------------------
    def prune(self, scores, *, keep: int | None = None, ratio: float | None = None,
              threshold: float | None = None, min_keep: int = 1) -> PruneResult:
        """Keep the best live rows by ``scores`` (``[len(rows)]``, higher is better) through
        :func:`stopkit.prune` (same criteria, NaN last, ties to the lower index); the others are
        dropped, their blocks freed. Returns the PruneResult (indices into the rows before)."""
        self._check_open()
        result = prune(self.engine.cache, scores, keep=keep, ratio=ratio, threshold=threshold,
                       min_keep=min_keep)
        for i in result.dropped.tolist():
            self.rows[i].finish_reason = "dropped"
        self._compact(result.kept.tolist())
        return result

    def drop(self, rows: Sequence[int] | torch.Tensor) -> int:
        """Drop the live rows at indices ``rows``; returns the number of blocks freed."""
        self._check_open()
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        rows = sorted({check_int("rows[i]", r, low=0) for r in rows})
        if rows and rows[-1] >= len(self.rows):
            raise ValueError(f"rows must lie in [0, {len(self.rows)}), got {rows[-1]}")
        freed = self.engine.cache.free(rows)
        for i in rows:
            self.rows[i].finish_reason = "dropped"
        dropped = set(rows)
        self._compact([i for i in range(len(self.rows)) if i not in dropped])
        return freed

    # ---- scoring -------------------------------------------------------------------------------
    def forward_suffix(self, inputs_embeds: torch.Tensor,
                       adapter: contextlib.AbstractContextManager | Callable | None = None, *,
                       final_norm: bool = False) -> torch.Tensor:
        """Run the model over K extra embeddings after each live row's cached tokens, without
        writing the cache.

        inputs_embeds ``[len(rows), K, hidden_size]`` (K in 1..16, the model's dtype and device):
        suffix token j of row b sits at position ``len(prompt) + len(tokens) + j``, attends to all
        of row b's cached tokens (through ``ops.paged_attention``; the suffix's own keys/values are
        the kernel's causal suffix) and to suffix tokens 0..j. adapter: a context manager (or a
        zero-argument callable returning one) entered around the pass, e.g. one that enables a
        LoRA adapter. Returns the last decoder layer's hidden states ``[B, K, hidden_size]`` BEFORE
        the model's final norm (after it with ``final_norm=True``). Rows that already finished are
        not in ``rows`` and are not scored. Under autograd (``torch.is_grad_enabled()``) attention
        runs through the differentiable torch oracle ``stopkit.reference.paged_attention``; wrap
        inference in ``torch.no_grad()`` to use the native kernel.
        """
        self._check_open()
        engine = self.engine
        B = len(self.rows)
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != B \
                or inputs_embeds.shape[2] != engine.hidden_size:
            raise ValueError(f"inputs_embeds must have shape [{B} live rows, K, "
                             f"{engine.hidden_size}], got {tuple(inputs_embeds.shape)}")
        K = inputs_embeds.shape[1]
        if not 1 <= K <= ops.MAX_Q_LEN:
            raise ValueError(f"inputs_embeds must hold 1..{ops.MAX_Q_LEN} suffix tokens per row, got {K}")
        if inputs_embeds.dtype != engine.dtype or inputs_embeds.device != engine.device:
            raise TypeError(f"inputs_embeds must be {engine.dtype} on {engine.device}, got "
                            f"{inputs_embeds.dtype} on {inputs_embeds.device}")
        if adapter is None:
            ctx = contextlib.nullcontext()
        elif hasattr(adapter, "__enter__") and hasattr(adapter, "__exit__"):
            ctx = adapter
        elif callable(adapter):
            ctx = adapter()
            if not (hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__")):
                raise TypeError("adapter must be a context manager or a callable returning one")
        else:
            raise TypeError(f"adapter must be a context manager or a callable returning one, got "
                            f"{type(adapter).__name__}")
        if B == 0:
            return inputs_embeds.new_empty(inputs_embeds.shape)
        step = engine._step("suffix", differentiable=torch.is_grad_enabled())
        positions = step.seq_lens.long()[:, None] + torch.arange(K, device=engine.device)
        captured: list[torch.Tensor] = []  # the final norm's input: the last layer's output
        hook = None if final_norm else engine._norm.register_forward_pre_hook(
            lambda mod, args: captured.append(args[0]))
        try:
            with ctx:
                out = engine._run(engine._backbone, step, inputs_embeds=inputs_embeds,
                                  position_ids=positions)
        finally:
            if hook is not None:
                hook.remove()
        return out.last_hidden_state if final_norm else captured[-1]

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Free every row still in the cache. Idempotent."""
        if self.closed:
            return
        cache = self.engine.cache
        if cache is not None and cache.batch_size:
            cache.free(list(range(cache.batch_size)))
        self.rows = []
        self._logits = None
        self.closed = True
        if self.engine._session is self:
            self.engine._session = None

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed (closed explicitly, or the engine started "
                               "another one)")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the engine --------------------------------------------------------------------------------
class Engine:
    """Runs a transformers causal LM (``model.config.model_type`` in SUPPORTED_MODEL_TYPES) on a
    PagedKVCache.

    block_size: tokens per cache block (a power of two in 8..256). num_blocks: cache capacity; None
    sizes the cache for each session (its prompts plus ``n * max_new_tokens`` per prompt), growing
    it when a session needs more. The model's weights are never changed; its attention
    implementation is switched to stopkit's only during the engine's own forward passes. A PEFT
    wrapper is unwrapped to its base model.
    """

    def __init__(self, model: PreTrainedModel, *, block_size: int = 16,
                 num_blocks: int | None = None) -> None:
        if hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):
            model = model.get_base_model()  # peft.PeftModel
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}: stopkit.Engine supports "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        self.block_size = check_int("block_size", block_size, low=1)
        if block_size < 8 or block_size > 256 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in 8..256, got {block_size}")
        if num_blocks is not None:
            num_blocks = check_int("num_blocks", num_blocks, low=1)
        self.model = model
        self._backbone = getattr(model, model.base_model_prefix)
        self._norm = self._backbone.norm
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim % 16 or not 32 <= head_dim <= 256:
            raise ValueError(f"head_dim must be a multiple of 16 in 32..256, got {head_dim}")
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.device, self.dtype = model.device, model.dtype
        # every config object an attention module may read its implementation from
        self._configs = list({id(m.config): m.config for m in model.modules()
                              if isinstance(getattr(m, "config", None), PretrainedConfig)}.values())
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache: PagedKVCache | None = None
        self._fixed_blocks = num_blocks
        if num_blocks is not None:
            self._make_cache(num_blocks)
        self._session: Session | None = None

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None
                 ) -> list[list[list[int]]]:
        """Sample ``n`` continuations of each prompt (token-id lists, or a 2-D tensor ``[P, L]``).
        Returns, per prompt and per sample, the new tokens up to and including EOS (at most
        max_new_tokens). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
        eos_token_id None takes the model's (generation_config, then config); an empty list
        disables EOS. With a fixed num_blocks the worst case must fit (CacheFullError before any
        work otherwise)."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        prompts, n, sampling = self._validate(prompts, n=n, max_new_tokens=max_new_tokens,
                                              temperature=temperature, top_p=top_p, top_k=top_k,
                                              min_p=min_p, seed=seed, eos_token_id=eos_token_id,
                                              record_logprobs=False, top_logprobs=0)
        if self._fixed_blocks is not None:
            need = self._blocks_needed(prompts, n, max_new_tokens)
            if need > self._fixed_blocks:
                raise CacheFullError(f"generating {n} x {max_new_tokens} tokens for these prompts "
                                     f"needs up to {need} blocks; the cache has {self._fixed_blocks}")
        with self._start(prompts, n, sampling) as session, \
                tqdm(total=max_new_tokens, desc="decode", unit="step", disable=None,
                     leave=False) as bar:
            while session.rows:
                session.step(1)
                bar.update(1)
            out = [[] for _ in prompts]
            for row in session.all_rows:
                out[row.prompt_index].append(row.tokens)
            return out

    def start(self, prompts: Sequence[Sequence[int]], *, n: int = 1,
              max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
              eos_token_id: int | Sequence[int] | None = None, record_logprobs: bool = False,
              top_logprobs: int = 0) -> Session:
        """Prefill ``prompts`` and return a :class:`Session` of ``n`` samples per prompt, ready to
        :meth:`Session.step` (no token sampled yet). Sampling arguments as in :meth:`generate`;
        sample s of prompt p draws its randomness from ``(seed, p, s)`` only (seed None: drawn from
        torch's global RNG). max_new_tokens None: rows end only at EOS (or when dropped).
        record_logprobs: keep each token's log-probability and entropy; top_logprobs: keep the k
        largest log-probabilities per token (see :class:`Row`). Closes the engine's previous
        session. Raises CacheFullError before any work when the prompts do not fit."""
        if max_new_tokens is not None:
            max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        prompts, n, sampling = self._validate(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, min_p=min_p, seed=seed, eos_token_id=eos_token_id,
            record_logprobs=record_logprobs, top_logprobs=top_logprobs)
        return self._start(prompts, n, sampling)

    @property
    def final_norm(self) -> torch.nn.Module:
        """The model's final norm (applied after :meth:`Session.forward_suffix`'s output)."""
        return self._norm

    def final_norm_params(self) -> tuple[torch.Tensor, float]:
        """(weight ``[hidden_size]``, eps) of the final RMSNorm, for ``ops.stop_score``."""
        eps = getattr(self._norm, "variance_epsilon", getattr(self._norm, "eps", None))
        return self._norm.weight, float(eps)

    # ---- internals -----------------------------------------------------------------------------
    def _validate(self, prompts, *, n, max_new_tokens, temperature, top_p, top_k, min_p, seed,
                  eos_token_id, record_logprobs, top_logprobs):
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = prompts.tolist()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        V = self.vocab_size
        clean = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist() if p.dim() == 1 else p
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
            p = [check_int(f"prompts[{i}][j]", t) for t in p]
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompts[{i}] token ids must lie in [0, {V}), got values in "
                                 f"[{min(p)}, {max(p)}]")
            clean.append(p)
        n = check_int("n", n, low=1)
        temperature = _real("temperature", temperature, 0.0, math.inf)
        top_p = _real("top_p", top_p, 0.0, 1.0, lo_open=True)
        top_k = check_int("top_k", top_k, low=0)
        min_p = _real("min_p", min_p, 0.0, 1.0)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seed = check_int("seed", seed)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id",
                                   None)
            if eos_token_id is None:
                eos_token_id = getattr(self.model.config, "eos_token_id", None)
        if eos_token_id is None:
            eos = ()
        elif isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool):
            eos = (int(eos_token_id),)
        else:
            eos = tuple(check_int("eos_token_id[i]", e) for e in eos_token_id)
        if any(not 0 <= e < V for e in eos):
            raise ValueError(f"eos_token_id must lie in [0, {V}), got {list(eos)}")
        if not isinstance(record_logprobs, bool):
            raise TypeError(f"record_logprobs must be a bool, got {type(record_logprobs).__name__}")
        top_logprobs = check_int("top_logprobs", top_logprobs, low=0)
        if top_logprobs > V:
            raise ValueError(f"top_logprobs must be <= vocab_size {V}, got {top_logprobs}")
        return clean, n, _Sampling(temperature, top_p, top_k, min_p, seed, eos, max_new_tokens,
                                   record_logprobs, top_logprobs)

    def _blocks_needed(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> int:
        """Most blocks a session can hold at once: each prompt's full blocks (shared) plus, per
        sample, the blocks from its first partial prompt block to its last token."""
        bs = self.block_size
        return sum(len(p) // bs + n * (_cdiv(len(p) + max_new_tokens, bs) - len(p) // bs)
                   for p in prompts)

    def _make_cache(self, num_blocks: int) -> None:
        self.cache = PagedKVCache.for_model(self.model.config, num_blocks=num_blocks,
                                            block_size=self.block_size, dtype=self.dtype,
                                            device=self.device)
        self._k = [self.cache.k_cache(i) for i in range(self.cache.num_layers)]
        self._v = [self.cache.v_cache(i) for i in range(self.cache.num_layers)]

    def _start(self, prompts: list[list[int]], n: int, sampling: _Sampling) -> Session:
        if self._session is not None:
            logger.debug("closing the previous session")
            self._session.close()
        bs = self.block_size
        prefill_blocks = sum(_cdiv(len(p), bs) for p in prompts)
        if self._fixed_blocks is None:
            need = max(prefill_blocks, self._blocks_needed(prompts, n, sampling.max_new_tokens or 0))
            if self.cache is None or self.cache.num_blocks < need:
                self.cache = None  # release the old storage before allocating the new one
                self._make_cache(need)
        if prefill_blocks > self.cache.num_free_blocks:
            raise CacheFullError(f"the prompts need {prefill_blocks} blocks of {bs} tokens; the "
                                 f"cache has {self.cache.num_free_blocks} free")
        session = Session(self, prompts, n, sampling)
        self._session = session
        try:
            logits = self._prefill(prompts)
            for p in range(len(prompts)):
                self.cache.fork(p, n)
            self.cache.free(list(range(len(prompts))))
        except BaseException:
            session.close()
            raise
        session._logits = logits.repeat_interleave(n, dim=0)
        return session

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Write the prompts' K/V into fresh rows 0..P-1; returns float32 ``[P, V]`` logits of
        each prompt's last token."""
        rows = self.cache.add(len(prompts))
        groups, cur, longest = [], [], 0
        for r, p in zip(rows, prompts):  # consecutive prompts, padded size <= PREFILL_TOKENS
            if cur and (len(cur) + 1) * max(longest, len(p)) > PREFILL_TOKENS:
                groups.append(cur)
                cur, longest = [], 0
            cur.append(r)
            longest = max(longest, len(p))
        groups.append(cur)
        logits = []
        for group in groups:
            lens = [len(prompts[r]) for r in group]
            L = max(lens)
            ids = torch.zeros(len(group), L, dtype=torch.int64)
            for i, r in enumerate(group):
                ids[i, :lens[i]] = torch.tensor(prompts[r])
            slots = self.cache.extend(lens, rows=group)
            rows_t = torch.tensor(group, device=self.device)
            counts = torch.tensor(lens, dtype=torch.int32, device=self.device)
            step = _Step("prefill", self._k, self._v, self.cache.block_table[rows_t],
                         self.cache.seq_lens[rows_t] - counts, slots=slots.reshape(-1),
                         counts=counts)
            positions = (step.seq_lens[:, None].long()
                         + torch.arange(L, device=self.device)[None, :])
            with torch.no_grad():
                out = self._run(self.model, step, input_ids=ids.to(self.device),
                                position_ids=positions,
                                logits_to_keep=(counts.long() - 1)[:, None])
            logits.append(out.logits[:, -1].float())
        return torch.cat(logits)

    def _step(self, mode: str, **kw) -> _Step:
        cache = self.cache
        # the cache checks its block table whenever it changes, so the kernels skip that check
        return _Step(mode, self._k, self._v, cache.block_table, cache.seq_lens, **kw)

    def _decode(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (int64 ``[B]``, slots int64 ``[B, 1]`` already reserved) ->
        float32 ``[B, V]`` next-token logits."""
        step = self._step("decode", slots=slots.reshape(-1))
        positions = step.seq_lens.long()[:, None] - 1
        with torch.no_grad():
            out = self._run(self.model, step, input_ids=tokens[:, None], position_ids=positions)
        return out.logits[:, -1].float()

    def _run(self, module: torch.nn.Module, step: _Step, **inputs):
        """One forward of ``module`` (the LM or its backbone) with stopkit's attention and cache."""
        saved = [c._attn_implementation for c in self._configs]
        for c in self._configs:
            c._attn_implementation_internal = ATTENTION_NAME
        try:
            return module(**inputs, **{self._cache_arg: _PagedCache(step)}, use_cache=True,
                          stopkit_step=step)
        finally:
            for c, impl in zip(self._configs, saved):
                c._attn_implementation_internal = impl
