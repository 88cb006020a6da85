"""Pruning-method specs and the paper's taxonomy of path-pruning signals.

STOP (arXiv 2604.16029) sorts path-pruning methods by where their signal comes from (internal to the
reasoning model or external to it) and whether it is learned:

====  ==========================  ==============================================================
type  signal                      stopkit method
====  ==========================  ==============================================================
I     external, non-learnable     ``similarity``, ``similarity:PATH`` (:mod:`stopkit.similarity`)
II    external, learnable         ``verifier:PATH`` (:mod:`stopkit.verifier`)
III   internal, non-learnable     ``confidence``, ``entropy`` (DeepConf-style, in the reasoner)
IV    internal, learnable         ``stop`` (the [STOP] scorer, :mod:`stopkit.stop`)
====  ==========================  ==============================================================

``full`` (no pruning) and ``random`` (uniform scores) are the references and have no type.
Also here: what the two external-model methods share when they load and run a model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "METHOD_KINDS",
    "METHOD_TYPES",
    "TYPE_NAMES",
    "parse_method",
    "method_type",
    "model_dtype",
    "model_path",
    "length_limit",
    "right_pad",
]

# kind -> the paper's type (None: a reference, not a pruning signal)
METHOD_TYPES: dict[str, str | None] = {
    "stop": "IV",
    "confidence": "III",
    "entropy": "III",
    "similarity": "I",
    "verifier": "II",
    "random": None,
    "full": None,
}
METHOD_KINDS = tuple(METHOD_TYPES)
TYPE_NAMES = {
    "I": "external, non-learnable",
    "II": "external, learnable",
    "III": "internal, non-learnable",
    "IV": "internal, learnable",
}
_TAKE_A_PATH = ("similarity", "verifier")  # similarity: optional, verifier: required


def parse_method(spec: str) -> tuple[str, str | None]:
    """``"kind"`` or ``"kind:PATH"`` -> (kind, PATH or None).

    Kinds: stop, confidence, entropy, random, full, similarity (optionally ``similarity:PATH``, an
    embedding model) and ``verifier:PATH`` (a path is required). Only the first ``:`` splits, so
    PATH may contain colons. ValueError naming the spec for anything else; TypeError for a non-str.
    """
    if not isinstance(spec, str):
        raise TypeError(f"method must be a str, got {type(spec).__name__}")
    kind, sep, path = spec.partition(":")
    if kind not in METHOD_TYPES:
        raise ValueError(
            f"method must be one of stop, confidence, entropy, similarity, "
            f"similarity:PATH, verifier:PATH, random, full; got {spec!r}"
        )
    if sep and kind not in _TAKE_A_PATH:
        raise ValueError(f"method {kind!r} takes no path, got {spec!r}")
    if sep and not path:
        raise ValueError(f"method {spec!r}: the path after ':' is empty")
    if kind == "verifier" and not sep:
        raise ValueError(
            "method 'verifier' needs a model path: 'verifier:PATH' (a sequence-"
            "classification model or a process reward model)"
        )
    return kind, path or None


def method_type(spec: str) -> str | None:
    """The paper's type of a method spec: "I", "II", "III", "IV", or None for full and random."""
    return METHOD_TYPES[parse_method(spec)[0]]


# ---- what the external-model methods (similarity:PATH, verifier:PATH) share ----------------------
def model_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """The ``dtype`` argument of ``from_pretrained`` for an external model (embedding model,
    verifier): "auto" (the checkpoint's), "float32", "float16", "bfloat16", or a floating
    torch.dtype. ValueError naming the argument otherwise."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype == "auto":
        return "auto"
    if dtype in ("float32", "float16", "bfloat16"):
        return getattr(torch, dtype)
    raise ValueError(
        f"dtype must be 'auto', 'float32', 'float16', 'bfloat16' or a floating "
        f"torch.dtype, got {dtype!r}"
    )


def model_path(path: str | os.PathLike[str], what: str) -> str:
    """``path`` as a str for ``from_pretrained``; FileNotFoundError naming ``what`` when it is
    clearly a local path (absolute or starting with ".") that does not exist, rather than the hub
    error transformers would give."""
    path = os.fspath(path)
    if (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}")
    return path


def length_limit(tokenizer: Any, config: Any) -> int | None:
    """Tokens an external model takes at most: the tighter of the tokenizer's model_max_length
    (when set: transformers uses a huge sentinel otherwise) and the config's
    max_position_embeddings; None when neither is known."""
    candidates = [
        getattr(config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    limits = [x for x in candidates if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def right_pad(
    rows: list[list[int]], pad: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64 [B, longest row] on ``device``, right-padded with ``pad``:
    every row starts at position 0, as it would alone."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
