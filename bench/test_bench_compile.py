"""Decode throughput of Engine(compile=True) against the eager engine, and the compile time.

Models (random weights, Llama layout): "engine" is bench/test_bench_engine.py's (hidden 256,
4 layers, 4 heads / 2 kv heads, head_dim 64, intermediate 1024, vocab 4096), "mid" hidden 512,
8 layers, 8 heads / 2 kv heads, head_dim 64, intermediate 2048, vocab 4096 (CPU and CUDA), and on
CUDA "1.5B", DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2: hidden 1536, 28 layers, 12 heads /
2 kv heads, head_dim 128, intermediate 8960, vocab 151936) in bfloat16.

Each case decodes ROWS rows (n samples of one 32-token prompt, greedy, no EOS) for NEW_TOKENS
tokens with a compiled engine and with an eager one, alternately: the timed rounds are the
compiled engine's (pytest-benchmark), each preceded by an untimed-for-the-benchmark eager run of
the same work, so the ratio is taken between neighbouring runs (a shared machine's speed drifts).
Reported: tokens per second of the whole generate call (the 32-token prefill is one step of it),
both engines' medians, the median of the per-round ratios, and the compile time (the compiled
engine's first run, which compiles its batch bucket or captures its CUDA graph, minus the eager
engine's first run). Modes: "compiled" (Engine(model, compile=True): inductor, and on CUDA CUDA
graphs) and on CUDA "graphs" (the step traced by Dynamo without inductor and replayed as CUDA
graphs: what the graphs alone give).

Run: pytest bench/test_bench_compile.py --benchmark-only -s [--bench-devices cpu|cuda]
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import transformers as T

from stopkit import ops
from stopkit.engine import Engine
from stopkit.engine.compiled import CompiledDecode

PROMPT_LEN = 32
MODELS = {  # name: (config class, config, dtype, rows, new tokens, devices)
    "engine": (
        T.LlamaConfig,
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
        torch.float32,
        64,
        32,
        ("cpu", "cuda"),
    ),
    "mid": (
        T.LlamaConfig,
        dict(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
        ),
        torch.float32,
        64,
        32,
        ("cpu", "cuda"),
    ),
    "1.5B": (
        T.Qwen2Config,
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=131072,
        ),
        torch.bfloat16,
        64,
        128,
        ("cuda",),
    ),
}
MODES = {"cpu": ("compiled",), "cuda": ("graphs", "compiled")}
ROUNDS = {"cpu": 5, "cuda": 3}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"device", "model_name", "mode"} <= set(metafunc.fixturenames):
        wanted = [d.strip() for d in metafunc.config.getoption("--bench-devices").split(",")]
        devices = [
            d for d in ("cpu", "cuda") if d in wanted and (d == "cpu" or ops.cuda_available())
        ]
        cases = [
            (d, m, mode)
            for d in devices
            for m, spec in MODELS.items()
            if d in spec[-1]
            for mode in MODES[d]
        ]
        metafunc.parametrize(
            "device,model_name,mode", cases, ids=[f"{d}-{m}-{mode}" for d, m, mode in cases]
        )


_MODELS: dict = {}


def _model(device: str, name: str) -> T.PreTrainedModel:
    if (device, name) not in _MODELS:
        _MODELS.clear()  # one model at a time (the 1.5B one is 3 GB)
        config_cls, config, dtype, *_ = MODELS[name]
        torch.manual_seed(0)
        with torch.device(device):
            model = T.AutoModelForCausalLM.from_config(
                config_cls(**config, bos_token_id=None, eos_token_id=None, pad_token_id=None),
                dtype=dtype,
            )
        _MODELS[device, name] = model.eval()
    return _MODELS[device, name]


def _engine(model, mode: str | None, rows: int, new_tokens: int) -> Engine:
    """An engine sized for the case; mode None: eager."""
    blocks_per_row = -(-(PROMPT_LEN + new_tokens) // 16)
    engine = Engine(
        model, num_blocks=rows * blocks_per_row + 8, max_num_seqs=rows, compile=mode == "compiled"
    )
    if mode == "graphs":
        engine.runner.compiled_decode = CompiledDecode(
            engine.runner, engine.cache, max_num_seqs=rows, backend="eager"
        )
    return engine


def test_decode(benchmark, device, model_name, mode):
    model = _model(device, model_name)
    rows, new_tokens = MODELS[model_name][3:5]
    prompt = torch.randint(
        0, model.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    torch._dynamo.reset()
    engines = {
        "eager": _engine(model, None, rows, new_tokens),
        mode: _engine(model, mode, rows, new_tokens),
    }

    def run(name: str) -> float:
        start = time.perf_counter()
        out = engines[name].generate([prompt], n=rows, max_new_tokens=new_tokens, eos_token_id=[])
        if device == "cuda":
            torch.cuda.synchronize()
        assert sum(map(len, out[0])) == rows * new_tokens
        return time.perf_counter() - start

    warmup = {name: run(name) for name in engines}  # compiles the bucket / captures its graph
    eager: list[float] = []
    benchmark.pedantic(
        run,
        args=(mode,),
        setup=lambda: eager.append(run("eager")),
        rounds=ROUNDS[device],
        iterations=1,
    )
    if benchmark.stats is None:  # --benchmark-disable
        return
    timed = benchmark.stats.stats.data
    per_s = lambda seconds: rows * new_tokens / seconds  # noqa: E731
    info = dict(
        tokens_per_s=per_s(statistics.median(timed)),
        eager_tokens_per_s=per_s(statistics.median(eager)),
        speedup=statistics.median(e / t for e, t in zip(eager, timed, strict=True)),
        compile_s=warmup[mode] - warmup["eager"],
        rows=rows,
        new_tokens=new_tokens,
        threads=torch.get_num_threads(),
    )
    benchmark.extra_info.update(info)
    print(
        f"\n{device} {model_name} {mode}: {info['tokens_per_s']:.0f} tokens/s, eager "
        f"{info['eager_tokens_per_s']:.0f} (medians of {ROUNDS[device]} alternating runs of {rows} x "
        f"{new_tokens} tokens), {info['speedup']:.2f}x eager (per-round ratios "
        f"{' '.join(f'{e / t:.2f}' for e, t in zip(eager, timed, strict=True))}), compile "
        f"{info['compile_s']:.1f} s, {info['threads']} threads"
    )
