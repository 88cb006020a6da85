"""Method specs and the paper's taxonomy (stopkit.methods), and the helpers the external-model
methods share."""

from __future__ import annotations

import pytest
import torch

from stopkit.methods import (
    METHOD_KINDS,
    TYPE_NAMES,
    length_limit,
    method_type,
    model_dtype,
    model_path,
    parse_method,
    right_pad,
)


@pytest.mark.parametrize(
    "spec, kind, path, typ",
    [
        ("stop", "stop", None, "IV"),
        ("confidence", "confidence", None, "III"),
        ("entropy", "entropy", None, "III"),
        ("similarity", "similarity", None, "I"),
        ("similarity:/models/minilm", "similarity", "/models/minilm", "I"),
        ("similarity:org/embedder", "similarity", "org/embedder", "I"),
        ("verifier:/ckpt/prm", "verifier", "/ckpt/prm", "II"),
        ("verifier:C:/models/rm", "verifier", "C:/models/rm", "II"),  # only the first ':' splits
        ("random", "random", None, None),
        ("full", "full", None, None),
    ],
)
def test_parse_method_and_type(spec, kind, path, typ):
    assert parse_method(spec) == (kind, path)
    assert method_type(spec) == typ


def test_every_kind_has_a_type_entry_and_the_four_types_are_named():
    assert set(METHOD_KINDS) == {
        "stop",
        "confidence",
        "entropy",
        "similarity",
        "verifier",
        "random",
        "full",
    }
    assert {method_type(k if k != "verifier" else "verifier:x") for k in METHOD_KINDS} == {
        "I",
        "II",
        "III",
        "IV",
        None,
    }
    assert TYPE_NAMES == {
        "I": "external, non-learnable",
        "II": "external, learnable",
        "III": "internal, non-learnable",
        "IV": "internal, learnable",
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("verifier", "needs a model path"),
        ("verifier:", "is empty"),
        ("similarity:", "is empty"),
        ("stop:/x", "takes no path"),
        ("full:x", "takes no path"),
        ("judge:/x", "must be one of"),
        ("Similarity", "must be one of"),
        ("", "must be one of"),
    ],
)
def test_parse_method_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def test_parse_method_rejects_non_str():
    with pytest.raises(TypeError, match="must be a str"):
        parse_method(None)


def test_model_dtype():
    assert model_dtype("auto") == "auto"
    assert model_dtype("bfloat16") is torch.bfloat16
    assert model_dtype(torch.float16) is torch.float16
    for bad in ("fp16", torch.int8, None):
        with pytest.raises(ValueError, match="dtype must be"):
            model_dtype(bad)


class _Tok:
    def __init__(self, n):
        self.model_max_length = n


class _Cfg:
    def __init__(self, n):
        self.max_position_embeddings = n


def test_length_limit_takes_the_tighter_known_limit():
    assert length_limit(_Tok(512), _Cfg(4096)) == 512
    assert length_limit(_Tok(int(1e30)), _Cfg(4096)) == 4096  # transformers' "unset" sentinel
    assert length_limit(_Tok(int(1e30)), object()) is None


def test_model_path(tmp_path):
    assert model_path(tmp_path, "x") == str(tmp_path)
    assert model_path("org/name", "x") == "org/name"  # a hub id is left to transformers
    with pytest.raises(FileNotFoundError, match="no verifier model at /no/such/dir"):
        model_path("/no/such/dir", "verifier model")
    with pytest.raises(FileNotFoundError, match=r"no embedding model at \./missing"):
        model_path("./missing", "embedding model")


def test_right_pad():
    ids, mask = right_pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.int64
