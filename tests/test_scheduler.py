"""The engine's scheduler: a fixed KV budget with blocks on demand, admission, chunked prefill
beside decodes, preemption by recompute that loses nothing, determinism whatever runs beside a
request, STOP's per-question lifecycle (checks batched across questions, freed blocks reused),
and failures that leave the engine clean. Tiny random float32 models of several families."""

from __future__ import annotations

import pytest
import torch
from test_engine import VOCAB, _model, _prompts
from test_reasoner import QUESTION, RUN, build_tiny

from stopkit.cache import CacheFullError
from stopkit.engine import Engine
from stopkit.reasoner import ParallelReasoner
from stopkit.stop import StopScorer

SAMPLED = dict(temperature=1.0, top_p=0.95, seed=11, eos_token_id=[])


def _free(engine: Engine) -> bool:
    """Nothing left in the engine: every block free, no row, no request."""
    c = engine.cache
    return c.num_free_blocks == c.num_blocks and c.batch_size == 0 and not engine.scheduler.groups


# ---- determinism under a budget ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_oss"])  # plain, sliding window, sinks
def test_samples_do_not_depend_on_budget_preemption_or_neighbours(family):
    model = _model(family)
    prompts = _prompts(5, 17, 33, 9, 40, 3)
    kw = dict(n=4, max_new_tokens=40, **SAMPLED)
    ref = Engine(model).generate(prompts, **kw)
    tight = Engine(model, num_blocks=40, block_size=8, max_num_seqs=12, max_batch_tokens=24)
    got = tight.generate(prompts, **kw)
    s = tight.stats
    assert s.preemptions > 0 and s.recomputed_tokens > 0 and s.peak_blocks <= 40
    assert _free(tight)
    # a prompt's samples are the same alone, in another batch, and under preemption (these
    # peaked random models have no near-tie that float rounding could flip)
    alone = [Engine(model).generate([p], **kw)[0] for p in prompts]
    other = Engine(model).generate(prompts[::-1] + _prompts(12), **kw)[: len(prompts)][::-1]
    assert got == ref == alone == other


def test_blocks_on_demand_not_the_worst_case():
    model = _model("llama")
    prompts = _prompts(12, 12)
    kw = dict(n=4, max_new_tokens=60, **SAMPLED)
    # 8 paths of 72 tokens would need 8 * 5 blocks of 16 at once; 12 blocks hold 2 paths
    engine = Engine(model, num_blocks=12)
    assert engine.generate(prompts, **kw) == Engine(model).generate(prompts, **kw)
    assert engine.stats.peak_blocks <= 12 and engine.stats.preemptions > 0
    # rows take a block when they cross a boundary: short paths never hold more than they use
    short = Engine(model, num_blocks=100)
    short.generate(prompts, n=4, max_new_tokens=3, **SAMPLED)
    assert short.stats.peak_blocks <= 2 + 8  # the prompts' blocks + one per path


def test_chunked_prefill_shares_steps_with_decode():
    model = _model("llama")
    engine = Engine(model, block_size=8, max_batch_tokens=16)
    sp = engine.sampling_params(max_new_tokens=30, **SAMPLED)
    first = engine.add_request(_prompts(6)[0], sp, n=3)
    while not all(r.tokens for r in first.rows):
        engine.step()
    long_prompt = _prompts(50)[0]
    second = engine.add_request(long_prompt, sp, n=2)
    mixed = 0
    while second.rows[0].num_cached < len(long_prompt):
        out = engine.step()
        assert out.fed <= 16
        mixed += bool(out.sampled) and second.rows[0].num_cached > 0
    assert mixed >= 2  # the prompt went in chunks while the first request kept decoding
    while engine.has_unfinished():
        engine.step()
    assert [r.tokens for r in second.rows] == Engine(model).generate(
        [long_prompt], n=2, max_new_tokens=30, **SAMPLED
    )[0]


def test_admission_keeps_room_and_seats():
    model = _model("llama")
    engine = Engine(model, num_blocks=64, max_num_seqs=6)
    sp = engine.sampling_params(max_new_tokens=8, **SAMPLED)
    groups = [engine.add_request(p, sp, n=4) for p in _prompts(5, 5, 5)]
    engine.step()
    # a request's paths run together: 4 + 4 > 6 seats, so the second waits for the first
    assert groups[0].started and not groups[1].started
    while engine.has_unfinished():
        engine.step()
        assert len(engine.scheduler.running) <= 6
    assert all(r.finish_reason == "length" for g in groups for r in g.rows) and _free(engine)


# ---- bad input ---------------------------------------------------------------------------------
def test_budget_arguments():
    model = _model("llama")
    for kw, match in [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_batch_tokens=8), "max_batch_tokens"),
        (dict(num_blocks=10, kv_cache_memory=1 << 20), "at most one"),
        (dict(kv_cache_memory=1.5), "kv_cache_memory"),
        (dict(kv_cache_memory=0.0), "kv_cache_memory"),
        (dict(kv_cache_memory=100), "less than one block"),
    ]:
        with pytest.raises(ValueError, match=match):
            Engine(model, **kw)
    per_block = 2 * 2 * 16 * 2 * 64 * 4  # layers x K/V x block x kv heads x head_dim x float32
    assert Engine(model, kv_cache_memory=10 * per_block + 5).cache.num_blocks == 10
    engine = Engine(model, num_blocks=4)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        sp = engine.sampling_params(max_new_tokens=8)
        with pytest.raises(CacheFullError, match="at least 5 blocks"):  # a block per path
            engine.add_request(_prompts(10)[0], sp, n=5)
        with pytest.raises(CacheFullError, match="needs 5 blocks"):  # one path alone: 70 tokens
            engine.generate(_prompts(10), max_new_tokens=60)
        with pytest.raises(ValueError, match="n must be <= max_num_seqs"):
            Engine(model, max_num_seqs=2).generate(_prompts(3), n=3, max_new_tokens=2)
        with pytest.raises(ValueError, match="checks"):
            engine.add_request(_prompts(3)[0], sp, checks=[4, 2])
        assert not calls and _free(engine)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match=r"prompt\[0\] must be a token id in \[0, 128\)"):
        engine.add_request([VOCAB], sp)


# ---- STOP's lifecycle on the scheduler ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny()
    scorer = StopScorer.new(model, num_tokens=4, lora_rank=8, seed=3)
    with torch.no_grad():
        for lo in scorer.loras:
            lo.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return model, tok, scorer


QUESTIONS = [QUESTION, "2 + 2 =", "3 + 1 = x", "so 4 + 5 =", "then 7 =", "1 + 1 + 1 ="]


def _key(sol):
    return [(p.tokens, p.pruned, p.finish_reason, p.answer) for p in sol.paths], sol.answer


@pytest.mark.parametrize("method", ["stop", "confidence"])
def test_reasoner_under_a_budget_equals_unconstrained(tiny, method):
    model, tok, scorer = tiny
    ref = ParallelReasoner(model, tok, scorer).solve_batch(QUESTIONS, method=method, **RUN)
    engine = Engine(model, num_blocks=24, block_size=8, max_num_seqs=16)
    r = ParallelReasoner(model, tok, scorer, engine=engine)
    order, got = [], {}
    for i, sol in r.solve_iter(QUESTIONS, method=method, **RUN):
        order.append(i)
        got[i] = sol
    assert engine.stats.preemptions > 0 and engine.stats.peak_blocks <= 24 and _free(engine)
    assert sorted(order) == list(range(len(QUESTIONS)))
    for i, sol in enumerate(ref):
        assert _key(got[i]) == _key(sol)
        assert [p.score is None for p in got[i].paths] == [p.score is None for p in sol.paths]
        assert [p.score or 0.0 for p in got[i].paths] == pytest.approx(
            [p.score or 0.0 for p in sol.paths], rel=1e-5
        )
    for i in range(len(QUESTIONS)):  # and alone
        assert _key(r.solve(QUESTIONS[i], method=method, **RUN)) == _key(ref[i])


def test_checks_are_batched_and_freed_blocks_admit_waiting_questions(tiny):
    model, tok, scorer = tiny
    engine = Engine(model, num_blocks=200, block_size=8, max_num_seqs=11)
    r = ParallelReasoner(model, tok, scorer, engine=engine)
    calls = []
    score_rows = scorer.score_rows
    scorer.score_rows = lambda eng, rows: calls.append(len(rows)) or score_rows(eng, rows)
    try:
        # 11 seats: a question's 8 paths run alone until its check keeps 3 of them
        from stopkit.reasoner import ReasoningRun

        run = ReasoningRun(r)
        for q in QUESTIONS[:3]:
            run.add(q, method="stop", **RUN)
        groups = [q.group for q in run._questions.values()]
        while not calls:
            run.step()
        assert not groups[1].started
        run.step()  # the step after the check: the pruned rows' seats went to the next question
        assert groups[1].started
        list(run.results())
    finally:
        del scorer.score_rows
    assert _free(engine)
    # with room for all, every question reaches its check in the same step: one [STOP] pass
    calls.clear()
    r2 = ParallelReasoner(model, tok, scorer)
    score_rows = scorer.score_rows
    scorer.score_rows = lambda eng, rows: calls.append(len(rows)) or score_rows(eng, rows)
    try:
        sols = r2.solve_batch(QUESTIONS, method="stop", **RUN)
    finally:
        del scorer.score_rows
    unfinished = sum(not p.finished_in_prefix for s in sols for p in s.paths)
    assert calls == [unfinished]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_inside_a_step_frees_everything(tiny, error):
    model, tok, scorer = tiny
    engine = Engine(model, num_blocks=60, block_size=8)
    r = ParallelReasoner(model, tok, scorer, engine=engine)

    def judge(tokens, text):
        if len(tokens) >= 6 and sum(tokens) % 5 == 0:
            raise error("the verifier failed")
        return float(len(text))

    with pytest.raises(error):
        r.solve_batch(QUESTIONS, method=judge, **RUN)
    assert _free(engine)
    sol = r.solve(QUESTION, method="confidence", **RUN)  # still usable
    assert (
        sol.answer
        == ParallelReasoner(model, tok).solve(QUESTION, method="confidence", **RUN).answer
    )
    # leaving solve_iter early aborts what is left
    it = r.solve_iter(QUESTIONS, method="stop", **RUN)
    next(it)
    it.close()
    assert _free(engine)


def test_token_phases_and_times(tiny):
    model, tok, scorer = tiny
    sol = ParallelReasoner(model, tok, scorer).solve(QUESTION, method="stop", **RUN)
    t = sol.tokens
    assert t["check"] == sol.scoring_tokens
    assert t["launch"] == sum(min(len(p.tokens), RUN["prefix_tokens"]) for p in sol.paths)
    assert t["launch"] + t["resume"] == sol.generated_tokens
    assert sol.seconds >= sum(sol.phases.values()) * 0.99 > 0


def test_fork_continues_a_row_as_a_fresh_request_would():
    model = _model("llama")
    engine = Engine(model, num_blocks=40, block_size=8, max_num_seqs=10)
    traces = engine.add_request(_prompts(11)[0], engine.sampling_params(**SAMPLED), n=3, checks=[7])
    out = engine.step()
    while not out.checks:
        out = engine.step()
    assert out.checks == [traces]
    rollout = engine.sampling_params(max_new_tokens=20, **{**SAMPLED, "seed": 5})
    free = engine.cache.num_free_blocks
    # 3 traces + 12 rollouts > 10 seats: the last fork's rows wait, then prefill their prompt
    forks = [engine.fork(row, rollout, n=4) for row in traces.rows]
    assert engine.cache.num_free_blocks == free  # the forks share the traces' blocks
    assert [sum(r.status.value == "running" for r in f.rows) for f in forks] == [4, 3, 0]
    engine.end_rows(traces.rows, "length")
    while engine.has_unfinished():
        engine.step()
    for row, fork in zip(traces.rows, forks, strict=True):
        assert len(row.tokens) == 7 and row.finish_reason == "length"
        expect = Engine(model).generate(
            [row.prompt + row.tokens], n=4, max_new_tokens=20, **{**SAMPLED, "seed": 5}
        )[0]
        assert [r.tokens for r in fork.rows] == expect
    assert _free(engine)
