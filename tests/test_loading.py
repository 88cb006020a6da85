"""Benchmark files (JSONL / JSON arrays, GSM8K, MATH, AIME-style, GPQA), prompt formats and GGUF
model paths (stopkit.loading)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from stopkit import loading
from stopkit.loading import DEFAULT_TEMPLATE, INSTRUCTION, PromptFormat, load_problems, prompt_ids


# ---- benchmark files -----------------------------------------------------------------------------
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_authors_json_array(tmp_path):
    # AIME / HMMT / BRUMO as the authors ship them: a JSON array of {"problem", "answer"}
    rows = [
        {"problem": "Find $x$ if $2x = 408$.", "answer": 204},
        {"problem": "Compute $\\frac{1}{2} + \\frac{1}{3}$.", "answer": "\\frac{5}{6}"},
        {"id": "2024-I-3", "problem": "How many?", "answer": "033"},
    ]
    f = tmp_path / "aime24.json"
    f.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    probs = load_problems(f)
    assert [p["id"] for p in probs] == [0, 1, "2024-I-3"]
    assert [p["question"] for p in probs] == [r["problem"] for r in rows]
    assert [p["answer"] for p in probs] == ["204", "\\frac{5}{6}", "033"]
    assert probs[0]["problem"] == rows[0]["problem"]  # the record's own fields stay


def test_gsm8k_math_and_prompt_layouts(tmp_path):
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
                "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nShe sold 48+24 = <<48+24=72>>72.\n#### 72",
            },
            {
                "problem": "What is $\\sqrt{16}$?",
                "level": "Level 1",
                "solution": "We have $\\sqrt{16} = \\boxed{4}$, since... so the answer is $\\boxed{\\frac{8}{2}}$.",
            },
            {
                "problem": "Simplify.",
                "solution": "long text \\boxed{\\text{wrong}}",
                "answer": "\\{1,2\\}",
            },
            {"prompt": "2+2?", "answer": 4.5},
            {"question": [1, 5, 6], "answer": "7"},
        ],
    )
    probs = load_problems(f)
    assert [p["answer"] for p in probs] == ["72", "\\frac{8}{2}", "\\{1,2\\}", "4.5", "7"]
    assert [p["id"] for p in probs] == [1, 2, 3, 4, 5]  # line numbers
    assert probs[1]["question"] == "What is $\\sqrt{16}$?" and probs[1]["level"] == "Level 1"
    assert probs[3]["question"] == "2+2?" and probs[4]["question"] == [1, 5, 6]


def gpqa_rows(n):
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which particle is number {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a{i}",
            "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}",
        }
        for i in range(n)
    ]


def test_gpqa_becomes_multiple_choice_with_a_reproducible_shuffle(tmp_path):
    rows = gpqa_rows(40)
    f = write_jsonl(tmp_path / "gpqa.jsonl", rows)
    probs = load_problems(f)
    for row, p in zip(rows, probs, strict=True):
        letter = p["answer"]
        assert letter in "ABCD" and len(letter) == 1
        assert sorted(p["choices"]) == sorted(row[k] for k in loading.GPQA_KEYS[1:])
        assert p["choices"]["ABCD".index(letter)] == row["Correct Answer"]
        lines = p["question"].split("\n")
        assert lines[0] == row["Question"] and lines[1] == ""
        assert lines[2:] == [f"{c}) {t}" for c, t in zip("ABCD", p["choices"], strict=True)]
    letters = Counter(p["answer"] for p in probs)
    assert len(letters) == 4 and max(letters.values()) < 25  # shuffled, not always A
    # the same letters on every load and in any row order (the seed is the question's)
    again = load_problems(write_jsonl(tmp_path / "rev.jsonl", rows[::-1]))
    assert [p["question"] for p in again[::-1]] == [p["question"] for p in probs]
    assert [p["answer"] for p in again[::-1]] == [p["answer"] for p in probs]


@pytest.mark.parametrize(
    "content,match",
    [
        (
            '{"question": "q", "answer": "1"}\n{"text": "q", "label": 3}\n',
            r"bad\.jsonl:2: cannot tell .*\['label', 'text'\].*question / problem / prompt.*Correct Answer",
        ),
        ('{"question": "q", "answer": "1"}\n\nnot json\n', r"bad\.jsonl:3: not valid JSON"),
        (
            '[{"problem": "p", "answer": 1}, {"problem": "p"}]',
            r"item 1: cannot tell .*\['problem'\]",
        ),
        (
            '[{"problem": "p", "answer": 1},\n {"problem": "p" "answer": 2}]',
            r"bad\.jsonl:2: not valid JSON",
        ),
        ('[{"problem": "p", "answer": 1}, 3]', r"item 1 of the array must be a JSON object"),
        ('{"question": "q", "answer": ""}\n', r"bad\.jsonl:1: the answer must be"),
        ('{"question": "", "answer": "1"}\n', r"bad\.jsonl:1: 'question' must be"),
        (
            (
                '{"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b", '
                '"Incorrect Answer 2": "", "Incorrect Answer 3": "d"}\n'
            ),
            r"bad\.jsonl:1: GPQA fields",
        ),
        ("[]", "holds no problems"),
    ],
)
def test_bad_files_name_the_place(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_problems(f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="problems"):
        load_problems(tmp_path / "missing.jsonl")


# ---- prompts -------------------------------------------------------------------------------------
def word_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<unk>",
        "<s>",
        "|",
        "sys",
        "user",
        "asst",
        "Reasoning:",
        "low",
        "medium",
        "high",
        "What",
        "is",
        "2+2?",
        "Q:",
        "\\boxed{}",
        "Be",
        "brief.",
        *INSTRUCTION.split(),
    ]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    out.chat_template = chat_template
    return out


CHAT = (
    "<s> {% for m in messages %}| {{ {'system': 'sys', 'user': 'user'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}| asst{% endif %}"
)
# gpt-oss's template reads the reasoning effort into its system message
GPT_OSS_LIKE = (
    "<s> | sys Reasoning: {{ reasoning_effort | default('medium') }} "
    "{% for m in messages %}| {{ {'system': 'sys', 'user': 'user'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}| asst"
)


def words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_default_prompt_is_the_papers_instruction_on_chat_models():
    tok = word_tokenizer(CHAT)
    assert DEFAULT_TEMPLATE == "{question}\n" + INSTRUCTION
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    got = words(tok, prompt_ids(tok, "What is 2+2?"))
    assert got == ["<s>", "|", "user", "What", "is", "2+2?", *INSTRUCTION.split(), "|", "asst"]
    # as is, with template="{question}"; a template's other braces are literal
    assert words(tok, prompt_ids(tok, "What is 2+2?", template="{question}")) == [
        "<s>",
        "|",
        "user",
        "What",
        "is",
        "2+2?",
        "|",
        "asst",
    ]
    assert words(tok, prompt_ids(tok, "2+2?", template="Q: {question} \\boxed{}")) == [
        "<s>",
        "|",
        "user",
        "Q:",
        "2+2?",
        "\\boxed{}",
        "|",
        "asst",
    ]
    # a system turn
    assert words(tok, prompt_ids(tok, "2+2?", template="{question}", system="Be brief.")) == [
        "<s>",
        "|",
        "sys",
        "Be",
        "brief.",
        "|",
        "user",
        "2+2?",
        "|",
        "asst",
    ]


def test_prompt_without_chat_template_and_token_ids():
    tok = word_tokenizer(None)
    assert words(tok, prompt_ids(tok, "What is 2+2?")) == ["What", "is", "2+2?"]
    assert words(tok, prompt_ids(tok, "2+2?", template="Q: {question}")) == ["Q:", "2+2?"]
    assert prompt_ids(tok, [3, 4]) == [3, 4]
    assert prompt_ids(word_tokenizer(CHAT), torch.tensor([5, 6]), system="x") == [5, 6]
    with pytest.raises(ValueError, match="chat template"):
        prompt_ids(tok, "2+2?", system="Be brief.")
    with pytest.raises(TypeError, match="question"):
        prompt_ids(tok, 3.5)


def test_reasoning_effort_goes_through_the_chat_template():
    tok = word_tokenizer(GPT_OSS_LIKE)
    fmt = PromptFormat(template="{question}", reasoning_effort="high")
    assert words(tok, fmt.prompt_ids(tok, "2+2?")) == [
        "<s>",
        "|",
        "sys",
        "Reasoning:",
        "high",
        "|",
        "user",
        "2+2?",
        "|",
        "asst",
    ]
    assert words(tok, prompt_ids(tok, "2+2?", template="{question}"))[3:5] == [
        "Reasoning:",
        "medium",
    ]
    with pytest.raises(ValueError, match="does not read it"):
        prompt_ids(word_tokenizer(CHAT), "2+2?", reasoning_effort="low")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(template="no placeholder"), ValueError, "template"),
        (dict(template=3), TypeError, "template"),
        (dict(reasoning_effort="max"), ValueError, "reasoning_effort"),
        (dict(system=["x"]), TypeError, "system"),
    ],
)
def test_bad_prompt_formats(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PromptFormat(**kwargs)


# ---- GGUF paths ----------------------------------------------------------------------------------
def test_gguf_paths_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STOPKIT_CACHE", str(tmp_path / "cache"))
    assert loading.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("STOPKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "stopkit"

    d = tmp_path / "models"
    d.mkdir()
    assert loading._gguf_file(str(d)) is None  # no GGUF: not ours
    (d / "a.gguf").write_bytes(b"GGUF")
    assert loading._gguf_file(str(d)) == d / "a.gguf"  # a directory holding one
    assert loading._gguf_file(str(d / "a.gguf")) == d / "a.gguf"
    (d / "config.json").write_text("{}")
    assert loading._gguf_file(str(d)) is None  # a checkpoint directory
    (d / "config.json").unlink()
    (d / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        loading._gguf_file(str(d))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        loading.load_model(str(d / "missing.gguf"))
    assert loading._gguf_file("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id


def test_converted_gguf_is_cached_and_loads_back(tmp_path, monkeypatch):
    # transformers' GGUF reader is stood in for by a tiny tied-embedding Llama (the real file is
    # read in test_real_model.py); the checkpoint writing, caching and loading are the real ones
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("STOPKIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(16))
    source = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            tie_word_embeddings=True,
        )
    ).eval()
    source.config.quantization_config = {"quant_method": "gguf"}  # as transformers leaves it
    reads = []

    def read_gguf(path):
        assert path.samefile(f)
        reads.append(path)
        return source, word_tokenizer(CHAT)

    monkeypatch.setattr(loading, "_read_gguf", read_gguf)
    model, tok = loading.load_model(str(f))
    out = loading.convert_gguf(f)
    assert (
        len(reads) == 1 and out.parent == tmp_path / "cache" / "gguf" and out.name.startswith("m-")
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.dtype == torch.float32 and tok.chat_template == CHAT
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    loading.load_model(str(tmp_path))  # the directory holding it
    assert len(reads) == 1  # cached: converted once
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert loading.convert_gguf(f) != out and len(reads) == 2  # a changed file: converted again
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_find_packaged_gguf_names_the_missing_package():
    with pytest.raises(FileNotFoundError, match="not installed"):
        loading.find_packaged_gguf("stopkit_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"one \.gguf"):
        loading.find_packaged_gguf("stopkit")
