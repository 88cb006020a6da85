"""Loading what the higher layers share: models and tokenizers, prompt ids, EOS, problem files.

Labelling (stopkit.train) and solving (stopkit.reasoner) must build identical prompts and end
paths on the same EOS, so both take them from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import torch

__all__ = ["DTYPES", "load_model", "prompt_ids", "eos_token_id", "read_jsonl", "load_problems"]

DTYPES = ("auto", "float32", "float16", "bfloat16")


def load_model(model: str, *, dtype: str = "auto", device: str = "cpu"):
    """(model, tokenizer) from a local path or hub id with AutoModelForCausalLM / AutoTokenizer,
    in eval mode on ``device``. dtype: "auto" (the checkpoint's), "float32", "float16", "bfloat16"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    return lm, tokenizer


def prompt_ids(tokenizer, question: str | Sequence[int]) -> list[int]:
    """Prompt token ids of a question: a str goes through the tokenizer's chat template (one user
    turn, generation prompt added) when it has one, else is tokenised as is; token ids (a sequence
    of ints or a 1-D tensor) are used as given."""
    if isinstance(question, str):
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 tokenize=False, add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(question)["input_ids"])
    if isinstance(question, torch.Tensor):
        question = question.tolist()
    if isinstance(question, (bytes, dict)) or not isinstance(question, Sequence) or not question or \
            not all(isinstance(t, Integral) and not isinstance(t, bool) for t in question):
        raise TypeError(f"question must be a str or a non-empty list of token ids, got {question!r:.80}")
    return [int(t) for t in question]


def eos_token_id(model, tokenizer) -> int | None:
    """The EOS to end paths on, for ``Engine.start(eos_token_id=...)``: None (the engine then takes
    the model's own, from generation_config or config) when the model has one, else the
    tokenizer's."""
    gen = getattr(model, "generation_config", None)
    if getattr(gen, "eos_token_id", None) is not None or \
            getattr(model.config, "eos_token_id", None) is not None:
        return None
    return getattr(tokenizer, "eos_token_id", None)


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; ValueError naming the line
    of anything that is not a JSON object, FileNotFoundError (naming ``what``) for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            records.append((lineno, rec))
    return records


def load_problems(path: str | Path) -> list[dict]:
    """Problems from a JSONL file: one object per line with ``question`` (str, or a list of prompt
    token ids) and ``answer`` (kept as given; numbers become strings); ``id`` optional (default the
    line number). Blank lines are skipped."""
    problems = []
    for lineno, rec in read_jsonl(path, "problems (JSONL with 'question' and 'answer' fields)"):
        if "question" not in rec or "answer" not in rec:
            raise ValueError(f"{path}:{lineno}: each line must be an object with 'question' "
                             f"and 'answer', got keys {sorted(rec)[:8]}")
        answer = rec["answer"]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        problems.append({**rec, "id": rec.get("id", lineno), "answer": answer})
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems
