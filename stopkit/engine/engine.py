"""The public engine: a KV budget, a scheduler and a model runner (nano-vllm's LLMEngine).

Each :meth:`Engine.step` is sample -> schedule -> run -> postprocess: rows with pending logits
sample a token (ending at EOS or max_new_tokens), the scheduler picks what every running row
feeds and reserves its blocks (admitting waiting work, preempting when the blocks run out), the
model runs one packed forward, and the fed tokens are counted. A step reports the requests that
ended and those whose rows all reached a check (they wait until :meth:`Engine.resume`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from stopkit import ops
from stopkit._checks import check_bool, check_int, check_real, check_token_ids
from stopkit.cache import CacheFullError, PagedKVCache
from stopkit.engine.compiled import CompiledDecode
from stopkit.engine.model_runner import ModelRunner, enter, model_head_dim
from stopkit.engine.sampler import sample_rows
from stopkit.engine.scheduler import ScheduledBatch, Scheduler, SchedulerStats
from stopkit.engine.sequence import (
    FINISH_REASONS,
    Group,
    Row,
    RowStatus,
    SamplingParams,
    request_key,
)

if TYPE_CHECKING:
    from stopkit.engine.session import Session

__all__ = ["Engine", "StepOutput", "CPU_MEMORY_SHARE", "GPU_MEMORY_UTILIZATION"]

log = logging.getLogger(__name__)

GPU_MEMORY_UTILIZATION = 0.9  # default share of a GPU's memory the model, steps and KV may use
CPU_MEMORY_SHARE = 0.25  # default share of the available RAM the KV cache takes on a CPU


@dataclass
class StepOutput:
    """What one step did: ``sampled`` rows drew a token (``ended`` of them finished: EOS or
    max_new_tokens), ``fed`` tokens went through the model; ``checks``: requests whose live rows
    all wait at a check; ``finished``: requests whose rows all ended (removed from the engine)."""

    sampled: list[Row] = field(default_factory=list)
    ended: list[Row] = field(default_factory=list)
    fed: int = 0
    checks: list[Group] = field(default_factory=list)
    finished: list[Group] = field(default_factory=list)


def _available_ram() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Engine:
    """Runs a transformers causal LM (``model.config.model_type`` in SUPPORTED_MODEL_TYPES) on a
    PagedKVCache under a fixed KV budget, with continuous batching.

    block_size: tokens per cache block (a power of two in 8..256). num_blocks: the KV budget in
    blocks; None sizes it from ``kv_cache_memory``: bytes (an int), or a share (a float in (0, 1])
    of the GPU's memory (used by the model, steps and KV together, as vLLM's
    ``gpu_memory_utilization``; default 0.9) or, on a CPU, of the RAM available now (default
    0.25). max_num_seqs: rows in the cache at most; max_batch_tokens: tokens per step at most
    (prefill chunks and decode tokens together). The model's weights are never changed; its
    attention implementation is switched to stopkit's only during the engine's forward passes.
    A PEFT wrapper is unwrapped to its base model. compile: run decode steps through
    torch.compile, padded to a few batch sizes (on CUDA replayed as CUDA graphs); see
    :mod:`stopkit.engine.compiled`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        kv_cache_memory: int | float | None = None,
        compile: bool = False,
    ) -> None:
        self.runner = ModelRunner(model)
        self.model = self.runner.model
        block_size = check_int("block_size", block_size, low=1)
        if (
            block_size < ops.MIN_BLOCK_SIZE
            or block_size > ops.MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise ValueError(
                f"block_size must be a power of two in {ops.MIN_BLOCK_SIZE}.."
                f"{ops.MAX_BLOCK_SIZE}, got {block_size}"
            )
        self.block_size = block_size
        max_num_seqs = check_int("max_num_seqs", max_num_seqs, low=1)
        max_batch_tokens = check_int("max_batch_tokens", max_batch_tokens, low=block_size)
        if num_blocks is not None:
            if kv_cache_memory is not None:
                raise ValueError("give at most one of num_blocks and kv_cache_memory")
            num_blocks = check_int("num_blocks", num_blocks, low=1)
        else:
            num_blocks = self._blocks_from_memory(kv_cache_memory, max_num_seqs, max_batch_tokens)
        self.cache = PagedKVCache.for_model(
            self.model.config,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=self.model.dtype,
            device=self.model.device,
        )
        self.runner.bind(self.cache)
        if check_bool("compile", compile):
            self.runner.compiled_decode = CompiledDecode(
                self.runner, self.cache, max_num_seqs=max_num_seqs
            )
        self.scheduler = Scheduler(
            self.cache, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens
        )
        self._session: Session | None = None
        log.debug(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            block_size,
            self.cache.memory_bytes / 2**20,
        )

    # ---- properties --------------------------------------------------------------------------
    device = property(lambda self: self.runner.device)
    dtype = property(lambda self: self.runner.dtype)
    hidden_size = property(lambda self: self.runner.hidden_size)
    vocab_size = property(lambda self: self.runner.vocab_size)
    max_num_seqs = property(lambda self: self.scheduler.max_num_seqs)
    max_batch_tokens = property(lambda self: self.scheduler.max_batch_tokens)

    @property
    def stats(self) -> SchedulerStats:
        """Counters: steps, preemptions, recomputed / prefill / decode tokens, peak blocks and
        rows in use."""
        return self.scheduler.stats

    @property
    def final_norm(self) -> torch.nn.Module:
        """The model's final norm (applied after :meth:`forward_suffix`'s output)."""
        return self.runner.norm

    def final_norm_params(self) -> tuple[torch.Tensor, float]:
        """(weight ``[hidden_size]``, eps) of the final RMSNorm, for ``ops.stop_score``."""
        return self.runner.final_norm_params()

    # ---- requests ----------------------------------------------------------------------------
    def sampling_params(
        self,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        record_logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> SamplingParams:
        """Validated SamplingParams (ValueError/TypeError naming the argument). eos_token_id None
        takes the model's (generation_config, then config); an empty list disables EOS. seed
        None: drawn from torch's global RNG."""
        if max_new_tokens is not None:
            max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        V = self.vocab_size
        temperature = check_real("temperature", temperature, 0.0)
        top_p = check_real("top_p", top_p, 0.0, 1.0, low_open=True)
        top_k = check_int("top_k", top_k, low=0)
        min_p = check_real("min_p", min_p, 0.0, 1.0)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seed = check_int("seed", seed)
        if eos_token_id is None:
            eos_token_id = getattr(
                getattr(self.model, "generation_config", None), "eos_token_id", None
            )
            if eos_token_id is None:
                eos_token_id = getattr(self.model.config, "eos_token_id", None)
        eos: tuple[int, ...]
        if eos_token_id is None:
            eos = ()
        elif isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool):
            eos = (int(eos_token_id),)
        else:
            eos = tuple(check_int("eos_token_id[i]", e) for e in cast(Sequence[int], eos_token_id))
        if any(not 0 <= e < V for e in eos):
            raise ValueError(f"eos_token_id must lie in [0, {V}), got {list(eos)}")
        record_logprobs = check_bool("record_logprobs", record_logprobs)
        top_logprobs = check_int("top_logprobs", top_logprobs, low=0, high=V)
        return SamplingParams(
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            eos,
            max_new_tokens,
            record_logprobs,
            top_logprobs,
        )

    def check_prompt(self, prompt: Sequence[int] | torch.Tensor, name: str = "prompt") -> list[int]:
        """``prompt`` (token ids: a sequence of ints or a 1-D tensor) as a list, checked against the
        vocabulary."""
        return check_token_ids(name, prompt, self.vocab_size)

    def add_request(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        *,
        n: int = 1,
        checks: Sequence[int] = (),
        key: int | None = None,
        index: int = 0,
        tag: object = None,
    ) -> Group:
        """Queue ``n`` samples of ``prompt`` (token ids); returns its Group (rows in
        ``group.rows``). checks: increasing token counts at which the rows pause until
        :meth:`resume`. key: the random-stream key (default: a hash of the prompt, so sample s
        draws from ``(sampling.seed, prompt, s)`` only). index: the Group's ``index`` (the rows'
        ``prompt_index``). Raises CacheFullError when the request can never fit the budget."""
        self._check_no_session()
        prompt = self.check_prompt(prompt)
        n = check_int("n", n, low=1)
        checks = tuple(check_int(f"checks[{i}]", c, low=1) for i, c in enumerate(checks))
        if any(b <= a for a, b in itertools.pairwise(checks)):
            raise ValueError(f"checks must be strictly increasing, got {list(checks)}")
        group = Group(
            index=index,
            order=0,
            prompt=prompt,
            sampling=sampling,
            key=request_key(prompt) if key is None else key,
            n=n,
            checks=checks,
            tag=tag,
        )
        self.scheduler.add(group)
        return group

    def fork(
        self,
        row: Row,
        sampling: SamplingParams,
        *,
        n: int = 1,
        key: int | None = None,
        index: int = 0,
        tag: object = None,
    ) -> Group:
        """A new request continuing ``row`` (running and fully cached, e.g. at a check): its
        prompt is ``row``'s prompt and tokens, its ``n`` rows share ``row``'s blocks and start
        from its next-token distribution, nothing is prefilled again (Monte-Carlo rollouts of a
        prefix). key: as for :meth:`add_request` (default: a hash of the new prompt, so the rows
        sample as a fresh request of that prompt would). The new request runs with ``row``'s
        request's priority."""
        self._check_no_session()
        n = check_int("n", n, low=1)
        prompt = row.prompt + row.tokens
        group = Group(
            index=index,
            order=0,
            prompt=prompt,
            sampling=sampling,
            key=request_key(prompt) if key is None else key,
            n=n,
            tag=tag,
        )
        self.scheduler.add_fork(group, row)
        return group

    def has_unfinished(self) -> bool:
        """Some queued request has a live row."""
        return self.scheduler.has_work()

    def end_rows(self, rows: Sequence[Row], reason: str = "pruned") -> int:
        """End live ``rows`` (running or waiting) with ``reason`` (one of FINISH_REASONS but eos:
        "length" for a row cut at a limit of the caller's); their blocks are freed at once.
        Returns the blocks freed."""
        if reason not in FINISH_REASONS or reason == "eos":
            raise ValueError(
                f"reason must be one of {', '.join(FINISH_REASONS[1:])}, got {reason!r}"
            )
        return self.scheduler.end(rows, reason)

    def abort(self, group: Group) -> int:
        """End every live row of ``group`` ("aborted") and free its blocks."""
        return self.end_rows(group.rows, "aborted")

    def resume(self, group: Group) -> None:
        """Resolve ``group``'s current check: its live rows decode again (to the next check)."""
        if group.next_check is None:
            raise ValueError("this request has no unresolved check")
        group.check_index += 1

    def step(self) -> StepOutput:
        """One scheduling step (module docstring). Raises CacheFullError when the running rows
        can no longer fit (a path outgrew the whole cache), after ending every live row."""
        return self._step(session=False)

    # ---- scoring ------------------------------------------------------------------------------
    def forward_suffix(
        self,
        rows: Sequence[Row],
        inputs_embeds: torch.Tensor,
        adapter: contextlib.AbstractContextManager | Callable | None = None,
        *,
        final_norm: bool = False,
    ) -> torch.Tensor:
        """Run the model over K extra embeddings after each of ``rows``' cached tokens, without
        writing the cache.

        rows: running, fully cached rows (e.g. at a check). inputs_embeds ``[len(rows), K,
        hidden_size]`` (K in 1..16, the model's dtype and device): suffix token j of row b sits at
        position ``len(prompt) + len(tokens) + j``, attends to all of row b's cached tokens and to
        suffix tokens 0..j. adapter: a context manager (or a zero-argument callable returning
        one) entered around the pass, e.g. one that enables a LoRA adapter. Returns the last
        decoder layer's hidden states ``[B, K, hidden_size]`` BEFORE the final norm (after it with
        ``final_norm=True``). Under autograd (``torch.is_grad_enabled()``) attention runs through
        the differentiable torch oracle; wrap inference in ``torch.no_grad()``."""
        rows = list(rows)
        B = len(rows)
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(
                f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}"
            )
        if (
            inputs_embeds.dim() != 3
            or inputs_embeds.shape[0] != B
            or inputs_embeds.shape[2] != self.hidden_size
        ):
            raise ValueError(
                f"inputs_embeds must have shape [{B} rows, K, {self.hidden_size}], "
                f"got {tuple(inputs_embeds.shape)}"
            )
        K = inputs_embeds.shape[1]
        if not 1 <= K <= ops.MAX_Q_LEN:
            raise ValueError(
                f"inputs_embeds must hold 1..{ops.MAX_Q_LEN} suffix tokens per row, got {K}"
            )
        if inputs_embeds.dtype != self.dtype or inputs_embeds.device != self.device:
            raise TypeError(
                f"inputs_embeds must be {self.dtype} on {self.device}, got "
                f"{inputs_embeds.dtype} on {inputs_embeds.device}"
            )
        for r in rows:
            if r.status is not RowStatus.RUNNING or r.num_cached != r.num_tokens:
                raise ValueError(
                    "forward_suffix needs rows that are in the cache and fully cached "
                    f"(row {r.sample_index} of request {r.group.index} is not)"
                )
        ctx = enter(adapter)
        if B == 0:
            return inputs_embeds.new_empty(inputs_embeds.shape)
        idx = self.scheduler.index_of(rows)
        table = self.cache.block_table[torch.tensor(idx, device=self.device)]
        starts = [r.num_tokens for r in rows]
        batch = self.runner.batch(
            table, starts, [K] * B, slots=None, differentiable=torch.is_grad_enabled()
        )
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            K, device=self.device
        )
        return self.runner.forward_suffix(
            batch, inputs_embeds, positions, ctx, final_norm=final_norm
        )

    # ---- whole calls --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        progress: bool | None = None,
    ) -> list[list[list[int]]]:
        """Sample ``n`` continuations of each prompt (token-id lists, or a 2-D tensor ``[P, L]``),
        all through the scheduler under the KV budget. Returns, per prompt and per sample, the new
        tokens up to and including EOS (at most max_new_tokens). temperature 0 is greedy; top_k 0
        and top_p 1 disable those filters. Sample s of a prompt draws its randomness from
        ``(seed, prompt, s)`` only (seed None: drawn from torch's global RNG). eos_token_id None
        takes the model's (generation_config, then config); an empty list disables EOS. Raises
        CacheFullError before any work when a prompt with its n samples can never fit."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        prompts = self.check_prompts(prompts)
        n = check_int("n", n, low=1)
        sampling = self.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            eos_token_id=eos_token_id,
        )
        self._check_idle()
        groups = []
        try:
            for i, p in enumerate(prompts):
                groups.append(self.add_request(p, sampling, n=n, index=i))
            total = len(prompts) * n * max_new_tokens
            with tqdm(
                total=total,
                desc="generate",
                unit="tok",
                leave=False,
                disable=None if progress is None else not progress,
            ) as bar:
                while self.has_unfinished():
                    out = self.step()
                    bar.update(len(out.sampled))
        except BaseException:
            for g in groups:
                self.abort(g)
            self.scheduler.finished_groups()
            raise
        return [[r.tokens for r in g.rows] for g in groups]

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        record_logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Session:
        """Prefill ``prompts`` and return a :class:`~stopkit.engine.Session` of ``n`` samples per
        prompt, driven by hand (every row stays in the cache; nothing is preempted). Sampling
        arguments as in :meth:`generate`; max_new_tokens None: rows end only at EOS (or when
        dropped); record_logprobs: keep each token's log-probability and entropy; top_logprobs:
        keep the k largest log-probabilities per token (see :class:`Row`). Closes the engine's
        previous session; the engine must run nothing else. Raises CacheFullError before any
        work when the prompts do not fit."""
        from stopkit.engine.session import Session

        prompts = self.check_prompts(prompts)
        n = check_int("n", n, low=1)
        sampling = self.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            eos_token_id=eos_token_id,
            record_logprobs=record_logprobs,
            top_logprobs=top_logprobs,
        )
        if self._session is not None:
            self._session.close()
        self._check_idle()
        prompt_blocks = sum(-(-len(p) // self.block_size) for p in prompts)
        if prompt_blocks > self.cache.num_free_blocks:
            raise CacheFullError(
                f"the prompts need {prompt_blocks} blocks of {self.block_size} "
                f"tokens; the KV cache has {self.cache.num_free_blocks} free"
            )
        groups = [
            Group(index=i, order=0, prompt=p, sampling=sampling, key=request_key(p), n=n)
            for i, p in enumerate(prompts)
        ]
        session = Session(self, groups)
        self._session = session
        try:
            for g in groups:
                self.scheduler.add(g, session=True)
            while any(
                r.status is not RowStatus.RUNNING or r.num_cached < r.num_tokens
                for g in groups
                for r in g.rows
                if r.live
            ):
                self._step(session=True, sample=False)
        except BaseException:
            session.close()
            raise
        return session

    def check_prompts(self, prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        """A non-empty list of prompts (token-id lists, or a 2-D tensor ``[P, L]``), checked."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = prompts.tolist()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(
                f"prompts must be a list of token-id lists, got {type(prompts).__name__}"
            )
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        return [self.check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]

    # ---- internals ----------------------------------------------------------------------------
    def _step(self, *, session: bool, sample: bool = True) -> StepOutput:
        sched = self.scheduler
        out = StepOutput()
        if sample:
            rows = sched.decode_rows()
            if rows:
                assert sched.logits is not None  # set by the step that fed these rows
                logits = sched.logits[
                    torch.tensor(sched.index_of(rows), device=sched.logits.device)
                ]
                sample_rows(rows, logits)
                out.sampled = rows
                for r in rows:
                    sp = r.group.sampling
                    if r.tokens[-1] in sp.eos:
                        r.finish_reason = "eos"
                    elif sp.max_new_tokens is not None and len(r.tokens) >= sp.max_new_tokens:
                        r.finish_reason = "length"
                out.ended = [r for r in rows if r.finish_reason is not None]
                if out.ended:
                    sched.release(out.ended)
        try:
            batch = sched.schedule(session=session)
        except CacheFullError:
            if session:  # the others are unchanged
                for r in out.sampled:
                    if r.live:
                        r.unrecord()
            raise
        if batch is not None:
            out.fed = batch.num_tokens
            logits = self._forward(batch)
            sched.postprocess(batch, logits)
        out.checks = sched.check_groups()
        out.finished = [] if session else sched.finished_groups()
        if (
            not session
            and batch is None
            and not out.sampled
            and not out.checks
            and sched.has_work()
        ):
            stuck = [r for g in sched.groups for r in g.live_rows]
            longest = max(r.num_tokens for r in stuck)
            for g in list(sched.groups):
                sched.end(g.rows, "aborted")
            sched.finished_groups()
            raise CacheFullError(
                f"no path can advance: a path of {longest} tokens no longer fits "
                f"the KV cache of {self.cache.num_blocks} blocks of "
                f"{self.block_size} tokens beside the others"
            )
        return out

    def _forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the model on a ScheduledBatch; float32 logits of the rows it completes."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        logits_at: list[int] = []
        offset = 0
        for r, start, c in zip(batch.rows, batch.starts, batch.counts, strict=True):
            P = len(r.prompt)
            if start < P:
                ids += r.prompt[start : start + c]
            if start + c > P:
                ids += r.tokens[max(start - P, 0) : start + c - P]
            positions += range(start, start + c)
            offset += c
            if start + c == r.num_tokens:
                logits_at.append(offset - 1)
        if len(batch.cache_rows) == self.cache.batch_size and batch.cache_rows == list(
            range(len(batch.cache_rows))
        ):
            table = self.cache.block_table
        else:
            table = self.cache.block_table[torch.tensor(batch.cache_rows, device=dev)]
        fb = self.runner.batch(table, batch.starts, batch.counts, slots=batch.slots)

        def to(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        return self.runner.forward(fb, to(ids), to(positions), to(logits_at))

    def _check_idle(self) -> None:
        if self.scheduler.has_work():
            raise RuntimeError(
                "the engine is running other requests; generate, start and solve "
                "need it to themselves"
            )

    def _check_no_session(self) -> None:
        if self._session is not None and not self._session.closed:
            raise RuntimeError("a Session is open on this engine: close it first")

    def _blocks_from_memory(
        self, kv_cache_memory: int | float | None, max_num_seqs: int, max_batch_tokens: int
    ) -> int:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        per_block = (
            text.num_hidden_layers
            * 2
            * self.block_size
            * kv_heads
            * model_head_dim(text)
            * self.model.dtype.itemsize
        )
        if isinstance(kv_cache_memory, numbers.Integral) and not isinstance(kv_cache_memory, bool):
            budget = check_int("kv_cache_memory", kv_cache_memory, low=1)
        else:
            on_gpu = self.device.type == "cuda"
            share = GPU_MEMORY_UTILIZATION if on_gpu else CPU_MEMORY_SHARE
            if kv_cache_memory is not None:
                share = check_real("kv_cache_memory", kv_cache_memory, 0.0, 1.0, low_open=True)
            # room for one step's activations and the logits of every row
            steps = (
                max_batch_tokens
                * (
                    4 * text.hidden_size
                    + 2 * getattr(text, "intermediate_size", 4 * text.hidden_size)
                )
                * self.model.dtype.itemsize
                + 3 * max_num_seqs * text.vocab_size * 4
            )
            if on_gpu:
                total = torch.cuda.get_device_properties(self.device).total_memory
                budget = int(share * total) - torch.cuda.memory_allocated(self.device) - steps
            else:
                budget = int(share * _available_ram()) - steps
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory leaves {max(budget, 0)} bytes for the KV cache, less "
                f"than one block ({per_block} bytes)"
            )
        return int(num_blocks)
