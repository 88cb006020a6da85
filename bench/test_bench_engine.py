"""End to end: n = 64 samples of 256 new tokens from one 32-token prompt on a small random Llama
(4 layers, hidden 256, intermediate 1024, 4 heads / 2 kv heads, head_dim 64, vocab 4096, float32),
stopkit.Engine against ``model.generate(num_return_sequences=64, do_sample=True)`` in the same run,
with the same sampling (temperature 1, no top-k / top-p) and no EOS, so both produce exactly
64 x 256 tokens. Reports tokens per second and peak memory above the pre-run baseline: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the process RSS sampled every 2 ms (torch's CPU
tensors come from malloc; freed memory is handed back with malloc_trim before each run). CPU time
(process time) is reported too: on a shared machine it moves far less with the load than wall
time. Target: at least 2x the tokens per second of transformers.

Run: pytest bench/test_bench_engine.py --benchmark-only -s
(on a busy machine, OMP_NUM_THREADS=1 keeps OpenMP barriers from dominating both sides)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time

import pytest
import torch
import transformers as T

from stopkit import ops
from stopkit.engine import Engine

N, NEW_TOKENS, PROMPT_LEN, VOCAB = 64, 256, 32, 4096
TARGET = 2.0


def _devices(config) -> list[str]:
    wanted = [d.strip() for d in config.getoption("--bench-devices").split(",")]
    return [d for d in ("cpu", "cuda") if d in wanted and (d == "cpu" or ops.cuda_available())]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices(metafunc.config))


class PeakMemory:
    """Peak bytes above the baseline while the block runs (CUDA allocator or sampled CPU RSS)."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        with contextlib.suppress(OSError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, self._rss() - self.base)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def test_bench_engine_vs_generate(benchmark, device):
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = T.LlamaForCausalLM(config).eval().to(device)
    model.generation_config.pad_token_id = 0  # silences a warning; there is no EOS to pad after
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,)).tolist()
    engine = Engine(model)
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0)
    engine.generate([prompt], n=4, max_new_tokens=4, seed=0, **sampling)  # warm-up
    ids = torch.tensor([prompt], device=device)
    hf_args = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        num_return_sequences=N,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        **sampling,
    )
    with torch.no_grad():
        model.generate(ids, **{**hf_args, "max_new_tokens": 4, "min_new_tokens": 4})

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}

    def measure(name, run):
        with PeakMemory(device) as mem:
            start, cpu = time.perf_counter(), time.process_time()
            tokens = run()
            sync()
            results[name] = (
                tokens,
                time.perf_counter() - start,
                time.process_time() - cpu,
                mem.peak,
            )

    def ours():
        out = engine.generate([prompt], n=N, max_new_tokens=NEW_TOKENS, seed=1, **sampling)
        return sum(map(len, out[0]))

    def theirs():
        with torch.no_grad():
            out = model.generate(ids, **hf_args)
        return (out.shape[1] - PROMPT_LEN) * out.shape[0]

    benchmark.pedantic(measure, args=("ours", ours), rounds=1, iterations=1)
    measure("transformers", theirs)
    for name, (tokens, seconds, cpu, peak) in results.items():
        assert tokens == N * NEW_TOKENS, (name, tokens)
        benchmark.extra_info[f"{name}_tokens_per_s"] = tokens / seconds
        benchmark.extra_info[f"{name}_tokens_per_cpu_s"] = tokens / cpu
        benchmark.extra_info[f"{name}_peak_mib"] = peak / 2**20
        print(
            f"\n{device} {name:>12}: {tokens / seconds:8.1f} tokens/s ({seconds:.2f} s wall, "
            f"{cpu:.2f} s cpu), peak memory +{peak / 2**20:.1f} MiB"
        )
    speedup = results["transformers"][1] / results["ours"][1]
    cpu_speedup = results["transformers"][2] / results["ours"][2]
    benchmark.extra_info.update(speedup=speedup, cpu_speedup=cpu_speedup)
    print(
        f"{device} speedup {speedup:.2f}x wall, {cpu_speedup:.2f}x cpu time (target {TARGET}x), "
        f"torch threads {torch.get_num_threads()}"
    )
    assert speedup >= TARGET, f"stopkit.Engine is {speedup:.2f}x transformers, target {TARGET}x"
