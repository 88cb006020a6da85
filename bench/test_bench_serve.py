"""``stopkit serve`` against the same questions in process: the toy task's 128 held-out problems,
N=32 paths pruned to k=8 at l_p=12 (the demo's settings), seed 0, one KV budget for all runs (25%
of the blocks that running all 128 questions at once without sharing would take, as in
test_bench_scheduler.py), one torch thread everywhere.

- server: ``stopkit serve`` in a subprocess, 16 concurrent clients (httpx, in this process)
  sending the 128 questions to /v1/completions, each client sending its next question as soon as
  it has an answer. Questions per second, and the p50 / p99 latency the clients see.
- in process, 16 in flight: a ReasoningRun fed as the clients feed the server (a new question as
  soon as one finishes), run before and after the server (the machine's speed drifts): the same
  work without HTTP, so the server's own cost. Latency: each Solution's ``seconds``.
- in process, all at once: ``ParallelReasoner.solve_iter`` over the 128 questions. It batches all
  of them together (fewer, larger steps), which 16 clients never let a server do; its latency
  grows with the position in the queue.

Each run also reports the CPU seconds it used (the server process's, for the server): the
server's own cost, free of the drift of a shared machine's speed.

Target: the server's questions/s within 15% of in process with 16 in flight (the mean of the two
runs), judged per CPU second where /proc gives the server's (its wall-time rate moves with the
machine's load by more than the target's margin; both are printed); the ratio to solve_iter is
reported beside it. The answers must agree (same seed, same
questions). Requires the serve extra and httpx.

Run: pytest bench/test_bench_serve.py --benchmark-only -s   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stopkit import _C
from stopkit.engine import Engine
from stopkit.reasoner import ParallelReasoner, ReasoningRun
from stopkit.stop import StopScorer
from stopkit.toy import (
    ADAPTER_DIR,
    MAX_NEW_TOKENS,
    MODEL_DIR,
    PREFIX_TOKENS,
    TEMPERATURE,
    load_model,
    task,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS, N, KEEP, CLIENTS, BUDGET_SHARE, MAX_NUM_SEQS, BLOCK_SIZE = 128, 32, 8, 16, 0.25, 1024, 16
TARGET = 0.85  # server questions/s >= TARGET x in process with CLIENTS questions in flight


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class ServerProcess:
    """``stopkit serve`` on a free loopback port in a subprocess; stop() ends it with SIGINT."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stopkit", "serve", "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        found = threading.Event()
        self.url = None

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"serving .* on (http://[\d.]+:\d+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("stopkit serve did not start:\n" + "".join(self.log[-20:]))
        while True:  # the port is bound before the model loads; wait for the app
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "stopkit serve did not become healthy:\n" + "".join(self.log[-20:])
                )
            time.sleep(0.1)

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the server process has used (Linux), None elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _clients(url: str, questions: list[str], body: dict) -> tuple[float, list, list]:
    """(seconds, answers by question, latencies): CLIENTS clients share the questions."""
    answers: list = [None] * len(questions)
    latencies: list[float] = []
    todo = iter(range(len(questions)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json={**body, "prompt": questions[i]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            answers[i] = r.json()["stopkit"]["answer"]

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return time.perf_counter() - start, answers, latencies


def test_bench_serve(benchmark):
    threads, c_threads = torch.get_num_threads(), _C.num_threads()
    torch.set_num_threads(1)  # a 2.4M-parameter model gains nothing from more
    _C.set_num_threads(1)
    try:
        _run(benchmark)
    finally:
        torch.set_num_threads(threads)
        _C.set_num_threads(c_threads)


def _run(benchmark) -> None:
    model, tokenizer = load_model(torch.float32)
    scorer = StopScorer.load(ADAPTER_DIR, model)
    problems = task.generate(PROBLEMS, seed=1234, split="test")
    questions = [p.question for p in problems]
    all_at_once = sum(
        N * -(-(len(tokenizer(q)["input_ids"]) + MAX_NEW_TOKENS) // BLOCK_SIZE) for q in questions
    )
    num_blocks = int(BUDGET_SHARE * all_at_once)
    results = {}
    args = dict(
        n=N,
        keep=KEEP,
        prefix_tokens=PREFIX_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        method="stop",
        temperature=TEMPERATURE,
        top_p=1.0,
        seed=0,
    )

    def in_process(name: str, in_flight: int | None) -> None:
        engine = Engine(
            model, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS
        )
        reasoner = ParallelReasoner(model, tokenizer, scorer, engine=engine)
        start, cpu = time.perf_counter(), time.process_time()
        if in_flight is None:
            sols = dict(reasoner.solve_iter(questions, progress=False, **args))
        else:
            run, sols, todo = ReasoningRun(reasoner, progress=False), {}, iter(range(PROBLEMS))
            for i in itertools.islice(todo, in_flight):
                run.add(questions[i], index=i, **args)
            while run.pending:
                for i, sol in run.step():
                    sols[i] = sol
                    for j in itertools.islice(todo, 1):
                        run.add(questions[j], index=j, **args)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        latencies = [s.seconds for s in sols.values()]
        results[name] = dict(
            questions_per_s=PROBLEMS / seconds,
            seconds=seconds,
            p50_s=percentile(latencies, 50),
            p99_s=percentile(latencies, 99),
            answers=[sols[i].answer for i in range(PROBLEMS)],
            preemptions=engine.stats.preemptions,
            steps=engine.stats.steps,
            cpu_s=cpu,
        )

    def served() -> None:
        server = ServerProcess(
            [
                "--model",
                str(MODEL_DIR),
                "--adapter",
                str(ADAPTER_DIR),
                "--num-blocks",
                str(num_blocks),
                "--max-num-seqs",
                str(MAX_NUM_SEQS),
                "--n",
                str(N),
                "--keep",
                str(KEEP),
                "--prefix-tokens",
                str(PREFIX_TOKENS),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--temperature",
                str(TEMPERATURE),
                "--top-p",
                "1",
            ]
        )
        try:
            cpu = server.cpu_seconds()
            seconds, answers, latencies = asyncio.run(_clients(server.url, questions, {"seed": 0}))
            cpu = None if cpu is None else server.cpu_seconds() - cpu
            metrics = httpx.get(server.url + "/metrics").text
        finally:
            server.stop()

        def metric(name: str) -> int:
            return int(float(re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE).group(1)))

        results["server"] = dict(
            questions_per_s=PROBLEMS / seconds,
            seconds=seconds,
            p50_s=percentile(latencies, 50),
            p99_s=percentile(latencies, 99),
            answers=answers,
            preemptions=metric("stopkit_preemptions_total"),
            steps=metric("stopkit_engine_steps_total"),
            cpu_s=cpu,
        )

    in_process("in process, all", None)
    in_process("in process, 16", CLIENTS)
    benchmark.pedantic(served, rounds=1, iterations=1)
    in_process("in process, 16 (after)", CLIENTS)
    same = statistics.mean(
        results[k]["questions_per_s"] for k in ("in process, 16", "in process, 16 (after)")
    )
    ratio = results["server"]["questions_per_s"] / same
    cpu_ratio = None
    if results["server"]["cpu_s"] is not None:  # questions per CPU second, server / in process
        cpu_ratio = statistics.mean(
            results[k]["cpu_s"] for k in ("in process, 16", "in process, 16 (after)")
        )
        cpu_ratio /= results["server"]["cpu_s"]
    ratio_all = results["server"]["questions_per_s"] / results["in process, all"]["questions_per_s"]
    load = os.getloadavg()
    print(
        f"\nKV budget {num_blocks} blocks of {BLOCK_SIZE} tokens ({BUDGET_SHARE:.0%} of "
        f"{all_at_once}), N={N}, k={KEEP}, l_p={PREFIX_TOKENS}, {CLIENTS} clients; load "
        f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{'run':<23} {'q/s':>6} {'seconds':>8} {'p50 s':>7} {'p99 s':>7} {'preempt':>8} {'steps':>6} {'cpu s':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:<23} {r['questions_per_s']:>6.2f} {r['seconds']:>8.1f} {r['p50_s']:>7.2f} "
            f"{r['p99_s']:>7.2f} {r['preemptions']:>8} {r['steps']:>6} "
            f"{'-' if r['cpu_s'] is None else format(r['cpu_s'], '6.1f'):>6}"
        )
        for key, value in r.items():
            if key != "answers":
                benchmark.extra_info[f"{name}_{key}"] = value
    benchmark.extra_info.update(
        server_vs_in_process=ratio,
        server_vs_in_process_cpu=cpu_ratio,
        server_vs_solve_iter=ratio_all,
        load_average=load,
    )
    judged = ratio if cpu_ratio is None else cpu_ratio
    print(
        f"server / in process with {CLIENTS} in flight: {ratio:.2f}x wall"
        + ("" if cpu_ratio is None else f", {cpu_ratio:.2f}x per CPU second")
        + f" (target >= {TARGET}x); server / solve_iter all at once: {ratio_all:.2f}x wall"
    )
    for name, r in results.items():
        assert r["answers"] == results["server"]["answers"], name
    if judged < TARGET:
        pytest.fail(f"target missed: the server runs at {judged:.2f}x the in-process questions/s")
