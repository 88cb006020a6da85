"""End to end under a fixed KV budget: the toy task's 128 held-out problems, N=32 paths pruned to
k=8 at l_p=12 (the demo's settings), with a KV budget of 25% of the blocks that running all 128
questions at once without sharing would take (128 x 32 paths x their prompt + 100 new tokens).

Three runs of the same questions and seed, in one process: ``full`` and ``stop`` each as one
``solve_batch`` of all 128 questions (continuous batching: questions are admitted as the budget
allows, and the blocks that pruning or finished paths free go to waiting questions at once), and
``full`` solved 8 questions at a time (one ``solve_batch`` per chunk, as the demo did before the
scheduler: each chunk waits for its slowest path). Reports questions per second, vote accuracy,
peak blocks and rows in use, preemptions. Targets: stop >= 2x the questions/s of continuous full;
continuous full >= 1.3x chunked full; vote accuracy as the demo's (same seed).

The three runs go round ROUNDS times, interleaved, after a warm-up, and each is reported by its
median. The engine runs on one thread, so its process time is the work it did; the targets are
judged on process time, which moves far less than wall time when other jobs share the machine
(wall-time ratios are printed too).

Run: pytest bench/test_bench_scheduler.py --benchmark-only -s   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from stopkit.engine import Engine
from stopkit.reasoner import ParallelReasoner
from stopkit.stop import StopScorer
from stopkit.toy import ADAPTER_DIR, MAX_NEW_TOKENS, PREFIX_TOKENS, TEMPERATURE, load_model, task

PROBLEMS, N, KEEP, CHUNK, BUDGET_SHARE, MAX_NUM_SEQS = 128, 32, 8, 8, 0.25, 1024
ROUNDS = 2
TARGET_STOP, TARGET_CONTINUOUS = 2.0, 1.3


def test_bench_scheduler(benchmark):
    torch.set_num_threads(1)  # a 2.4M-parameter model gains nothing from more
    model, tokenizer = load_model(torch.float32)
    scorer = StopScorer.load(ADAPTER_DIR, model)
    problems = task.generate(PROBLEMS, seed=1234, split="test")
    questions = [p.question for p in problems]
    bs = 16
    all_at_once = sum(
        N * -(-(len(tokenizer(q)["input_ids"]) + MAX_NEW_TOKENS) // bs) for q in questions
    )
    num_blocks = int(BUDGET_SHARE * all_at_once)
    args = dict(
        n=N,
        keep=KEEP,
        prefix_tokens=PREFIX_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        extractor=task.extract_answer,
        seed=0,
        progress=False,
    )
    runs: dict[str, list[dict]] = {"full": [], "stop": [], "full chunked": []}

    def run(method: str, chunk: int, count: int = PROBLEMS) -> dict:
        engine = Engine(model, num_blocks=num_blocks, block_size=bs, max_num_seqs=MAX_NUM_SEQS)
        reasoner = ParallelReasoner(model, tokenizer, scorer, engine=engine)
        wall, cpu = time.perf_counter(), time.process_time()
        sols = []
        for i in range(0, count, chunk):
            sols += reasoner.solve_batch(
                questions[i : min(i + chunk, count)], method=method, **args
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        s = engine.stats
        return dict(
            questions_per_s=count / wall,
            questions_per_cpu_s=count / cpu,
            seconds=wall,
            vote_accuracy=sum(
                sol.answer == p.answer for sol, p in zip(sols, problems, strict=False)
            )
            / count,
            tokens=sum(sol.generated_tokens for sol in sols) / count,
            peak_blocks=s.peak_blocks,
            peak_rows=s.peak_rows,
            preemptions=s.preemptions,
        )

    run("stop", PROBLEMS, count=16)  # warm-up: the allocator, the kernels, the adapter

    def one_round() -> None:
        runs["full"].append(run("full", PROBLEMS))
        runs["stop"].append(run("stop", PROBLEMS))
        runs["full chunked"].append(run("full", CHUNK))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    results = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    print(
        f"\nKV budget {num_blocks} blocks of {bs} tokens ({BUDGET_SHARE:.0%} of {all_at_once}), "
        f"max_num_seqs {MAX_NUM_SEQS}, medians of {ROUNDS} rounds"
    )
    print(
        f"{'run':<13} {'q/s':>6} {'q/cpu s':>8} {'vote acc':>9} {'tokens':>7} {'peak blocks':>12} "
        f"{'peak rows':>10} {'preempt':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<13} {r['questions_per_s']:>6.2f} {r['questions_per_cpu_s']:>8.2f} "
            f"{100 * r['vote_accuracy']:>8.1f}% {r['tokens']:>7.0f} {r['peak_blocks']:>12.0f} "
            f"{r['peak_rows']:>10.0f} {r['preemptions']:>8.0f}"
        )
        for key, value in r.items():
            benchmark.extra_info[f"{name}_{key}"] = value

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    stop_x = ratio("stop", "full", "questions_per_cpu_s")
    cont_x = ratio("full", "full chunked", "questions_per_cpu_s")
    benchmark.extra_info.update(stop_vs_full=stop_x, continuous_vs_chunked=cont_x)
    print(
        f"stop / full: {stop_x:.2f}x process time, {ratio('stop', 'full', 'questions_per_s'):.2f}x "
        f"wall (target {TARGET_STOP}x); continuous / chunked full: {cont_x:.2f}x process time, "
        f"{ratio('full', 'full chunked', 'questions_per_s'):.2f}x wall (target {TARGET_CONTINUOUS}x)"
    )
    assert all(r["peak_blocks"] <= num_blocks for rs in runs.values() for r in rs)
    assert results["full"]["vote_accuracy"] == results["full chunked"]["vote_accuracy"]
    if stop_x < TARGET_STOP or cont_x < TARGET_CONTINUOUS:
        pytest.fail(f"targets missed: stop {stop_x:.2f}x, continuous {cont_x:.2f}x")
