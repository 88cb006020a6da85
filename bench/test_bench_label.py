"""Labelling throughput over Ray workers (stopkit.distributed) on the toy model: rollout tokens per
second of ``stopkit label``'s work (64 train problems, 2 traces x 8 rollouts, l_p=12, up to 100
tokens), in one process of one torch thread and on 1 and 2 workers of one torch thread each on a
local Ray instance (the single process with a worker's KV cache size: the engine's default RAM
share / 2). Ray's start and the workers' model loads are not timed; every run's records
are checked equal to the single process's (so every run samples the same rollout tokens, counted
once in the single process). Median of ROUNDS runs of each.

Run: pytest bench/test_bench_label.py --benchmark-only -s   (about 3 minutes on 2 idle cores)
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from stopkit.label import LabelTask, check_problems, label_stream
from stopkit.toy import MAX_NEW_TOKENS, MODEL_DIR, PREFIX_TOKENS, TEMPERATURE, load_model
from stopkit.toy.task import check, generate

PROBLEMS, TRACES, ROLLOUTS, ROUNDS = 64, 2, 8, 3
TASK = LabelTask(
    prefix_tokens=PREFIX_TOKENS,
    rollouts=ROLLOUTS,
    traces=TRACES,
    max_new_tokens=MAX_NEW_TOKENS,
    temperature=TEMPERATURE,
    top_p=1.0,
    checker=check,
)


def test_bench_label(benchmark):
    ray = pytest.importorskip("ray")
    from stopkit.distributed import ModelSpec, RayPool
    from stopkit.engine import CPU_MEMORY_SHARE, Engine

    torch.set_num_threads(1)
    problems = [
        {"id": i, "question": p.question, "answer": str(p.answer)}
        for i, p in enumerate(generate(PROBLEMS, seed=11, split="train"))
    ]
    model, tokenizer = load_model()
    items = check_problems(problems, tokenizer)

    # made once, as each worker makes its own, with a worker's KV share on this 2-CPU Ray node
    engine = Engine(model, kv_cache_memory=CPU_MEMORY_SHARE / 2)
    step, sampled = engine.step, [0]

    def counting_step():  # every sampled row drew one token
        out = step()
        sampled[0] += len(out.sampled)
        return out

    engine.step = counting_step

    def one_process() -> dict:
        sampled[0] = 0
        records = {
            pid: (recs, ended)
            for pid, recs, ended in label_stream(engine, tokenizer, items, TASK, progress=False)
        }
        return {"records": records, "sampled": sampled[0]}

    reference = one_process()
    ended = sum(e for _, e in reference["records"].values())
    assert ended == 0, "a trace ended inside the prefix: the rollout count below would be off"
    rollout_tokens = reference["sampled"] - PROBLEMS * TRACES * PREFIX_TOKENS
    seconds: dict[str, list[float]] = {"1 process": [], "ray 1 worker": [], "ray 2 workers": []}

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        records = run()
        seconds[name].append(time.perf_counter() - start)
        assert records == reference["records"], name

    for _ in range(ROUNDS):
        timed("1 process", lambda: one_process()["records"])
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        ray_items = check_problems(problems, None)
        for workers in (1, 2):
            name = f"ray {workers} worker{'s' * (workers > 1)}"
            with RayPool(ModelSpec(str(MODEL_DIR), device="cpu"), workers=workers) as pool:
                pool.start()

                def run():
                    return {
                        pid: (recs, e)
                        for pid, recs, e in pool.label_stream(ray_items, TASK, progress=False)
                    }

                if workers == 2:
                    benchmark.pedantic(timed, args=(name, run), rounds=ROUNDS, iterations=1)
                else:
                    for _ in range(ROUNDS):
                        timed(name, run)
    finally:
        ray.shutdown()
    load = os.getloadavg()
    print(
        f"\n{PROBLEMS} problems x {TRACES} traces x {ROLLOUTS} rollouts: {rollout_tokens} "
        f"rollout tokens; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} "
        f"cores"
    )
    print(f"{'run':<14} {'rollout tok/s':>14} {'seconds (median)':>17}  all")
    base = statistics.median(seconds["1 process"])
    for name, s in seconds.items():
        med = statistics.median(s)
        benchmark.extra_info[f"{name} rollout_tokens_per_s"] = rollout_tokens / med
        print(
            f"{name:<14} {rollout_tokens / med:>14.0f} {med:>17.2f}  "
            f"{' '.join(f'{x:.2f}' for x in s)}  ({base / med:.2f}x one process)"
        )
