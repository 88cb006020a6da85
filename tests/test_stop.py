"""StopScorer: scores equal a plain transformers + PEFT two-stage forward, the training forward
equals the engine's on sliding-window models, the engine path never changes decoding, checkpoints
round-trip in both layouts, the authors' layout loads and is written as their code reads it, bad
checkpoints fail clearly."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from stopkit.engine import Engine
from stopkit.stop import ASSESS_TOKEN, StopScorer

VOCAB = 128
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
LENGTHS = (1, 5, 16, 17, 40)  # around the 16-token cache blocks


def tiny_model(family: str = "llama", hidden: int = 64, heads: int = 2):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=96,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=0.2,
    )
    return model_cls(config).eval()


def randomise(scorer: StopScorer, scale: float = 1.0) -> StopScorer:
    """Non-trivial LoRA B (a new scorer's adapter is a no-op), token and head."""
    d = scorer.hidden_size
    with torch.no_grad():
        for lo in scorer.loras:
            lo.B.normal_(0.0, 0.3)
        scorer.token.normal_()
        for layer in (scorer.hidden, scorer.head):
            if layer is not None:
                layer.weight.normal_(0.0, scale / math.sqrt(layer.in_features))
                layer.bias.normal_(0.0, 0.5)
    assert d == scorer.token.numel()
    return scorer


def prefixes(lengths=LENGTHS) -> list[list[int]]:
    return [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]


def _cache_kwarg(module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def two_stage_reference(
    peft_model: PeftModel, token: torch.Tensor, num_tokens: int, head, prefix_list: list[list[int]]
) -> torch.Tensor:
    """The spec, one prefix at a time in plain transformers: prefix with the adapter disabled and
    use_cache; then the [STOP] embeddings as inputs_embeds with that cache at positions
    l..l+K-1 with the adapter on; last hidden state (after the final norm) -> head -> softmax[1].
    head: (weight, bias) or (hidden_weight, hidden_bias, activation, weight, bias)."""
    from transformers import DynamicCache

    peft_model.eval()
    lm = peft_model.get_base_model()
    backbone = getattr(lm, lm.base_model_prefix)
    kw = _cache_kwarg(backbone)
    out = []
    for p in prefix_list:
        cache = DynamicCache(config=lm.config)
        with peft_model.disable_adapter():
            backbone(input_ids=torch.tensor([p]), use_cache=True, **{kw: cache})
        L = len(p)
        h = backbone(
            inputs_embeds=token.reshape(1, 1, -1).expand(1, num_tokens, -1),
            position_ids=torch.arange(L, L + num_tokens)[None],
            use_cache=True,
            **{kw: cache},
        ).last_hidden_state[0, -1]
        if len(head) == 5:
            hw, hb, act, w, b = head
            h = getattr(F, act)(F.linear(h, hw, hb))
        else:
            w, b = head
        out.append(torch.softmax(F.linear(h, w, b), dim=-1)[1])
    return torch.stack(out)


def peft_twin(scorer: StopScorer) -> PeftModel:
    """A PEFT copy of the scorer's model with the spec's adapter (LoRA on q_proj and v_proj, alpha
    2 * rank) holding the scorer's factors, copied by module name (not through scorer.save)."""
    rank = scorer.loras[0].A.shape[0]
    twin = get_peft_model(
        copy.deepcopy(scorer.model),
        LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
        adapter_name="classifier",
    )
    targets = {name: m for name, m in twin.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert sorted(lo.path for lo in scorer.loras) == sorted(targets)
    with torch.no_grad():
        for lo in scorer.loras:
            targets[lo.path].lora_A["classifier"].weight.copy_(lo.A)
            targets[lo.path].lora_B["classifier"].weight.copy_(lo.B)
    return twin.eval()


def peft_from_save(scorer: StopScorer, tmp_path) -> PeftModel:
    """A copy of the scorer's model with the adapter scorer.save wrote, loaded by PEFT itself."""
    scorer.save(tmp_path / "ckpt")
    return PeftModel.from_pretrained(
        copy.deepcopy(scorer.model),
        tmp_path / "ckpt" / "adapter" / "classifier",
        adapter_name="classifier",
    )


def head_of(scorer: StopScorer) -> tuple:
    h = scorer.head.weight.detach(), scorer.head.bias.detach()
    if scorer.hidden is None:
        return h
    return (scorer.hidden.weight.detach(), scorer.hidden.bias.detach(), scorer.activation, *h)


# ---- equivalence --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scores_equal_transformers_two_stage_forward(family):
    model = tiny_model(family)
    scorer = randomise(StopScorer.new(model, lora_rank=8, seed=1))
    batch = prefixes()
    ref = two_stage_reference(
        peft_twin(scorer), scorer.token.detach(), scorer.num_tokens, head_of(scorer), batch
    )
    assert ref.std() > 0.05  # spread-out scores, not all ~0.5
    got = scorer.score(batch)  # paged cache + native kernels + fused norm/head
    assert got.dtype == torch.float32 and got.shape == (len(batch),)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the training forward (dense, right-padded batch) agrees with the unbatched reference
    with torch.no_grad():
        dense = torch.softmax(scorer(batch), dim=-1)[:, 1]
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    # and the adapter matters: without LoRA the scores move
    with torch.no_grad():
        for lo in scorer.loras:
            lo.B.zero_()
    assert (scorer.score(batch) - got).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2", "mistral", "llama"])
def test_training_forward_equals_engine_on_sliding_windows(family):
    """The batched training forward gives each row the score of the engine's suffix pass (paged
    cache, per-row windows), also for rows shorter than the batch's longest and than the window
    (8 on gpt-oss's, Mistral's and Qwen2's sliding layers), in float32."""
    from test_engine import _model

    model = _model(family)
    assert model.dtype == torch.float32
    window = getattr(model.config, "sliding_window", None)
    assert (window == 8) == (family != "llama")
    scorer = randomise(StopScorer.new(model, lora_rank=4, seed=1))
    batch = prefixes((3, 11, 20, 33))
    with torch.no_grad():
        dense = torch.softmax(scorer(batch), dim=-1)[:, 1]
    paged = scorer.score(batch)
    assert paged.std() > 0.05
    torch.testing.assert_close(dense, paged, atol=1e-5, rtol=1e-5)


def test_mlp_head_and_more_tokens():
    model = tiny_model()
    scorer = randomise(
        StopScorer.new(model, num_tokens=6, lora_rank=4, head_hidden=16, activation="silu", seed=2)
    )
    batch = prefixes((3, 33))
    ref = two_stage_reference(peft_twin(scorer), scorer.token.detach(), 6, head_of(scorer), batch)
    torch.testing.assert_close(scorer.score(batch), ref, atol=1e-5, rtol=1e-5)


def test_score_session_reads_without_writing():
    """Scoring live rows mid-decode gives the scores of their prefixes, and decoding resumes
    exactly as if they had never been scored."""
    model = tiny_model()
    scorer = randomise(StopScorer.new(model, lora_rank=8))
    engine = Engine(model)
    prompts = prefixes((7, 20))
    kw = dict(n=3, max_new_tokens=24, temperature=1.0, seed=5, eos_token_id=[])
    with engine.start(prompts, **kw) as session:
        session.step(10)
        live = [r.prompt + r.tokens for r in session.rows]
        scores = scorer.score_session(session)
        picked = scorer.score_session(session, rows=[4, 1])
        session.step(14)
        resumed = [r.tokens for r in session.all_rows]
    unscored = engine.generate(prompts, **kw)
    assert resumed == [t for per_prompt in unscored for t in per_prompt]
    torch.testing.assert_close(scores, scorer.score(live), atol=1e-5, rtol=1e-5)
    assert torch.equal(picked, scores[[4, 1]])


# ---- the base model is untouched ----------------------------------------------------------------
def test_scorer_does_not_change_decoding(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 9))
    gen = dict(do_sample=False, max_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, **gen)
    modules = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    scorer = randomise(StopScorer.new(model, lora_rank=8))
    scorer.score(prefixes((4, 18)))
    scorer.save(tmp_path / "s")
    StopScorer.load(tmp_path / "s", model).score(prefixes((6,)))

    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # bit-identical
    assert torch.equal(model.generate(ids, **gen), tokens)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(n.startswith("_model") for n, _ in scorer.named_parameters())


def test_new_is_seeded_and_leaves_global_rng():
    model = tiny_model()
    token_id = 7
    before = torch.get_rng_state()
    a = StopScorer.new(model, lora_rank=4, seed=3, token_id=token_id)
    assert torch.equal(torch.get_rng_state(), before)
    b = StopScorer.new(model, lora_rank=4, seed=3, token_id=token_id)
    c = StopScorer.new(model, lora_rank=4, seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.loras[0].A, c.loras[0].A)
    assert torch.equal(a.token, model.get_input_embeddings().weight[token_id])
    torch.testing.assert_close(c.token, model.get_input_embeddings().weight.mean(0))
    assert all(torch.count_nonzero(lo.B) == 0 for lo in a.loras)  # a new adapter is a no-op
    assert len(a.loras) == 2 * model.config.num_hidden_layers  # q_proj and v_proj of each layer
    assert a.lora_alpha == 8 and a.loras[0].scaling == 2.0


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("head_hidden", [None, 12])
def test_save_load_round_trip(tmp_path, head_hidden):
    model = tiny_model()
    scorer = randomise(
        StopScorer.new(
            model,
            num_tokens=3,
            lora_rank=8,
            head_hidden=head_hidden,
            activation="tanh",
            seed=5,
            lora_dropout=0.125,
        )
    )
    scorer.save(tmp_path / "s")
    loaded = StopScorer.load(tmp_path / "s", model)
    assert loaded.num_tokens == 3 and loaded.activation == "tanh"
    # training settings that do not change a score in eval mode survive the round trip too
    written = json.loads((tmp_path / "s/adapter/classifier/adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (8, 16, 0.125)
    assert sorted(written["target_modules"]) == ["q_proj", "v_proj"]
    assert (loaded.lora_dropout, loaded.lora_alpha) == (0.125, 16)
    assert scorer.state_dict().keys() == loaded.state_dict().keys()
    for (name, x), y in zip(scorer.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    batch = prefixes((2, 19, 31))
    assert torch.equal(loaded.score(batch), scorer.score(batch))
    # what save wrote is the adapter for PEFT too
    ref = two_stage_reference(
        peft_from_save(scorer, tmp_path), scorer.token.detach(), 3, head_of(scorer), batch
    )
    torch.testing.assert_close(scorer.score(batch), ref, atol=1e-5, rtol=1e-5)
    # saving the loaded scorer writes the same adapter
    loaded.save(tmp_path / "t")
    again = StopScorer.load(tmp_path / "t", model)
    assert torch.equal(again.score(batch), scorer.score(batch))


@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_loads_a_handwritten_checkpoint(tmp_path, variant):
    """stopkit's layout written by hand, as the module docstring lays it out (a PEFT adapter saved
    by PEFT; the config in json, the token and head in safetensors), loads into a scorer that
    scores as the two-stage reference on that PEFT model. "rslora": rsLoRA scaling (alpha /
    sqrt(r)), a per-module rank (rank_pattern) and an MLP head."""
    model = tiny_model()
    d, rslora = model.config.hidden_size, variant == "rslora"
    extra = (
        dict(use_rslora=True, rank_pattern={"model.layers.1.self_attn.v_proj": 4}) if rslora else {}
    )
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], **extra
        ),
        adapter_name="classifier",
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    k = 12 if rslora else d  # the head's input
    tensors = {
        "token": torch.randn(d),
        "head.weight": torch.randn(2, k) / math.sqrt(k),
        "head.bias": torch.randn(2) * 0.5,
    }
    if rslora:
        tensors.update(
            {
                "hidden.weight": torch.randn(k, d) * 2 / math.sqrt(d),
                "hidden.bias": torch.randn(k) * 0.5,
            }
        )
    save_file(tensors, str(tmp_path / "stop.safetensors"))
    (tmp_path / "stop_config.json").write_text(
        json.dumps(
            {
                "format": "stopkit.stop",
                "version": 1,
                "hidden_size": d,
                "num_tokens": 3,
                "head_hidden": k if rslora else None,
                "activation": "tanh",
                "adapter": "adapter/classifier",
            }
        )
    )

    scorer = StopScorer.load(tmp_path, model)
    batch = prefixes((4, 17, 30))
    head = (tensors["head.weight"], tensors["head.bias"])
    if rslora:
        head = (tensors["hidden.weight"], tensors["hidden.bias"], "tanh", *head)
    ref = two_stage_reference(peft_model, tensors["token"], 3, head, batch)
    assert ref.std() > 0.02  # scores that differ between prefixes
    torch.testing.assert_close(scorer.score(batch), ref, atol=1e-5, rtol=1e-5)


def write_authors_checkpoint(path, model, *, num_tokens=3, rank=8, hidden=None, bin_weights=True):
    """The authors' released layout, built with PEFT and torch.save. Returns (peft model, token,
    head weight, head bias)."""
    d = hidden or model.config.hidden_size
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
        ),
        adapter_name="classifier",
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(str(path / "adapter"), safe_serialization=not bin_weights)
    token = torch.randn(d)
    weight, bias = torch.randn(2, d) / math.sqrt(d), torch.randn(2) * 0.5
    torch.save({"weight": weight, "bias": bias}, path / "classifier_head.pth")
    torch.save(
        {
            "input_embedding": token,
            "output_embedding": None,
            "assess_token": "<|assess|>",
            "special_token_id": VOCAB,
        },
        path / "assess_token_embedding.pth",
    )
    (path / "assess_token_config.json").write_text(
        json.dumps(
            {
                "assess_token": "<|assess|>",
                "special_token_id": VOCAB,
                "num_assess_tokens": num_tokens,
                "tokenizer_dir": "/authors/machine/tokenizer",
                "embedding_path": "/authors/machine/assess_token_embedding.pth",
            }
        )
    )
    return peft_model, token, weight, bias


@pytest.mark.parametrize("bin_weights", [True, False])
def test_loads_authors_layout(tmp_path, bin_weights):
    model = tiny_model()
    peft_model, token, weight, bias = write_authors_checkpoint(
        tmp_path, model, bin_weights=bin_weights
    )
    expected = "adapter_model.bin" if bin_weights else "adapter_model.safetensors"
    assert (tmp_path / "adapter" / "classifier" / expected).is_file()
    scorer = StopScorer.load(tmp_path, model)
    assert scorer.num_tokens == 3 and len(scorer.loras) == 4
    batch = prefixes((5, 23))
    ref = two_stage_reference(peft_model, token, 3, (weight, bias), batch)
    torch.testing.assert_close(scorer.score(batch), ref, atol=1e-5, rtol=1e-5)


def test_save_in_authors_layout(tmp_path, caplog):
    """save(layout="authors") writes the files as the authors' trainer does and their loader reads
    them: a PEFT adapter "classifier", a Linear state dict, the [STOP] vector under the assess
    token, its id in the saved tokenizer. What the files hold, read with PEFT and torch alone,
    scores the prefixes as the scorer does, and StopScorer.load reads the scorer back exactly."""
    from test_train import word_tokenizer
    from transformers import AutoTokenizer

    model = tiny_model()
    d = model.config.hidden_size
    scorer = randomise(StopScorer.new(model, num_tokens=3, lora_rank=8, seed=4))
    tokenizer = word_tokenizer()
    vocab = dict(tokenizer.get_vocab())
    path = tmp_path / "authors"
    scorer.save(path, layout="stopkit")  # an earlier checkpoint in the other layout
    scorer.save(path, layout="authors", tokenizer=tokenizer)
    assert not (path / "stop_config.json").exists() and not (path / "stop.safetensors").exists()
    assert tokenizer.get_vocab() == vocab  # the caller's tokenizer is left as it was

    config = json.loads((path / "assess_token_config.json").read_text())
    saved_tokenizer = AutoTokenizer.from_pretrained(path / config["tokenizer_dir"])
    token_id = saved_tokenizer.convert_tokens_to_ids(ASSESS_TOKEN)
    assert token_id == len(vocab)  # added, as their trainer adds it
    assert config == {
        "assess_token": ASSESS_TOKEN,
        "special_token_id": token_id,
        "num_assess_tokens": 3,
        "tokenizer_dir": "tokenizer",
        "embedding_path": "assess_token_embedding.pth",
    }
    emb = torch.load(path / config["embedding_path"], weights_only=True)
    assert emb.keys() == {"assess_token", "special_token_id", "input_embedding", "output_embedding"}
    assert emb["assess_token"] == ASSESS_TOKEN and emb["special_token_id"] == token_id
    assert emb["output_embedding"] is None
    assert emb["input_embedding"].shape == (d,) and emb["input_embedding"].dtype == model.dtype
    head = torch.nn.Linear(d, 2)
    state = torch.load(path / "classifier_head.pth", weights_only=True)
    assert state.keys() == {"weight", "bias"} and state["weight"].dtype == model.dtype
    head.load_state_dict(state)  # strict: keys and shapes of their Linear(d, 2)
    adapter = json.loads((path / "adapter" / "classifier" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "CAUSAL_LM"
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]

    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(model), path / "adapter" / "classifier", adapter_name="classifier"
    )
    assert sum("lora_A.classifier" in n for n, _ in peft_model.named_parameters()) == 4
    batch = prefixes((4, 18, 33))
    ref = two_stage_reference(
        peft_model,
        emb["input_embedding"],
        config["num_assess_tokens"],
        (head.weight.detach(), head.bias.detach()),
        batch,
    )
    got = scorer.score(batch)
    assert ref.std() > 0.05
    torch.testing.assert_close(ref, got, atol=1e-5, rtol=1e-5)
    loaded = StopScorer.load(path, model)
    assert loaded.num_tokens == 3
    for (name, x), y in zip(scorer.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(loaded.score(batch), got)

    # without a tokenizer: no token id (-1, as their code's default), a warning
    with caplog.at_level(logging.WARNING, logger="stopkit.stop"):
        scorer.save(tmp_path / "bare", layout="authors")
    assert "without a tokenizer" in caplog.text
    bare = json.loads((tmp_path / "bare" / "assess_token_config.json").read_text())
    assert bare["special_token_id"] == -1 and bare["tokenizer_dir"] is None
    assert not (tmp_path / "bare" / "tokenizer").exists()
    # and back to stopkit's layout in the same folder
    scorer.save(path)
    assert not (path / "classifier_head.pth").exists() and (path / "stop_config.json").is_file()
    assert torch.equal(StopScorer.load(path, model).score(batch), got)


def test_authors_layout_in_the_model_dtype(tmp_path):
    """Head and [STOP] vector in the model's dtype (their trainer's), the adapter in float32."""
    model = tiny_model().to(torch.bfloat16)
    scorer = randomise(StopScorer.new(model, lora_rank=4, seed=2))
    scorer.save(tmp_path, layout="authors")
    head = torch.load(tmp_path / "classifier_head.pth", weights_only=True)
    emb = torch.load(tmp_path / "assess_token_embedding.pth", weights_only=True)
    assert (
        head["weight"].dtype == head["bias"].dtype == emb["input_embedding"].dtype == torch.bfloat16
    )
    loaded = StopScorer.load(tmp_path, model)
    assert torch.equal(loaded.head.weight, scorer.head.weight.to(torch.bfloat16).float())
    assert torch.equal(loaded.token, scorer.token.to(torch.bfloat16).float())
    for a, b in zip(scorer.loras, loaded.loras, strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_authors_layout_refuses_a_hidden_layer(tmp_path):
    model = tiny_model()
    scorer = StopScorer.new(model, lora_rank=4, head_hidden=8)
    with pytest.raises(
        ValueError, match=r"Linear\(d, 2\) head only.*head_hidden=8.*stopkit layout"
    ):
        scorer.save(tmp_path, layout="authors")
    assert not any(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="layout must be one of stopkit, authors, got 'peft'"):
        scorer.save(tmp_path, layout="peft")


# ---- bad checkpoints and arguments ---------------------------------------------------------------
def test_hidden_size_mismatch(tmp_path):
    small, large = tiny_model(hidden=64), tiny_model(hidden=96, heads=3)
    StopScorer.new(small, lora_rank=4).save(tmp_path / "own")
    with pytest.raises(ValueError, match=r"hidden size 64.*hidden size is 96"):
        StopScorer.load(tmp_path / "own", large)
    (tmp_path / "authors").mkdir()
    write_authors_checkpoint(tmp_path / "authors", small)
    with pytest.raises(ValueError, match=r"hidden size 64.*hidden size is 96"):
        StopScorer.load(tmp_path / "authors", large)


@pytest.mark.parametrize(
    "layout,missing,listed",
    [
        ("own", "stop.safetensors", "stop_config.json"),
        ("own", "adapter/classifier/adapter_model.safetensors", "stop.safetensors"),
        ("authors", "classifier_head.pth", "assess_token_config.json"),
        ("authors", "assess_token_embedding.pth", "classifier_head.pth"),
        ("authors", "adapter/classifier/adapter_config.json", "assess_token_embedding.pth"),
    ],
)
def test_missing_file_lists_layout(tmp_path, layout, missing, listed):
    model = tiny_model()
    if layout == "own":
        StopScorer.new(model, lora_rank=4).save(tmp_path)
    else:
        write_authors_checkpoint(tmp_path, model, bin_weights=False)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError) as err:
        StopScorer.load(tmp_path, model)
    assert missing.split("/")[-1] in str(err.value) and listed in str(err.value)


def test_not_a_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match=r"stop_config\.json.*assess_token_config\.json"):
        StopScorer.load(tmp_path, model)  # empty directory
    with pytest.raises(FileNotFoundError, match="no StopScorer checkpoint directory"):
        StopScorer.load(tmp_path / "nowhere", model)


def test_unsupported_adapter_variant(tmp_path):
    model = tiny_model()
    StopScorer.new(model, lora_rank=4).save(tmp_path)
    cfg_file = tmp_path / "adapter" / "classifier" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["use_dora"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        StopScorer.load(tmp_path, model)


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_tokens"):
        StopScorer.new(model, num_tokens=0)
    with pytest.raises(ValueError, match="num_tokens"):
        StopScorer.new(model, num_tokens=17)
    with pytest.raises(ValueError, match="lora_rank"):
        StopScorer.new(model, lora_rank=0)
    with pytest.raises(ValueError, match=r"match no nn\.Linear"):
        StopScorer.new(model, targets=("q_proj", "nope"))
    with pytest.raises(ValueError, match="token_id"):
        StopScorer.new(model, token_id=VOCAB)
    with pytest.raises(ValueError, match="activation"):
        StopScorer.new(model, activation="swish")
    scorer = StopScorer.new(model, lora_rank=4)
    with pytest.raises(TypeError, match="prefixes"):
        scorer.score([])
    with pytest.raises(ValueError, match=r"prefixes\[1\]"):
        scorer.score([[1, 2], []])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        scorer.score([[1, VOCAB]])
