"""A compiled decode step (``Engine(model, compile=True)``).

A decode step (every fed row feeds one token) runs the model through ``torch.compile`` with
stopkit's attention and cache: ``torch.ops.stopkit.write_kv`` and ``paged_attention`` sit inside
the graph as opaque custom ops. So that shapes repeat, the live batch of T rows is padded to the
next of a few size buckets (powers of two below ``max_num_seqs``, and ``max_num_seqs``): a padding
row has slot -1 (write_kv skips it), length 0 (attention reads nothing) and its logits are dropped.
The inputs are copied into static buffers first (ids, positions, slots, block table, lengths; the
block table at a fixed width), so each bucket compiles once. On CUDA each bucket is also captured
as a CUDA graph the first time it is used and replayed afterwards: a step is then a few copies into
the buffers and one graph launch, with no host sync or allocation. Prefill chunks and [STOP]
suffix passes stay eager.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from stopkit.cache import PagedKVCache
from stopkit.engine.model_runner import ForwardBatch, ModelRunner

__all__ = ["CompiledDecode", "decode_buckets"]

log = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes a decode step is padded to: 1, 2, 4, ... below max_num_seqs, then it."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


class CompiledDecode:
    """Decode steps of ``runner`` over ``cache``, compiled per batch bucket (and on CUDA replayed
    as CUDA graphs unless ``cuda_graphs=False``). ``backend``: torch.compile's backend."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: PagedKVCache,
        *,
        max_num_seqs: int,
        cuda_graphs: bool = True,
        backend: str = "inductor",
    ) -> None:
        self.runner = runner
        self.storage = cache.storage
        self.buckets = decode_buckets(max_num_seqs)
        # The block table's fixed width: as many blocks as a row of the model's longest context
        # uses (a step with a longer row runs eagerly), at most the whole cache.
        config = runner.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        longest = getattr(text, "max_position_embeddings", None)
        self.width = (
            cache.num_blocks
            if not longest
            else min(cache.num_blocks, -(-longest // cache.block_size))
        )
        # an upper bound of every length the graph sees, without a device sync (CUDA's split plan)
        self.max_seq_len = self.width * cache.block_size
        n, dev = self.buckets[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.table = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compiled: set[int] = set()  # the buckets run so far
        self._pool: Any = None  # the CUDA graphs' shared memory pool, from the first capture
        # One graph per bucket (static shapes). torch.compile caches graphs, and counts them
        # against its recompile limit, per code object: the step gets a code object of its own,
        # so that each engine's buckets are its own, and the limit is raised to the bucket count.
        forward = CompiledDecode._forward
        own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__)
        self._step = torch.compile(types.MethodType(own, self), dynamic=False, backend=backend)
        dynamo = torch._dynamo.config  # the limit's older name: cache_size_limit
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        self._limit = dynamo.patch(**{limit: max(getattr(dynamo, limit), len(self.buckets))})

    def accepts(self, batch: ForwardBatch) -> bool:
        """Whether the decode step ``batch`` fits the buckets and the block table's width."""
        table = batch.single_table
        return (
            batch.single_all
            and table is not None
            and table.shape[0] <= self.buckets[-1]
            and table.shape[1] <= self.width
        )

    def bucket(self, rows: int) -> int:
        """The batch size ``rows`` rows are padded to."""
        return next(b for b in self.buckets if b >= rows)

    @torch.no_grad()
    def __call__(
        self, batch: ForwardBatch, token_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The step ``batch`` (accepted; token_ids, positions int64 ``[T]``): float32 logits
        ``[T, V]``, a view of a buffer that the next step overwrites."""
        table, lens, slots = batch.single_table, batch.single_lens, batch.slots
        assert table is not None and lens is not None and slots is not None  # a decode step
        T = token_ids.shape[0]
        B = self.bucket(T)
        w = table.shape[1]
        self.ids[:T].copy_(token_ids)
        self.positions[:T].copy_(positions)
        self.slots[:T].copy_(slots)
        self.table[:T, :w].copy_(table)
        self.lens[:T].copy_(lens)
        self.slots[T:B].fill_(-1)  # padding rows: written nowhere, attend to nothing
        self.lens[T:B].fill_(0)
        if B not in self.compiled:
            log.info(
                "compiling the decode step for %d rows%s",
                B,
                " (and capturing its CUDA graph)" if self.cuda_graphs else "",
            )
            self.compiled.add(B)
            if self.cuda_graphs:
                self._capture(B)  # turns cuda_graphs off if the step cannot be captured
        if self.cuda_graphs:
            graph, logits = self.graphs[B]
            graph.replay()
            return logits[:T]
        with self.runner.paged_attention(), self._limit:
            return self._step(*self._inputs(B))[:T]

    def _inputs(self, B: int) -> tuple[torch.Tensor, ...]:
        return (
            self.storage,
            self.ids[:B],
            self.positions[:B],
            self.slots[:B],
            self.table[:B],
            self.lens[:B],
        )

    def _forward(
        self,
        storage: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        table: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        """The traced step. The KV storage goes in whole and is cut into layers inside: views of
        one tensor passed as separate inputs would make AOTAutograd copy the storage per call."""
        layers = range(storage.shape[0])
        batch = ForwardBatch(
            [storage[i, 0] for i in layers],
            [storage[i, 1] for i in layers],
            slots,
            self.max_seq_len,
            single_table=table,
            single_lens=lens,
            single_all=True,
        )
        out = self.runner.call(
            self.runner.model, batch, input_ids=ids[:, None], position_ids=positions[:, None]
        )
        return out.logits[:, -1].float()

    def _capture(self, B: int) -> None:
        """Compile bucket ``B``, warm it up on a side stream, then capture it as a CUDA graph
        (graphs share one memory pool). The warm-up steps write the staged step's keys and values,
        which the replay writes again, identically. A model whose step cannot be captured (e.g. a
        host sync in an MoE router) runs compiled without CUDA graphs from then on."""
        args = self._inputs(B)
        with self.runner.paged_attention(), self._limit:
            stream = torch.cuda.Stream(self.runner.device)
            stream.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(*args)
            torch.cuda.current_stream(self.runner.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = self._step(*args)
            except RuntimeError as e:
                log.warning("decode steps run without CUDA graphs: capturing one failed (%s)", e)
                self.cuda_graphs = False
                return
        self._pool = graph.pool()
        self.graphs[B] = (graph, logits)
