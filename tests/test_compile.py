"""Engine(compile=True): the compiled decode step. Greedy output and the KV cache equal the eager
engine's (inductor on llama; gpt-oss, with sinks, sliding windows and MoE layers, through
AOTAutograd), one compile per batch bucket and none per step, no graph break in the model's step,
and on CUDA the buckets replayed as CUDA graphs without host syncs or allocations."""

from __future__ import annotations

import pytest
import torch
from test_engine import VOCAB, _cpu_model, _model  # the tiny random models of every family

from stopkit import ops
from stopkit.engine import Engine
from stopkit.engine.compiled import CompiledDecode, decode_buckets


class CountingBackend:
    """A torch.compile backend counting the graphs it is given (one per compile)."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


def _compiled_engine(model, backend=None, **kw) -> Engine:
    """Engine(compile=True), its compiled step on ``backend`` when given (None: the default)."""
    torch._dynamo.reset()
    engine = Engine(model, compile=True, **kw)
    if backend is not None:
        engine.runner.compiled_decode = CompiledDecode(
            engine.runner, engine.cache, max_num_seqs=engine.max_num_seqs, backend=backend
        )
    return engine


def _count_steps(decode: CompiledDecode) -> list[int]:
    """The batch buckets of the steps ``decode`` runs from now on (appended as they run)."""
    seen: list[int] = []
    bucket = decode.bucket
    decode.bucket = lambda rows: seen.append(bucket(rows)) or seen[-1]
    return seen


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(256)[-3:] == [64, 128, 256]


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be a bool"):
        Engine(_cpu_model("llama"), num_blocks=8, compile=1)


@pytest.mark.parametrize("family,backend", [("llama", None), ("gpt_oss", "aot_eager")])
def test_greedy_and_cache_equal_eager(family, backend):
    """Three prompts (one block, several, and a chunked prefill): the compiled engine's greedy
    tokens equal the eager engine's, every decode step ran compiled, and the two KV caches hold
    the same values (a padding row that wrote anywhere would show there)."""
    model = _cpu_model(family)
    prompts = [torch.randint(4, VOCAB, (n,)).tolist() for n in (3, 17, 33)]
    kw = dict(num_blocks=32, max_num_seqs=8)
    eager = Engine(model, **kw)
    want = eager.generate(prompts, max_new_tokens=14, eos_token_id=[])
    engine = _compiled_engine(model, backend, **kw)
    seen = _count_steps(engine.runner.compiled_decode)
    assert engine.generate(prompts, max_new_tokens=14, eos_token_id=[]) == want
    assert set(seen) == {4} and 3 * len(seen) == engine.stats.decode_tokens  # 3 rows, padded to 4
    # padding changes the matmuls' blocking: float32 rounding, far below a misplaced write
    torch.testing.assert_close(engine.cache.storage, eager.cache.storage, rtol=1e-4, atol=1e-4)


@torch._dynamo.config.patch(recompile_limit=1)
def test_one_compile_per_bucket_and_none_per_step():
    """Five requests ending at different lengths: the live batch shrinks 5 -> 1 across the
    buckets 8, 4, 2, 1, each compiled exactly once however many steps use it (even under a
    recompile limit of 1: the step raises it to its bucket count). Tokens and cache equal the
    eager engine's: a padding row that kept a finished row's slot would overwrite its freed block."""
    model = _cpu_model("llama")
    prompts = [torch.randint(4, VOCAB, (5,)).tolist() for _ in range(5)]

    def run(engine: Engine) -> list[list[int]]:
        groups = [
            engine.add_request(
                p, engine.sampling_params(max_new_tokens=3 * (i + 1), eos_token_id=[])
            )
            for i, p in enumerate(prompts)
        ]
        while engine.has_unfinished():
            engine.step()
        return [g.rows[0].tokens for g in groups]

    kw = dict(num_blocks=64, max_num_seqs=8)
    eager = Engine(model, **kw)
    want = run(eager)
    backend = CountingBackend()
    engine = _compiled_engine(model, backend, **kw)
    seen = _count_steps(engine.runner.compiled_decode)
    assert run(engine) == want and [len(t) for t in want] == [3, 6, 9, 12, 15]
    assert set(seen) == {8, 4, 2, 1} and len(seen) > 10
    assert backend.graphs == 4
    torch.testing.assert_close(engine.cache.storage, eager.cache.storage, rtol=1e-4, atol=1e-4)


def test_stop_lifecycle_equals_eager():
    """Two questions of STOP (Launch -> Check -> Resume) on a compiled engine: the rows of the
    question at a check keep their logits while the other question decodes, the [STOP] pass runs
    eagerly between compiled steps with its LoRA hooks on; every path, score and vote equals the
    eager engine's."""
    from test_reasoner import QUESTION, RUN, build_tiny

    from stopkit import ParallelReasoner, StopScorer

    model, tok = build_tiny()
    scorer = StopScorer.new(model, num_tokens=4, lora_rank=8, seed=3)
    with torch.no_grad():  # a non-trivial adapter
        for lo in scorer.loras:
            lo.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    questions = [QUESTION, "2 + 2 = x"]
    run = {**RUN, "prefix_tokens": 6, "method": "stop"}

    def solve(engine: Engine):
        sols = ParallelReasoner(model, tok, scorer, engine=engine).solve_batch(questions, **run)
        return (
            [[(p.tokens, p.pruned, p.finished_in_prefix) for p in s.paths] for s in sols],
            [[p.score or 0.0 for p in s.paths] for s in sols],
            [(s.answer, s.votes) for s in sols],
        )

    kw = dict(num_blocks=64, max_num_seqs=16)  # aot_eager copies the storage per write_kv
    want_paths, want_scores, want_votes = solve(Engine(model, **kw))
    engine = _compiled_engine(model, CountingBackend(), **kw)
    seen = _count_steps(engine.runner.compiled_decode)
    paths, scores, votes = solve(engine)
    assert paths == want_paths and votes == want_votes
    for got, want in zip(scores, want_scores, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert sum(p for s in want_paths for _, p, _ in s) > 0 and len(set(seen)) > 1


@torch._dynamo.config.patch(recompile_limit=1)
def test_engines_compile_apart():
    """Each engine's step has its own compile cache: three engines in turn compile one graph
    each, none hitting the recompile limit that they would share otherwise."""
    backend = CountingBackend("eager")
    torch._dynamo.reset()
    for _ in range(3):
        engine = Engine(_cpu_model("llama"), num_blocks=16, max_num_seqs=1)
        engine.runner.compiled_decode = CompiledDecode(
            engine.runner, engine.cache, max_num_seqs=1, backend=backend
        )
        engine.generate([[5, 6, 7]], max_new_tokens=4, eos_token_id=[])
    assert backend.graphs == 3


def test_no_graph_break_in_the_step():
    engine = _compiled_engine(_cpu_model("gpt_oss"))
    decode = engine.runner.compiled_decode
    with engine.runner.paged_attention():
        explained = torch._dynamo.explain(decode._forward)(*decode._inputs(4))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.skipif(not ops.cuda_available(), reason="needs stopkit's CUDA kernels and a GPU")
@pytest.mark.parametrize("family,backend", [("llama", None), ("gpt_oss", "eager")])
def test_cuda_graphs_greedy_equal_eager(family, backend):
    """Inductor + CUDA graphs on llama; gpt-oss's step (sinks, windows, MoE) traced by Dynamo
    alone and captured."""
    model = _model(family, "cuda")
    prompts = [torch.randint(4, VOCAB, (n,)).tolist() for n in (3, 17, 33, 8, 5)]
    kw = dict(num_blocks=64, max_num_seqs=8)
    want = Engine(model, **kw).generate(prompts, max_new_tokens=12, eos_token_id=[])
    engine = _compiled_engine(model, backend, **kw)
    seen = _count_steps(engine.runner.compiled_decode)
    assert engine.generate(prompts, max_new_tokens=12, eos_token_id=[]) == want
    decode = engine.runner.compiled_decode
    assert decode.cuda_graphs and set(decode.graphs) == {8} == set(seen)
    assert 5 * len(seen) == engine.stats.decode_tokens


@pytest.mark.skipif(not ops.cuda_available(), reason="needs stopkit's CUDA kernels and a GPU")
def test_cuda_graph_step_has_no_sync_or_allocation():
    """A replayed step (copies into the static buffers, one graph launch) neither synchronises
    with the host nor allocates."""
    model = _model("llama", "cuda")
    engine = _compiled_engine(model, num_blocks=64, max_num_seqs=4)
    engine.generate([[5, 6, 7], [8, 9]], max_new_tokens=4, eos_token_id=[])  # captures bucket 2
    decode = engine.runner.compiled_decode
    rows = engine.cache.add(2)
    slots = engine.cache.extend(1)[:, 0]
    table = engine.cache.block_table[rows]
    batch = engine.runner.batch(table, [0, 0], [1, 1], slots=slots)
    ids = torch.tensor([5, 8], device="cuda")
    positions = torch.zeros(2, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = decode(batch, ids, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    assert logits.shape == (2, VOCAB) and set(decode.graphs) == {2}
