"""The embedded demo: a chained modular-arithmetic task, its tokenizer, a tiny Llama trained on it.

``load_model()`` returns the shipped checkpoint (``ASSETS / "model"``, built by
``python -m stopkit.toy.build --stage base``) without touching the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stopkit.toy.task import (
    MAX_STEPS,
    MIN_STEPS,
    OPS,
    P,
    Problem,
    check,
    extract_answer,
    extract_steps,
    generate,
    slip_rate,
    split_of,
    write_jsonl,
)

__all__ = [
    "ASSETS",
    "MODEL_DIR",
    "ADAPTER_DIR",
    "TEMPERATURE",
    "PREFIX_TOKENS",
    "MAX_NEW_TOKENS",
    "load_model",
    "P",
    "OPS",
    "MIN_STEPS",
    "MAX_STEPS",
    "Problem",
    "generate",
    "split_of",
    "slip_rate",
    "extract_answer",
    "extract_steps",
    "check",
    "write_jsonl",
]

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
ADAPTER_DIR = ASSETS / "adapter"
# How the shipped checkpoints are sampled: the build script bakes these into the model's
# generation_config.json and labels the adapter's training data with them; the demo reads them.
TEMPERATURE = 1.0
PREFIX_TOKENS = 12  # l_p: tokens decoded before the [STOP] check
MAX_NEW_TOKENS = 100  # a 14-step solution is 87 tokens with eos


def load_model(
    dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the shipped toy model (or the one saved at ``path``), eval, on CPU."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy model at {path}: build it with `python -m stopkit.toy.build --stage base`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
