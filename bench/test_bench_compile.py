"""Decode throughput of Engine(compile=True) against the eager engine, and the compile time.

Models (random weights, Llama layout): "engine" is bench/test_bench_engine.py's (hidden 256,
4 layers, 4 heads / 2 kv heads, head_dim 64, intermediate 1024, vocab 4096), "mid" hidden 512,
8 layers, 8 heads / 2 kv heads, head_dim 64, intermediate 2048, vocab 4096 (CPU and CUDA), and on
CUDA "1.5B", DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2: hidden 1536, 28 layers, 12 heads /
2 kv heads, head_dim 128, intermediate 8960, vocab 151936) in bfloat16.

Each case decodes ROWS rows (n samples of one 32-token prompt, greedy, no EOS) for NEW_TOKENS
tokens; the timed runs (after a warm-up run that compiles the batch bucket, or captures its CUDA
graph) report tokens per second of the whole generate call (the 32-token prefill is one step of
it) and the warm-up's seconds (compile included). Modes: "eager" (Engine(model)), "compiled"
(Engine(model, compile=True): inductor, and on CUDA CUDA graphs), and on CUDA "graphs" (the step
traced by Dynamo without inductor, replayed as CUDA graphs: what the graphs alone give).
The compiled mode's ratio to eager of the same case and run is in extra_info["speedup"].

Run: pytest bench/test_bench_compile.py --benchmark-only -s [--bench-devices cpu|cuda]
"""

from __future__ import annotations

import time

import pytest
import torch
import transformers as T

from stopkit import ops
from stopkit.engine import Engine
from stopkit.engine.compiled import CompiledDecode

PROMPT_LEN = 32
MODELS = {  # name: (config class, config, dtype, rows, new tokens, devices)
    "engine": (T.LlamaConfig, dict(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64),
               torch.float32, 64, 32, ("cpu", "cuda")),
    "mid": (T.LlamaConfig, dict(vocab_size=4096, hidden_size=512, intermediate_size=2048,
                                num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                head_dim=64),
            torch.float32, 64, 32, ("cpu", "cuda")),
    "1.5B": (T.Qwen2Config, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                 num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, max_position_embeddings=131072),
             torch.bfloat16, 64, 128, ("cuda",)),
}
MODES = {"cpu": ("eager", "compiled"), "cuda": ("eager", "graphs", "compiled")}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"device", "model_name", "mode"} <= set(metafunc.fixturenames):
        wanted = [d.strip() for d in metafunc.config.getoption("--bench-devices").split(",")]
        devices = [d for d in ("cpu", "cuda") if d in wanted and (d == "cpu" or ops.cuda_available())]
        cases = [(d, m, mode) for d in devices for m, spec in MODELS.items() if d in spec[-1]
                 for mode in MODES[d]]
        metafunc.parametrize("device,model_name,mode", cases,
                             ids=[f"{d}-{m}-{mode}" for d, m, mode in cases])


_MODELS: dict = {}
_EAGER_SECONDS: dict = {}


def _model(device: str, name: str) -> T.PreTrainedModel:
    if (device, name) not in _MODELS:
        _MODELS.clear()  # one model at a time (the 1.5B one is 3 GB)
        config_cls, config, dtype, *_ = MODELS[name]
        torch.manual_seed(0)
        with torch.device(device):
            model = T.AutoModelForCausalLM.from_config(
                config_cls(**config, bos_token_id=None, eos_token_id=None, pad_token_id=None),
                dtype=dtype)
        _MODELS[device, name] = model.eval()
    return _MODELS[device, name]


def test_decode(benchmark, device, model_name, mode):
    model = _model(device, model_name)
    rows, new_tokens = MODELS[model_name][3:5]
    blocks_per_row = -(-(PROMPT_LEN + new_tokens) // 16)
    torch._dynamo.reset()
    engine = Engine(model, num_blocks=rows * blocks_per_row + 8, max_num_seqs=rows,
                    compile=mode == "compiled")
    if mode == "graphs":
        engine.runner.compiled_decode = CompiledDecode(engine.runner, engine.cache,
                                                       max_num_seqs=rows, backend="eager")
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        out = engine.generate([prompt], n=rows, max_new_tokens=new_tokens, eos_token_id=[])
        sync()
        return out

    start = time.perf_counter()
    first = run()  # the warm-up: compiles the bucket (captures its graph on CUDA)
    warmup = time.perf_counter() - start
    assert sum(map(len, first[0])) == rows * new_tokens
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    tokens_per_s = rows * new_tokens / seconds
    info = dict(tokens_per_s=tokens_per_s, warmup_s=warmup, rows=rows, new_tokens=new_tokens,
                threads=torch.get_num_threads())
    key = (device, model_name)
    if mode == "eager":
        _EAGER_SECONDS[key] = (seconds, warmup)
    elif key in _EAGER_SECONDS:
        eager_seconds, eager_warmup = _EAGER_SECONDS[key]
        info.update(speedup=eager_seconds / seconds, compile_s=warmup - eager_warmup)
    benchmark.extra_info.update(info)
    extra = "".join(f", {k} {info[k]:.2f}" for k in ("speedup", "compile_s") if k in info)
    print(f"\n{device} {model_name} {mode}: {tokens_per_s:.0f} tokens/s (median of 3 runs of "
          f"{rows} x {new_tokens} tokens), warm-up {warmup:.1f} s{extra}")
