"""Type II scoring (stopkit.verifier): tiny random classifiers and process reward models built from
configs, their batched scores against a plain forward of one unpadded text at a time, truncation,
token accounting and the errors for checkpoints that are not verifiers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from stopkit.toy.task import generate
from stopkit.toy.tokenizer import build_tokenizer
from stopkit.verifier import QWEN_PRM_SYSTEM, Verifier

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MARKER = "<extra_0>"
# a space before the content: a byte-level BPE ties it to the first word ("Ġcareful"), so the
# solution must be tokenised together with the template around it
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=1024,
    initializer_range=0.2,
)


def tokenizer(marker: bool = False):
    """The toy task's word-level tokenizer, optionally with the step marker as a special token."""
    tok = build_tokenizer()
    if marker:
        tok.add_special_tokens({"additional_special_tokens": [MARKER]})
    return tok


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 / Qwen style) trained on toy texts, with the marker and CHAT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [p.question + " " + p.sample_solution(rng) for p in generate(200, seed=0)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>", MARKER],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[MARKER],
    )
    tok.chat_template = CHAT
    return tok


def save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny checkpoints by name."""
    from transformers import (
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
        Qwen2Model,
    )

    torch.manual_seed(20260)
    out = {}
    root = tmp_path_factory.mktemp("verifiers")
    plain, marked = tokenizer(), tokenizer(marker=True)

    def llama(**kw):
        return LlamaConfig(vocab_size=len(plain), pad_token_id=plain.pad_token_id, **TINY, **kw)

    out["cls2"] = save(LlamaForSequenceClassification(llama(num_labels=2)), plain, root / "cls2")
    out["cls1"] = save(LlamaForSequenceClassification(llama(num_labels=1)), plain, root / "cls1")
    out["cls3"] = save(LlamaForSequenceClassification(llama(num_labels=3)), plain, root / "cls3")
    bpe = bpe_tokenizer()
    out["chat"] = save(
        Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(bpe), **TINY)), bpe, root / "chat"
    )  # no pad id in its config
    out["token_prm"] = save(
        LlamaForTokenClassification(
            LlamaConfig(vocab_size=len(marked), pad_token_id=marked.pad_token_id, **TINY)
        ),
        marked,
        root / "token_prm",
    )
    out["token_prm_nomarker"] = save(
        LlamaForTokenClassification(llama()), plain, root / "token_prm_nomarker"
    )
    out["causal"] = save(LlamaForCausalLM(llama()), plain, root / "causal")
    out["bert"] = save(
        BertModel(
            BertConfig(
                vocab_size=len(plain),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            )
        ),
        plain,
        root / "bert",
    )
    # a causal LM whose config claims a classifier: the head weights are missing
    headless = root / "headless"
    save(LlamaForCausalLM(llama()), plain, headless)
    cfg = json.loads((headless / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (headless / "config.json").write_text(json.dumps(cfg))
    out["headless"] = headless
    # Qwen2.5-Math-PRM's layout: Qwen2Model under model., a 2-layer head under score., remote code
    qwen = Qwen2Config(vocab_size=len(bpe), pad_token_id=bpe.pad_token_id, **TINY)
    backbone = Qwen2Model(qwen)
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    qwen_prm = root / "qwen_prm"
    qwen_prm.mkdir()
    save_file(state, qwen_prm / "model.safetensors")
    cfg = qwen.to_dict()
    cfg.update(
        architectures=["Qwen2ForProcessRewardModel"],
        auto_map={
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
        },
    )
    (qwen_prm / "config.json").write_text(json.dumps(cfg))
    bpe.save_pretrained(qwen_prm)
    out["qwen_prm"] = qwen_prm
    out["qwen_prm_parts"] = (backbone.eval(), head.eval())
    return out


def problems(n: int, seed: int) -> tuple[str, list[str]]:
    """A toy question and n partial solutions of mixed lengths, steps separated by blank lines."""
    rng = random.Random(seed)
    p = generate(1, seed)[0]
    sols = []
    for _ in range(n):
        words = p.sample_solution(rng).replace(" #", "\n\n#").split(" ")
        sols.append(" ".join(words[: rng.randint(0, len(words))]))
    return p.question, sols


def forward_one(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def prm_steps(solution: str) -> list[str]:
    return [s.strip() for s in solution.split("\n\n") if s.strip()]


# ---- sequence classifiers -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, batch_size", [("cls2", 3), ("cls1", 8), ("cls2", 1)])
def test_classifier_scores_match_unpadded_forward(models, name, batch_size, device):
    from transformers import AutoModelForSequenceClassification

    v = Verifier.load(models[name], device=device, dtype="float32", batch_size=batch_size)
    assert (v.kind, v.method_type, v.chat, v.name) == (
        "classifier",
        "II",
        False,
        f"verifier:{models[name]}",
    )
    question, sols = problems(7, seed=3)
    scores = v.score(question, sols, [[1]] * 7)
    ref_model = AutoModelForSequenceClassification.from_pretrained(models[name]).eval()
    tok = build_tokenizer()
    ref = []
    for s in sols:
        ids = tok(question, s)["input_ids"]  # the tokenizer's own pair encoding: <s> q s
        logits = forward_one(ref_model, ids)
        ref.append(torch.sigmoid(logits[0]) if name == "cls1" else torch.softmax(logits, -1)[1])
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)
    assert v.tokens == sum(len(tok(question, s)["input_ids"]) for s in sols)


def test_positive_label_and_chat_template_classifier(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    question, sols = problems(5, seed=8)
    v = Verifier.load(models["chat"], batch_size=4)
    assert v.chat and v.model.config.pad_token_id == bpe_tokenizer().pad_token_id
    scores = v.score(question, sols)
    ref_model = AutoModelForSequenceClassification.from_pretrained(models["chat"]).eval()
    tok = AutoTokenizer.from_pretrained(models["chat"])
    ref = []
    for s in sols:
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": s}],
            tokenize=False,
        )
        ref.append(
            torch.softmax(
                forward_one(ref_model, tok(text, add_special_tokens=False)["input_ids"]), -1
            )[1]
        )
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)
    flipped = Verifier.load(models["chat"], positive_label=0).score(question, sols)
    torch.testing.assert_close(
        torch.tensor(flipped), 1 - torch.tensor(scores), rtol=1e-4, atol=1e-5
    )
    plain = Verifier.load(models["chat"], chat=False)
    assert (
        not plain.chat and plain.encode(question, sols[0])[0] == tok(question, sols[0])["input_ids"]
    )


def test_classifier_truncates_the_solution_from_the_left(models):
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer()
    question, sols = problems(6, seed=4)
    q_len = len(tok(question)["input_ids"])
    max_length = q_len + 6
    v = Verifier.load(models["cls2"], max_length=max_length, batch_size=4)
    scores = v.score(question, sols)
    ref_model = AutoModelForSequenceClassification.from_pretrained(models["cls2"]).eval()
    ref, tokens = [], 0
    for s in sols:
        body = tok(s, add_special_tokens=False)["input_ids"]
        ids = tok(question)["input_ids"] + body[max(0, len(body) - 6) :]  # the question stays whole
        tokens += len(ids)
        ref.append(torch.softmax(forward_one(ref_model, ids), -1)[1])
    assert any(len(tok(s, add_special_tokens=False)["input_ids"]) > 6 for s in sols)
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)
    assert v.tokens == tokens
    short = Verifier.load(models["cls2"], max_length=q_len)
    with pytest.raises(ValueError, match="leaving no room for the solution within max_length"):
        short.score(question, ["careful #1 3"])


def test_classifier_without_any_pad_token_runs_one_sequence_per_forward(models, caplog):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(models["cls2"]).eval()
    model.config.pad_token_id = None
    tok = build_tokenizer()
    tok.pad_token = None
    v = Verifier(model, tok, kind="classifier", batch_size=8)
    assert v.batch_size == 1 and "one sequence per forward" in caplog.text
    question, sols = problems(3, seed=5)
    ref = [
        torch.softmax(forward_one(model, build_tokenizer()(question, s)["input_ids"]), -1)[1]
        for s in sols
    ]
    torch.testing.assert_close(
        torch.tensor(v.score(question, sols)), torch.stack(ref), rtol=1e-4, atol=1e-5
    )


def test_dtype_and_seconds(models):
    v32 = Verifier.load(models["cls2"], dtype="float32")
    v16 = Verifier.load(models["cls2"], dtype="bfloat16")
    assert next(v16.model.parameters()).dtype == torch.bfloat16
    question, sols = problems(4, seed=6)
    a, b = v32.score(question, sols), v16.score(question, sols)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=3e-2)
    first = v32.seconds
    v32.score(question, sols)
    assert 0 < first < v32.seconds


# ---- process reward models ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_token_classification_prm_reads_the_last_marker(models, device):
    from transformers import AutoModelForTokenClassification

    v = Verifier.load(models["token_prm"], device=device, batch_size=3)
    assert (v.kind, v.step_marker, v.chat) == ("prm", MARKER, False)
    question, sols = problems(7, seed=9)
    scores = v.score(question, sols)
    ref_model = AutoModelForTokenClassification.from_pretrained(models["token_prm"]).eval()
    tok = tokenizer(marker=True)
    marker_id = tok.convert_tokens_to_ids(MARKER)
    ref, tokens = [], 0
    for s in sols:
        text = " ".join([question] + [f"{step} {MARKER}" for step in prm_steps(s)] or [MARKER])
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        tokens += len(ids)
        at = max(i for i, t in enumerate(ids) if t == marker_id)
        ref.append(torch.softmax(forward_one(ref_model, ids)[at], -1)[1])
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)
    assert v.tokens == tokens


def test_prm_truncation_keeps_the_question_and_the_last_marker(models):
    from transformers import AutoModelForTokenClassification

    tok = tokenizer(marker=True)
    question, sols = problems(5, seed=12)
    head = [tok.bos_token_id] + tok(question, add_special_tokens=False)["input_ids"]
    v = Verifier.load(models["token_prm"], max_length=len(head) + 5)
    scores = v.score(question, sols)
    ref_model = AutoModelForTokenClassification.from_pretrained(models["token_prm"]).eval()
    ref = []
    for s in sols:
        body = tok(
            " ".join(f"{step} {MARKER}" for step in prm_steps(s)) or MARKER,
            add_special_tokens=False,
        )["input_ids"]
        ids = head + body[-5:]
        assert ids[-1] == tok.convert_tokens_to_ids(MARKER)
        ref.append(torch.softmax(forward_one(ref_model, ids)[-1], -1)[1])
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)


def test_custom_step_marker(models):
    v = Verifier.load(models["token_prm_nomarker"], step_marker="?", step_separator="\n\n")
    ids, at = v.encode("1 + 2", "careful #1 1 + 2 = 3\n\n#2 3 * 2 = 6")
    q = build_tokenizer()
    mark = q.convert_tokens_to_ids("?")
    assert ids == q("1 + 2 careful #1 1 + 2 = 3 ? #2 3 * 2 = 6 ?")["input_ids"]
    assert at == len(ids) - 1 and ids[at] == mark


def test_qwen_math_prm_layout_loads_without_remote_code(models):
    from transformers import AutoTokenizer

    backbone, head = models["qwen_prm_parts"]
    v = Verifier.load(models["qwen_prm"], batch_size=4)
    assert (v.kind, v.chat, v.system_prompt, v.step_marker) == (
        "prm",
        True,
        QWEN_PRM_SYSTEM,
        MARKER,
    )
    question, sols = problems(6, seed=13)
    scores = v.score(question, sols)
    tok = AutoTokenizer.from_pretrained(models["qwen_prm"])
    marker_id = tok.convert_tokens_to_ids(MARKER)
    ref = []
    for s in sols:  # as Qwen2.5-Math-PRM's model card builds its input
        messages = [
            {"role": "system", "content": QWEN_PRM_SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": MARKER.join(prm_steps(s)) + MARKER},
        ]
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        with torch.no_grad():
            logits = head(backbone(input_ids=torch.tensor([ids])).last_hidden_state[0])
        at = max(i for i, t in enumerate(ids) if t == marker_id)
        ref.append(torch.softmax(logits[at], -1)[1])
    torch.testing.assert_close(torch.tensor(scores), torch.stack(ref), rtol=1e-4, atol=1e-5)


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, message",
    [
        (
            "causal",
            r"is LlamaForCausalLM \(model_type 'llama'\), not a classifier or reward model; supported",
        ),
        (
            "bert",
            r"is BertModel \(model_type 'bert'\), not a classifier or reward model; supported",
        ),
        ("headless", r"lacks 1 weight\(s\) of LlamaForSequenceClassification \(score.weight\)"),
        ("cls3", r"needs num_labels in \(1, 2\), the model has 3"),
        ("token_prm_nomarker", r"needs step_marker"),
    ],
)
def test_not_a_verifier_is_a_clear_error(models, name, message):
    with pytest.raises(ValueError, match=message):
        Verifier.load(models[name])


def test_missing_local_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no verifier model at"):
        Verifier.load(tmp_path / "missing")


def test_remote_code_only_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "my_custom_rm",
                "architectures": ["MyCustomRewardModel"],
                "auto_map": {
                    "AutoConfig": "configuration_custom.MyConfig",
                    "AutoModel": "modeling_custom.MyCustomRewardModel",
                },
            }
        )
    )
    with pytest.raises(ValueError, match=r"cannot read its config without remote code.*supported"):
        Verifier.load(tmp_path)


def test_argument_errors(models):
    with pytest.raises(ValueError, match="step_marker '<step>' must encode to known tokens"):
        Verifier.load(models["token_prm_nomarker"], step_marker="<step>")
    with pytest.raises(ValueError, match="chat=True but the tokenizer has no chat template"):
        Verifier.load(models["cls2"], chat=True)
    with pytest.raises(ValueError, match=r"positive_label must be an int in \[0, 1\], got 2"):
        Verifier.load(models["cls2"], positive_label=2)
    with pytest.raises(ValueError, match="dtype must be"):
        Verifier.load(models["cls2"], dtype="fp8")
    with pytest.raises(TypeError, match="question must be a str"):
        Verifier.load(models["cls2"]).score([1, 2], ["x"])
