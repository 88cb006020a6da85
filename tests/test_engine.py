"""stopkit.Engine on tiny random-weight models of every supported family: greedy decode equals
``model.generate`` token for token, sampling is reproducible and per-sample, EOS and pruning free
rows, forward_suffix equals a plain transformers forward and leaves the cache untouched, and bad
input fails before any work."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers as T
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stopkit import sampling
from stopkit.cache import CacheFullError
from stopkit.engine import SUPPORTED_MODEL_TYPES, Engine

VOCAB, EOS = 128, 3
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)
# small sliding windows so that prompts + decode run past them
FAMILIES = {
    "llama": (T.LlamaConfig, {}),
    "mistral": (T.MistralConfig, dict(sliding_window=8)),
    "mixtral": (
        T.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
    "qwen2": (T.Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": (T.Qwen3Config, {}),
    "qwen3_moe": (
        T.Qwen3MoeConfig,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    ),
    "granite": (
        T.GraniteConfig,
        dict(
            attention_multiplier=0.05,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
        ),
    ),
    "olmo2": (T.Olmo2Config, {}),
    "phi3": (T.Phi3Config, {}),
    "gpt_oss": (T.GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}


@functools.cache
def _cpu_model(family: str) -> T.PreTrainedModel:
    config_cls, extra = FAMILIES[family]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return T.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra)).eval()


def _model(family: str, device: torch.device | str = "cpu") -> T.PreTrainedModel:
    model = _cpu_model(family)
    return model if torch.device(device).type == "cpu" else model.to(device)


def _prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(4, VOCAB, (n,)).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
    )[0, len(prompt) :].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def test_supported_families_are_the_tested_ones():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_generate(family):
    model = _model(family)
    impl = model.config._attn_implementation
    prompts = _prompts(3, 17, 33)  # one block, several, and > 16 queries (chunked prefill)
    out = Engine(model).generate(prompts, max_new_tokens=14)
    assert model.config._attn_implementation == impl  # switched back after the engine's passes
    for p, samples in zip(prompts, out, strict=True):
        assert len(samples) == 1
        assert samples[0] == _hf_greedy(model, p, 14)


def test_greedy_on_device_and_in_prefill_chunks(device):
    model = _model("llama", device)
    prompts = _prompts(20, 5, 31, 9)
    expected = [[_hf_greedy(model, p, 10)] for p in prompts]
    assert Engine(model).generate(prompts, max_new_tokens=10) == expected
    # prompts in chunks of at most 16 tokens, beside other rows' decode tokens
    assert (
        Engine(model, block_size=8, max_batch_tokens=16).generate(prompts, max_new_tokens=10)
        == expected
    )


# ---- sampling ------------------------------------------------------------------------------------
def _rows(session):
    return {(r.prompt_index, r.sample_index): r.tokens for r in session.all_rows}


def test_sampling_reproducible_and_per_sample(device):
    model = _model("llama", device)
    prompts = _prompts(7, 19)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=40, seed=7, eos_token_id=[])
    engine = Engine(model)
    a = engine.generate(prompts, n=5, **kw)
    assert engine.generate(prompts, n=5, **kw) == a
    assert len({tuple(s) for s in a[0]}) == 5  # the samples differ
    assert engine.generate(prompts, n=5, **{**kw, "seed": 8}) != a
    # sample s of prompt p depends on (seed, p, s) only: not on n, not on other prompts
    assert engine.generate(prompts, n=2, **kw) == [a[0][:2], a[1][:2]]
    assert engine.generate(prompts[:1], n=5, **kw) == [a[0]]


def test_pruning_other_rows_does_not_change_a_sample():
    engine = Engine(_model("llama"))
    prompts = _prompts(6, 11)
    kw = dict(n=6, max_new_tokens=20, temperature=0.8, min_p=0.02, seed=3, eos_token_id=[])
    with engine.start(prompts, **kw) as ref:
        ref.step(20)
        full = _rows(ref)
    with engine.start(prompts, **kw) as s:
        s.step(5)
        free_before = engine.cache.num_free_blocks
        result = s.prune(torch.rand(12), keep=4)
        assert engine.cache.num_free_blocks > free_before
        assert len(s.rows) == 4 and result.kept.tolist() == sorted(result.kept.tolist())
        s.step(3)
        s.drop([1])
        assert len(s.rows) == 3 and engine.cache.batch_size == 3
        s.step(20)
        assert not s.rows
        for r in s.all_rows:
            got = full[(r.prompt_index, r.sample_index)]
            if r.finish_reason == "pruned":
                assert r.tokens == got[: len(r.tokens)] and len(r.tokens) in (5, 8)
            else:
                assert r.finish_reason == "length" and r.tokens == got


def test_filters_match_transformers_warpers():
    logits = torch.randn(6, 300) * 3
    for t, k, p, m in [
        (0.7, 0, 1.0, 0.0),
        (1.3, 20, 1.0, 0.0),
        (1.0, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.9, 50, 0.9, 0.05),
    ]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        for warper in (
            ([TopKLogitsWarper(k)] if k else [])
            + ([TopPLogitsWarper(p)] if p < 1 else [])
            + ([MinPLogitsWarper(m)] if m else [])
        ):
            ref = warper(None, ref)
        got = sampling.filter_logits(logits, temperature=t, top_k=k, top_p=p, min_p=m)
        assert torch.equal(got.isinf(), ref.isinf())
        torch.testing.assert_close(got[~got.isinf()], ref[~ref.isinf()])


@pytest.mark.parametrize(
    "vocab, kw",
    [(10, dict(top_k=6)), (1000, dict(top_p=0.9)), (300, dict(temperature=0.5, min_p=0.01))],
)
def test_sampler_draws_the_filtered_distribution(vocab, kw):
    kw = {"temperature": 1.0, **kw}
    logits = torch.randn(1, vocab) * 2
    n = 40000
    keys = torch.tensor([sampling.sample_key(5, 0, s) for s in range(n)])
    u = sampling.uniforms(keys, torch.full((n,), 3, dtype=torch.int64))
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    probs = torch.softmax(sampling.filter_logits(logits, **kw), -1)
    tokens = sampling._inverse_cdf(probs.expand(n, -1), u)
    assert torch.equal(tokens[:50], sampling.sample(logits.expand(50, -1), u[:50], **kw))
    probs = probs[0].double()
    allowed = probs > 0
    assert bool(allowed[tokens].all())  # never a filtered token
    counts = torch.bincount(tokens, minlength=vocab).double()[allowed]
    expected = n * probs[allowed]
    df = int(allowed.sum()) - 1
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < df + 6 * (2 * df) ** 0.5 + 10, (chi2, df)
    # the next counter gives fresh numbers
    u2 = sampling.uniforms(keys, torch.full((n,), 4, dtype=torch.int64))
    assert abs(float(torch.corrcoef(torch.stack([u, u2]))[0, 1])) < 0.03


def test_uniforms_numpy_and_torch_paths_agree():
    keys = torch.tensor([sampling.sample_key(s, s % 3, s * 7) for s in range(500)])
    counters = torch.randint(0, 2**40, (500,))
    counters[:10] = torch.arange(10)
    u = sampling.uniforms(keys, counters)
    assert torch.equal(u, sampling._uniforms_torch(keys, counters))
    assert torch.equal(sampling.uniforms(keys[::2], counters[::2]), u[::2])  # strided views


# ---- logprobs and EOS ----------------------------------------------------------------------------
def test_logprobs_entropies_and_top_logprobs():
    model = _model("qwen3")
    prompts = _prompts(9, 4)
    with Engine(model).start(
        prompts,
        n=2,
        max_new_tokens=8,
        temperature=1.0,
        seed=1,
        eos_token_id=[],
        record_logprobs=True,
        top_logprobs=5,
    ) as s:
        s.step(8)
        for r in s.all_rows:
            ids = torch.tensor([r.prompt + r.tokens])
            with torch.no_grad():
                logits = model(ids).logits[0, len(r.prompt) - 1 : -1].double()
            logp = torch.log_softmax(logits, -1)
            chosen = logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
            torch.testing.assert_close(
                torch.tensor(r.logprobs, dtype=torch.float64), chosen, rtol=1e-5, atol=1e-5
            )
            entropy = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(
                torch.tensor(r.entropies, dtype=torch.float64), entropy, rtol=1e-5, atol=1e-5
            )
            top = logp.topk(5, dim=-1)
            assert r.top_logprobs.shape == (8, 5) and r.top_logprobs.dtype == torch.float32
            torch.testing.assert_close(r.top_logprobs.double(), top.values, rtol=1e-5, atol=1e-5)
            assert torch.equal(r.top_ids, top.indices)


def test_eos_ends_a_row_and_frees_it():
    engine = Engine(_model("llama"))
    prompts = _prompts(5, 21)
    plain = engine.generate(prompts, max_new_tokens=12, eos_token_id=[])
    eos = plain[1][0][4]  # a token prompt 1 emits at step 5
    first = plain[1][0].index(eos)
    with engine.start(prompts, max_new_tokens=12, eos_token_id=eos) as s:
        s.step(first)
        live_blocks = engine.cache.num_free_blocks
        s.step(1)  # prompt 1 samples eos now and leaves the batch
        r1 = s.all_rows[1]
        assert r1.finish_reason == "eos" and r1.tokens == plain[1][0][: first + 1]
        assert s.rows == [s.all_rows[0]] or s.all_rows[0].finish_reason == "eos"
        assert engine.cache.batch_size == len(s.rows)
        assert engine.cache.num_free_blocks >= live_blocks
        s.step(12)
        r0 = s.all_rows[0]
        exp0 = plain[0][0][: plain[0][0].index(eos) + 1] if eos in plain[0][0] else plain[0][0]
        assert r0.tokens == exp0 and r0.finished
    assert engine.generate(prompts, max_new_tokens=12, eos_token_id=[7, eos]) == [
        [t[: min([t.index(e) + 1 for e in (7, eos) if e in t], default=12)] for t in p]
        for p in plain
    ]


# ---- forward_suffix ------------------------------------------------------------------------------
class _FakeLora:
    """A context manager that adds x @ A @ B to every q_proj and v_proj output while active."""

    def __init__(self, model, rank: int = 4):
        self.model, self.handles = model, []
        self.mods = [m for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
        self.ab = [
            (
                torch.randn(m.in_features, rank, device=model.device) * 0.3,
                torch.randn(rank, m.out_features, device=model.device) * 0.3,
            )
            for m in self.mods
        ]

    def __enter__(self):
        self.handles = [
            m.register_forward_hook(lambda mod, args, out, a=a, b=b: out + args[0] @ a @ b)
            for m, (a, b) in zip(self.mods, self.ab, strict=True)
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def _two_stage(model, prefix: list[int], suffix: torch.Tensor, adapter) -> torch.Tensor:
    """transformers' own answer: the prefix with use_cache (no adapter), then the suffix embeddings
    at positions l..l+K-1 with the adapter on. Returns the final-norm hidden states [K, d]."""
    ids = torch.tensor([prefix], device=model.device)
    out = model.model(ids, use_cache=True)
    L, K = len(prefix), suffix.shape[0]
    with adapter:
        return model.model(
            inputs_embeds=suffix[None],
            cache=out.cache,
            use_cache=True,
            position_ids=torch.arange(L, L + K, device=model.device)[None],
        ).last_hidden_state[0]


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "granite"])
def test_forward_suffix_equals_transformers_and_leaves_the_cache(family, device):
    model = _model(family, device)
    engine = Engine(model)
    prompts = _prompts(13, 4, 30)
    kw = dict(n=2, max_new_tokens=30, temperature=1.0, seed=11, eos_token_id=[])
    with engine.start(prompts, **kw) as s:
        s.step(6)
        s.drop([3])  # rows of different lengths, one gone
        K = 4
        emb = torch.randn(len(s.rows), K, model.config.hidden_size, device=device)
        lora = _FakeLora(model)
        storage = engine.cache.storage.clone()
        table, lens = engine.cache.block_table.clone(), engine.cache.seq_lens.clone()
        with torch.no_grad():
            pre = s.forward_suffix(emb, adapter=lora)
            post = s.forward_suffix(emb, adapter=lambda: lora, final_norm=True)
            assert not lora.handles  # the adapter was switched off again
            # Two float32 runs of the whole model that round differently: here the prefix was
            # decoded token by token through our kernels, there in one pass through torch's
            # (float64 is not an option: gpt-oss's experts run grouped_mm). The kernels themselves
            # are held to 1e-5 against float64 oracles in test_paged_attention.py.
            for b, row in enumerate(s.rows):
                ref = _two_stage(model, row.prompt + row.tokens, emb[b], lora)
                torch.testing.assert_close(post[b], ref, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(engine.final_norm(pre[b]), ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(engine.cache.storage, storage)
        assert torch.equal(engine.cache.block_table, table) and torch.equal(
            engine.cache.seq_lens, lens
        )
        s.step(30)
        scored = _rows(s)
    with engine.start(prompts, **kw) as s:  # resuming after a check is as if never checked
        s.step(6)
        s.drop([3])
        s.step(30)
        assert _rows(s) == scored


def test_forward_suffix_gradients_match_transformers():
    """Under autograd, gradients reach the suffix embeddings and the adapter's weights; they agree
    with a float64 transformers reference at least as well as transformers' own float32 run."""
    model = _model("qwen2")
    model64 = copy.deepcopy(model).double()
    engine = Engine(model)
    with engine.start(_prompts(10, 18), max_new_tokens=8, eos_token_id=[]) as s:
        s.step(3)
        emb = torch.randn(2, 3, model.config.hidden_size)
        lora, lora64 = _FakeLora(model), _FakeLora(model64)
        lora64.ab = [(a.double(), b.double()) for a, b in lora.ab]
        weights = torch.linspace(-1, 1, emb.numel())

        def grads(run, x, adapter):
            x = x.clone().requires_grad_(True)
            for _, b in adapter.ab:
                b.requires_grad_(True).grad = None
            out = run(x, adapter)
            (out.flatten() * weights.to(out.dtype)).sum().backward()
            return out.detach(), [x.grad] + [b.grad for _, b in adapter.ab]

        def hf(model_):
            return lambda x, adapter: torch.stack(
                [
                    _two_stage(model_, r.prompt + r.tokens, x[i], adapter)
                    for i, r in enumerate(s.rows)
                ]
            )

        out, got = grads(lambda x, a: s.forward_suffix(x, adapter=a, final_norm=True), emb, lora)
        ref32, hf32 = grads(hf(model), emb, lora)
        _ref64, hf64 = grads(hf(model64), emb.double(), lora64)
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
        for g, g32, g64 in zip(got, hf32, hf64, strict=True):
            err, err_hf = (g.double() - g64).abs().max(), (g32.double() - g64).abs().max()
            assert err <= max(2 * err_hf, 1e-5 * g64.abs().max()), (err, err_hf)


# ---- bad input -----------------------------------------------------------------------------------
def _count_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda *a: calls.append(1))


def test_bad_input_fails_before_any_work():
    model = _model("llama")
    engine = Engine(model, num_blocks=3, block_size=16)
    calls, hook = _count_forwards(model)
    try:
        good = _prompts(5)
        for kw, err in [
            (dict(prompts=[]), ValueError),
            (dict(prompts=[[]]), ValueError),
            (dict(prompts=[[1, VOCAB]]), ValueError),
            (dict(prompts="abc"), TypeError),
            (dict(n=0), ValueError),
            (dict(n=1.5), TypeError),
            (dict(max_new_tokens=0), ValueError),
            (dict(temperature=-0.1), ValueError),
            (dict(temperature=float("nan")), ValueError),
            (dict(top_p=0.0), ValueError),
            (dict(top_k=-1), ValueError),
            (dict(min_p=1.5), ValueError),
            (dict(eos_token_id=VOCAB), ValueError),
            (dict(seed="x"), TypeError),
        ]:
            args = {"prompts": good, "max_new_tokens": 4, **kw}
            with pytest.raises(err):
                engine.generate(args.pop("prompts"), **args)
        with pytest.raises(CacheFullError):  # 49 tokens need 4 blocks of 16
            engine.start(_prompts(49))
        with pytest.raises(CacheFullError):  # a path of 20 + 30 tokens needs 4 blocks
            engine.generate(_prompts(20), n=2, max_new_tokens=30)
        assert not calls
        assert engine.cache.num_free_blocks == 3 and engine.cache.batch_size == 0
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="llama"):
        Engine(T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=VOCAB)))
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, block_size=12)


def _run_request(engine: Engine, prompt: list[int], n: int, checks: tuple, max_new: int):
    """Rows of one request run to the end (resumed unpruned at each check)."""
    sp = engine.sampling_params(max_new_tokens=max_new, temperature=1.0, seed=3, eos_token_id=[])
    group = engine.add_request(prompt, sp, n=n, checks=checks)
    while engine.has_unfinished():
        for g in engine.step().checks:
            engine.resume(g)
    return [r.tokens for r in group.rows]


@pytest.mark.parametrize("checks", [(), (13,)])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("prompt_len", [16, 20])  # whole prompt blocks; a partly filled one
def test_a_request_is_refused_exactly_when_it_cannot_fit(prompt_len, n, checks):
    """The fewest blocks a request needs, counted here: the prompt's whole blocks (its paths share
    them) plus, per path, its own blocks from there up to its first check (without checks: its
    first token; a partly filled prompt block is then one path's own block), and no fewer than
    one path alone at its longest. With exactly that many the request runs to the end and samples
    what it samples under no budget; with one fewer it is refused before any work."""
    model = _model("llama")
    bs, max_new = 16, 24
    whole = prompt_len // bs
    upto = prompt_len + (checks[0] if checks else 1)
    together = whole + n * (-(-upto // bs) - whole)
    need = max(together, -(-(prompt_len + max_new) // bs))
    prompt = _prompts(prompt_len)[0]
    free = _run_request(Engine(model, block_size=bs), prompt, n, checks, max_new)
    tight = Engine(model, num_blocks=need, block_size=bs)
    assert _run_request(tight, prompt, n, checks, max_new) == free
    assert all(len(t) == max_new for t in free)
    short = Engine(model, num_blocks=need - 1, block_size=bs)
    calls, hook = _count_forwards(model)
    try:
        with pytest.raises(CacheFullError):
            _run_request(short, prompt, n, checks, max_new)
    finally:
        hook.remove()
    assert not calls and short.cache.num_free_blocks == need - 1 and short.cache.batch_size == 0
    if not checks:  # a session (no max_new_tokens) holds its prompt and one token per row
        Engine(model, num_blocks=together, block_size=bs).start([prompt], n=n).close()
        with pytest.raises(CacheFullError):
            Engine(model, num_blocks=together - 1, block_size=bs).start([prompt], n=n)


def test_session_misuse():
    engine = Engine(_model("llama"))
    s = engine.start(_prompts(6), n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="inputs_embeds"):
        s.forward_suffix(torch.randn(3, 2, 128))
    with pytest.raises(ValueError, match="suffix tokens"):
        s.forward_suffix(torch.randn(2, 17, 128))
    with pytest.raises(TypeError):
        s.forward_suffix(torch.randn(2, 2, 128, dtype=torch.float64))
    with pytest.raises(TypeError, match="adapter"):
        s.forward_suffix(torch.randn(2, 2, 128), adapter=3)
    with pytest.raises(ValueError, match="rows must lie in"):
        s.drop([2])
    with pytest.raises(ValueError, match="max_tokens"):
        s.step(0)
    s2 = engine.start(_prompts(6), max_new_tokens=4)  # closes s
    with pytest.raises(RuntimeError, match="closed"):
        s.step()
    s2.step(4)
    assert s2.all_rows[0].finish_reason == "length" and len(s2.all_rows[0].tokens) == 4
    s2.close()
    assert engine.cache.batch_size == 0 and engine.cache.num_free_blocks == engine.cache.num_blocks
    with pytest.raises(RuntimeError, match="closed"):
        s2.forward_suffix(torch.randn(0, 2, 128))
