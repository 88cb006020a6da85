"""Answer checking, metrics, label files (the authors' keys, the difficulty filter), training (the
soft-label cross-entropy against a hand computation; lowers validation MSE; gradient
accumulation; frozen base model) and the train command."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stopkit.answers import (
    answers_equal,
    check_answer,
    extract_answer,
    load_checker,
    normalize_answer,
)
from stopkit.cli import build_parser, main
from stopkit.label import label_statistics
from stopkit.stop import StopScorer
from stopkit.train import (
    auroc,
    check_records,
    evaluate_scorer,
    load_labels,
    metrics,
    pair_accuracy,
    split_by_problem,
    train_scorer,
)

STOP_TOKEN = "[STOP]"


def word_tokenizer(eos_token: str | None = None):
    """A word-level tokenizer: specials (with a spare [STOP]), a few words, the numbers 0..99; no
    EOS token unless given (the tiny models have none either)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        STOP_TOKEN,
        "+",
        "-",
        "*",
        "=",
        "?",
        "mod",
        "answer:",
        *map(str, range(100)),
    )
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos_token,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[STOP_TOKEN],
    )


TOKENIZER = word_tokenizer()
VOCAB = len(TOKENIZER)
QUESTIONS = ["3 + 4 mod 97 ?", "5 * 6 - 2 mod 97 ?", "7 - 9 mod 13 ?"]


def tiny_model(vocab: int = VOCAB) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=96,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


# ---- answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{x^{2}}} end", r"\sqrt{x^{2}}"),  # last box, nested braces
        (r"\boxed{3} and a cut \boxed{4", "3"),  # unbalanced last box skipped
        ("17 * 7 = 22 , answer: 20", "20"),
        ("**Final Answer:** 42.", "42"),
        ("Thus the final answer is $-3$.\nDone", "-3"),  # the math span, without its dollars
        ("no answer at all", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("1,000", "1000", True),
        ("+5", "5", True),
        ("5.0", "5", True),
        ("0.50", r"\frac{1}{2}", True),
        ("2/4", r"\dfrac{1}{2}", True),
        (r"-\frac{3}{6}", "-1/2", True),
        ("x = 7", "7", True),
        (r"\text{(B)}", "B", True),
        ("$12$", "12", True),
        ("1/3", "0.333", False),
        ("12", "21", False),
        (r"\sqrt{2}", r"\sqrt{ 2 }", True),
        ("1,2", "12", False),
        ("1/0", "1/0", True),
    ],
)
def test_answers_equal(a, b, equal):
    assert answers_equal(a, b) is equal
    assert (normalize_answer(a) == normalize_answer(b)) is equal


def test_check_answer_and_checkers():
    assert check_answer(r"... \boxed{0.5}", "1/2")
    assert not check_answer("answer: 3", "4")
    assert not check_answer("nothing here", "4")
    assert load_checker(None) is check_answer
    assert load_checker("stopkit.answers:check_answer") is check_answer
    with pytest.raises(ValueError, match="module:function"):
        load_checker("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_checker("stopkit.answers:nope")
    with pytest.raises(TypeError):
        check_answer(3, "3")


# ---- metrics -------------------------------------------------------------------------------------
def test_auroc_matches_pairwise_definition():
    scores = torch.randint(0, 6, (40,)).double() / 5  # many ties
    targets = torch.rand(40) < 0.4
    pos, neg = scores[targets], scores[~targets]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos.tolist(), neg.tolist())]
    assert auroc(scores, targets) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auroc([0.9, 0.2], [0, 1]) == 0.0
    assert auroc([0.3, 0.4], [1, 1]) != auroc([0.3, 0.4], [1, 1])  # NaN: one class only


def test_metrics():
    m = metrics([0.9, 0.2, 0.6, 0.4], [1.0, 0.0, 0.25, 0.75])
    assert m["mse"] == pytest.approx((0.01 + 0.04 + 0.1225 + 0.1225) / 4)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(0.75)  # positives {0.9, 0.4} vs negatives {0.2, 0.6}
    assert "pair_accuracy" not in m


def test_pair_accuracy_counts_only_pairs_within_a_problem():
    torch.manual_seed(1)
    scores, labels = torch.rand(30), torch.rand(30)
    groups = [i % 4 for i in range(30)]
    want = []
    for i, j in itertools.permutations(range(30), 2):
        if groups[i] == groups[j] and labels[i] - labels[j] > 0.25:
            want.append(float(scores[i] > scores[j]) + 0.5 * float(scores[i] == scores[j]))
    assert pair_accuracy(scores, labels, groups) == pytest.approx(sum(want) / len(want), abs=1e-12)
    # across problems nothing counts, however well or badly the scores order them
    assert pair_accuracy([0.9, 0.1], [0.0, 1.0], ["a", "b"]) != pair_accuracy(
        [0.9, 0.1], [0.0, 1.0], ["a", "b"]
    )
    assert pair_accuracy([0.9, 0.1, 0.5], [1.0, 0.0, 0.5], ["a", "a", "b"]) == 1.0
    assert pair_accuracy([0.3, 0.3], [1.0, 0.0], ["a", "a"]) == 0.5
    assert metrics([0.2, 0.8], [0.0, 1.0], ["a", "a"])["pair_accuracy"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        pair_accuracy([0.1, 0.2], [0.1, 0.2], ["a"])


# ---- label files ---------------------------------------------------------------------------------
def test_load_labels_and_bad_labels(tmp_path):
    good = [
        {"id": "a", "prefix_token_ids": [1, 2, 3], "soft_label": 0.25},
        {"prefix_token_ids": [4], "soft_label": 1},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "\n")
    records = load_labels(path)
    assert [r["id"] for r in records] == ["a", 2] and records[1]["soft_label"] == 1.0
    for bad, got in (
        (1.5, r" in \[0, 1\], got 1.5"),
        (-0.1, r" in \[0, 1\], got -0.1"),
        (float("nan"), r" in \[0, 1\], got nan"),
        ("0.5", ", got str"),
        (None, ", got NoneType"),
    ):
        path.write_text(
            json.dumps(good[0]) + "\n" + json.dumps(dict(good[1], soft_label=bad)) + "\n"
        )
        with pytest.raises(
            ValueError, match=r"labels.jsonl:2: soft_label must be a real number" + got
        ):
            load_labels(path)
    path.write_text(json.dumps({"prefix_token_ids": [], "soft_label": 0.5}) + "\n")
    with pytest.raises(ValueError, match="prefix_token_ids"):
        load_labels(path)
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing.jsonl")


AUTHORS_LABEL_KEYS = ("Soft_label", "soft_label", "good_probability", "label_prob", "score")


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_load_labels_reads_the_authors_keys(tmp_path):
    """Each of the authors' label keys; with several, the first in their trainer's order wins."""
    path = tmp_path / "labels.jsonl"
    recs = [
        {"problem_id": "q", "prefix_token_ids": [1, 2], key: 0.1 * (k + 1)}
        for k, key in enumerate(AUTHORS_LABEL_KEYS)
    ]
    recs += [
        {
            "prefix_token_ids": [3],
            **{key: 0.1 * (k + 1) for k, key in enumerate(AUTHORS_LABEL_KEYS) if k >= first},
        }
        for first in range(5)
    ]
    write_jsonl(path, recs)
    records = load_labels(path)
    assert [r["soft_label"] for r in records] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5] * 2)
    assert [r["id"] for r in records] == ["q"] * 5 + [6, 7, 8, 9, 10]
    assert check_records(recs, VOCAB, "recs") == [
        dict(r, id=r["id"] if i < 5 else i) for i, r in enumerate(records)
    ]

    write_jsonl(path, [recs[0], {"id": 3, "prefix_token_ids": [1], "label": 1}])
    with pytest.raises(
        ValueError,
        match=r"labels.jsonl:2: no label: the record has keys \['id', "
        r"'label', 'prefix_token_ids'\], accepted one of Soft_label, soft_label, "
        r"good_probability, label_prob, score$",
    ):
        load_labels(path)
    write_jsonl(path, [{"input_ids": [1, 2], "soft_label": 0.5}])
    with pytest.raises(
        ValueError,
        match=r"labels.jsonl:1: no prefix ids: the record has keys "
        r"\['input_ids', 'soft_label'\], accepted prefix_token_ids$",
    ):
        load_labels(path)
    write_jsonl(path, [{"prefix_token_ids": [1], "score": 2}])
    with pytest.raises(
        ValueError, match=r"labels.jsonl:1: score must be a real number in \[0, 1\], got 2.0"
    ):
        load_labels(path)
    with pytest.raises(ValueError, match=r"train\[0\]: no label"):
        check_records([{"prefix_token_ids": [1]}], VOCAB, "train")


# problems a and b: all 0 / all 1 (dropped); c: mixed; d: one intermediate label; e: one 0 (dropped)
DIFFICULTY = [
    ("a", 0.0),
    ("a", 0.0),
    ("b", 1.0),
    ("b", 1.0),
    ("c", 0.0),
    ("c", 1.0),
    ("d", 0.5),
    ("e", 0.0),
]


def difficulty_records(model=None) -> list[dict]:
    ids = torch.randint(4, VOCAB, (len(DIFFICULTY), 6)).tolist()
    return [
        {"id": pid, "prefix_token_ids": p, "soft_label": label}
        for (pid, label), p in zip(DIFFICULTY, ids, strict=True)
    ]


def test_difficulty_filter(tmp_path, caplog):
    path = tmp_path / "labels.jsonl"
    write_jsonl(path, difficulty_records())
    assert len(load_labels(path)) == 8
    with caplog.at_level(logging.INFO, logger="stopkit.train"):
        kept = load_labels(path, drop_uniform=True)
    assert [(r["id"], r["soft_label"]) for r in kept] == DIFFICULTY[4:7]
    assert "dropped 3 of 5 problems (5 of 8 records)" in caplog.text
    write_jsonl(path, difficulty_records()[:4])
    with pytest.raises(ValueError, match="left no records"):
        load_labels(path, drop_uniform=True)


@pytest.mark.parametrize("drop_uniform", [False, True])
def test_train_filters_and_logs_label_statistics(drop_uniform, caplog):
    model = tiny_model()
    records, val = difficulty_records(), synthetic(model, 4, first_id=100)
    with caplog.at_level(logging.INFO, logger="stopkit.train"):
        train_scorer(
            StopScorer.new(model, lora_rank=4),
            records,
            val,
            epochs=1,
            batch_size=4,
            drop_uniform=drop_uniform,
            progress=False,
        )
    logged = {
        m.split(" labels: ")[0]: json.loads(m.split(" labels: ")[1])
        for m in caplog.messages
        if " labels: " in m
    }
    used = records[4:7] if drop_uniform else records
    assert logged == {"training": label_statistics(used), "validation": label_statistics(val)}
    assert logged["training"]["records"] == (3 if drop_uniform else 8)


def test_split_by_problem():
    records = [{"id": i // 3, "prefix_token_ids": [1], "soft_label": 0.5} for i in range(30)]
    train, val = split_by_problem(records, 0.2, seed=1)
    assert len(train) + len(val) == 30 and len(val) == 6
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert split_by_problem(records, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_problem(records, 1.0)


# ---- training ------------------------------------------------------------------------------------
def synthetic(model, n: int, first_id: int = 0) -> list[dict]:
    """Prefixes drawn from one of two halves of the vocabulary, split by the projection of the
    model's embedding rows on a fixed direction (a rule the scorer can learn), labelled 0.9 / 0.1."""
    emb = model.get_input_embeddings().weight.detach()
    proj = emb @ torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    halves = (proj <= proj.median()).nonzero()[:, 0], (proj > proj.median()).nonzero()[:, 0]
    out = []
    for i in range(n):
        pool = halves[i % 2]
        ids = pool[torch.randint(0, len(pool), (int(torch.randint(4, 13, ())),))].tolist()
        out.append({"id": first_id + i, "prefix_token_ids": ids, "soft_label": 0.9 - 0.8 * (i % 2)})
    return out


def test_training_step_uses_the_soft_label_cross_entropy():
    """One optimizer step on one batch, against a hand computation on the head's input features
    x: loss = mean(-(1 - p) log q0 - p log q1) with q = softmax(x W^T + b); the head's gradient
    (q - [1 - p, p])^T x / B; its update AdamW's first step from that gradient."""
    model = tiny_model()
    scorer = StopScorer.new(model, lora_rank=4, seed=5, lora_dropout=0.0)
    records = synthetic(model, 6)
    p = torch.tensor([0.1, 0.3, 0.6, 0.8, 0.25, 0.9], dtype=torch.float64)
    for r, label in zip(records, p.tolist(), strict=True):
        r["soft_label"] = label
    features = []
    handle = scorer.head.register_forward_pre_hook(
        lambda m, args: features.append(args[0].detach())
    )
    with torch.no_grad():
        logits = scorer([r["prefix_token_ids"] for r in records])
    handle.remove()
    x = features[0].double()
    W0, b0 = scorer.head.weight.detach().clone(), scorer.head.bias.detach().clone()
    torch.testing.assert_close(x @ W0.double().T + b0.double(), logits.double(), atol=1e-5, rtol=0)

    q = torch.softmax(x @ W0.double().T + b0.double(), dim=-1)
    target = torch.stack([1 - p, p], dim=1)
    loss = (-(1 - p) * q[:, 0].log() - p * q[:, 1].log()).mean()
    grad_w, grad_b = (q - target).T @ x / len(p), (q - target).mean(0)
    assert q[:, 1].min() > 0.02 and q[:, 1].max() < 0.98 and grad_w.abs().max() > 1e-3

    grads = {}

    def keep_grad(param: torch.Tensor) -> None:  # the gradient the optimizer step is given
        grads["weight" if param is scorer.head.weight else "bias"] = param.grad.detach().clone()

    scorer.head.weight.register_post_accumulate_grad_hook(keep_grad)
    scorer.head.bias.register_post_accumulate_grad_hook(keep_grad)
    lr, wd = 1e-3, 0.01
    history = train_scorer(
        scorer, records, [], epochs=1, batch_size=6, lr=lr, weight_decay=wd, progress=False
    )
    assert history[1]["train_loss"] == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(grads["weight"].double(), grad_w, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads["bias"].double(), grad_b, atol=1e-6, rtol=1e-4)
    for now, before, g in ((scorer.head.weight, W0, grad_w), (scorer.head.bias, b0, grad_b)):
        # AdamW's first step: decoupled decay, then m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
        step = before.double() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(now.detach().double(), step, atol=lr * 1e-3, rtol=0)


def test_training_lowers_validation_mse(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = StopScorer.new(
        model, lora_rank=8, seed=0, token_id=TOKENIZER.convert_tokens_to_ids(STOP_TOKEN)
    )
    train, val = synthetic(model, 48), synthetic(model, 16, first_id=100)
    history = train_scorer(
        scorer, train, val, out=tmp_path / "best", epochs=8, batch_size=8, lr=1e-2, progress=False
    )
    assert [h["epoch"] for h in history] == list(range(9))
    best = min(history[1:], key=lambda h: h["mse"])
    assert best["mse"] < 0.4 * history[0]["mse"] and best["auroc"] > 0.9, history
    # the base model is frozen and untouched; its requires_grad flags are restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # the saved checkpoint is the best-MSE epoch
    saved = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert json.dumps(saved["best"]) == json.dumps(best) and len(saved["history"]) == len(history)
    loaded = StopScorer.load(tmp_path / "best", model)
    assert evaluate_scorer(loaded, val)["mse"] == pytest.approx(best["mse"], abs=1e-6)


def test_gradient_accumulation_matches_larger_batches():
    model = tiny_model()
    records = synthetic(model, 8)

    def trained(batch_size, grad_accum, data, epochs=1):
        scorer = StopScorer.new(model, lora_rank=4, seed=3, lora_dropout=0.0)
        train_scorer(
            scorer,
            data,
            [],
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=1e-2,
            progress=False,
        )
        return torch.cat([p.detach().reshape(-1) for p in scorer.parameters()])

    # (Adam divides by the gradient's scale, so a parameter with a near-zero gradient can move
    # by rounding alone: compare at 2e-5, well below the lr 1e-2 steps)
    # two optimizer steps of 4 records each
    torch.testing.assert_close(trained(2, 2, records), trained(4, 1, records), atol=2e-5, rtol=0)
    # uneven micro-batches (4 + 2) per step, two epochs
    torch.testing.assert_close(
        trained(4, 2, records[:6], 2), trained(6, 1, records[:6], 2), atol=2e-5, rtol=0
    )
    assert not torch.allclose(trained(2, 1, records), trained(4, 1, records), atol=1e-3)


def test_train_rejects_bad_input():
    model = tiny_model()
    scorer = StopScorer.new(model, lora_rank=4)
    good = synthetic(model, 4)
    with pytest.raises(
        ValueError, match=r"train\[1\]: soft_label must be a real number in \[0, 1\], got 1.2"
    ):
        train_scorer(scorer, [good[0], dict(good[1], soft_label=1.2)], [], progress=False)
    with pytest.raises(ValueError, match=r"val\[0\]: soft_label"):
        train_scorer(scorer, good, [dict(good[0], soft_label=-1)], progress=False)
    with pytest.raises(
        ValueError,
        match=rf"train\[0\]: prefix_token_ids\[0\] must be a token id in \[0, {VOCAB}\), got {VOCAB}",
    ):
        train_scorer(scorer, [dict(good[0], prefix_token_ids=[VOCAB])], [], progress=False)
    for kw in (
        {"epochs": 0},
        {"batch_size": 0},
        {"grad_accum": 0},
        {"lr": 0.0},
        {"weight_decay": -1.0},
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            train_scorer(scorer, good, [], progress=False, **kw)
    with pytest.raises(ValueError, match="at least one record"):
        train_scorer(scorer, [], [], progress=False)


# ---- command line --------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize("command", ["label", "train"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and f"stopkit {command} --model" in text


def test_cli_label_then_train(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "answer": "3"}) + "\n"
            for i, q in enumerate(QUESTIONS)
        )
    )
    labels = tmp_path / "labels.jsonl"
    args = parser().parse_args(
        [
            "label",
            "--model",
            str(model_dir),
            "--problems",
            str(problems),
            "--out",
            str(labels),
            "--prefix-tokens",
            "4",
            "--rollouts",
            "4",
            "--traces",
            "2",
            "--max-new-tokens",
            "10",
            "--temperature",
            "1.0",
        ]
    )
    assert args.run(args) == 0
    records = load_labels(labels)
    assert len(records) == 6 and {r["id"] for r in records} == {0, 1, 2}
    random.Random(0).shuffle(records)  # labels of a random model are mostly 0: add spread
    for i, r in enumerate(records):
        r["soft_label"] = (i % 4) / 3
    labels.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "adapter"
    args = parser().parse_args(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(labels),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--lora-rank",
            "4",
            "--num-tokens",
            "2",
            "--init-token",
            STOP_TOKEN,
            "--val-fraction",
            "0.34",
        ]
    )
    assert args.run(args) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best"]["epoch"] == 1 and 0 <= saved["best"]["mse"] <= 1
    scorer = StopScorer.load(out, LlamaForCausalLM.from_pretrained(model_dir))
    assert scorer.num_tokens == 2 and scorer.loras[0].A.shape[0] == 4


def test_cli_train_difficulty_filter_and_authors_layout(tmp_path, caplog):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    labels, val = tmp_path / "labels.jsonl", tmp_path / "val.jsonl"
    write_jsonl(labels, difficulty_records())
    write_jsonl(val, synthetic(tiny_model(), 4))
    out = tmp_path / "authors"
    common = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(labels),
        "--val-data",
        str(val),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lora-rank",
        "4",
        "--num-tokens",
        "2",
    ]
    with caplog.at_level(logging.INFO):
        assert main([*common, "--out", str(out), "--drop-uniform", "--layout", "authors"]) == 0
    assert "dropped 3 of 5 problems" in caplog.text
    assert '"records": 3' in caplog.text  # the training labels' statistics, after the filter
    config = json.loads((out / "assess_token_config.json").read_text())
    assert (
        config["num_assess_tokens"] == 2 and config["special_token_id"] == VOCAB
    )  # [ASSESS] added
    assert (out / "tokenizer").is_dir() and not (out / "stop_config.json").exists()
    scorer = StopScorer.load(out, LlamaForCausalLM.from_pretrained(model_dir))
    assert scorer.num_tokens == 2 and scorer.loras[0].A.shape[0] == 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--layout", "authors", "--head-hidden", "8"],
            "--layout authors holds a Linear head only",
        ),
        (["--drop-uniform"], "--drop-uniform left no training records"),
    ],
)
def test_cli_train_user_errors(tmp_path, capsys, extra, message):
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, difficulty_records()[:4])  # problems a and b: all 0, all 1
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            str(labels),
            "--out",
            str(tmp_path / "out"),
            *extra,
        ]
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines
    assert code == 2 and last.startswith("stopkit train: ") and message in last
