"""Type I scoring (stopkit.similarity): TF-IDF and model embeddings against independent
computations, consensus and diversity rankings, token accounting, the toy task."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from stopkit.similarity import (
    SimilarityScorer,
    TfidfEmbedding,
    TransformersEmbedding,
    cosine_matrix,
    diversity_order,
)
from stopkit.toy.task import apply_op, generate, quick_op
from stopkit.toy.tokenizer import build_tokenizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- independent references ----------------------------------------------------------------------
def tfidf_cosine_reference(ids: list[list[int]], ngram: int) -> np.ndarray:
    """Plain-Python TF-IDF (sublinear tf, smoothed idf over these documents) and cosine."""
    n = len(ids)
    counts = [
        Counter(tuple(x[i : i + k]) for k in range(1, ngram + 1) for i in range(len(x) - k + 1))
        for x in ids
    ]
    df = Counter(t for c in counts for t in c)
    vecs = [
        {t: (1 + math.log(v)) * (math.log((1 + n) / (1 + df[t])) + 1) for t, v in c.items()}
        for c in counts
    ]
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if norms[i] and norms[j]:
                out[i, j] = sum(v * vecs[j].get(t, 0.0) for t, v in vecs[i].items()) / (
                    norms[i] * norms[j]
                )
    return out


def mmr_reference(sim: np.ndarray, diversity: float) -> list[int]:
    """Maximal marginal relevance by brute force (relevance = mean similarity to the others)."""
    n = len(sim)
    rel = [(sim[i].sum() - sim[i, i]) / (n - 1) if n > 1 else 1.0 for i in range(n)]
    order = [max(range(n), key=lambda i: (rel[i], -i))]
    while len(order) < n:
        rest = [i for i in range(n) if i not in order]
        order.append(
            max(
                rest,
                key=lambda i: (
                    (1 - diversity) * rel[i] - diversity * max(sim[i, j] for j in order),
                    -i,
                ),
            )
        )
    return order


def random_prefixes(n: int, vocab: int = 12) -> list[list[int]]:
    """Prefixes over a small vocabulary (so that n-grams are shared), of mixed lengths."""
    return [torch.randint(0, vocab, (int(torch.randint(0, 40, ())),)).tolist() for _ in range(n)]


# ---- TF-IDF ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ngram", [1, 2, 3, 5])
def test_tfidf_cosine_matches_reference(ngram):
    ids = random_prefixes(9) + [[], [3, 1, 4, 1, 5], [3, 1, 4, 1, 5], [7]]
    got = cosine_matrix(TfidfEmbedding(ngram)([""] * len(ids), ids)).numpy()
    np.testing.assert_allclose(got, tfidf_cosine_reference(ids, ngram), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_id, ngram", [(151_000, 6), (65_535, 5)])
def test_tfidf_large_token_ids_and_long_ngrams_do_not_collide(top_id, ngram):
    # n-gram codes built as sum(token * base^i) with base = top_id + 1 overflow int64; with
    # base = 2^16, 5-grams that differ only in their first token would wrap to the same code
    tail = [top_id, top_id - 1, 7, top_id, 8, 9]
    ids = [[1] + tail, [2] + tail, tail[::-1] + [1], [top_id] * 12, [1] + tail]
    got = cosine_matrix(TfidfEmbedding(ngram)([""] * len(ids), ids)).numpy()
    np.testing.assert_allclose(got, tfidf_cosine_reference(ids, ngram), rtol=1e-12, atol=1e-12)


def test_tfidf_merges_private_ngrams_into_one_column_per_prefix():
    ids = [[1, 2, 3], [1, 2, 4], [9, 9]]
    emb = TfidfEmbedding(2)([""] * 3, ids)
    # shared: (1,), (2,), (1, 2); one private column per prefix
    assert emb.shape == (3, 3 + 3)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0)


def test_consensus_scores_are_mean_similarity_to_the_others():
    ids = random_prefixes(7)
    ref = tfidf_cosine_reference(ids, 2)
    scores = SimilarityScorer().score("q", [""] * 7, ids)
    expected = (ref.sum(1) - ref.diagonal()) / 6
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)
    assert SimilarityScorer().score("q", ["x"], [[1, 2]]) == [1.0]
    assert SimilarityScorer().score("q", [], []) == []


@pytest.mark.parametrize("diversity", [0.25, 0.5, 1.0])
def test_diversity_order_matches_brute_force_mmr(diversity):
    ids = random_prefixes(10)
    sim = cosine_matrix(TfidfEmbedding()([""] * 10, ids))
    order = diversity_order(sim, diversity)
    assert order == mmr_reference(sim.numpy(), diversity)
    scores = SimilarityScorer(diversity=diversity).score("q", [""] * 10, ids)
    assert sorted(range(10), key=lambda i: -scores[i]) == order
    assert sorted(scores) == [(10 - r) / 10 for r in reversed(range(10))]


def test_diversity_prunes_the_redundant_copies_first():
    a = [5, 6, 7, 8, 9, 10, 11, 12]
    ids = [a, [1, 2, 3, 4, 1, 2], a, [20, 21, 22, 23] + a[:2], a[:-1]]
    consensus = SimilarityScorer().score("q", [""] * 5, ids)
    assert max(range(5), key=lambda i: consensus[i]) in (0, 2)  # a copy of `a` is most typical
    scores = SimilarityScorer(diversity=1.0).score("q", [""] * 5, ids)
    order = sorted(range(5), key=lambda i: -scores[i])
    assert order[0] == 0 and set(order[:3]) == {0, 1, 3}  # keep 3: one `a` and the two others
    assert set(order[3:]) == {2, 4}  # the redundant copies go first


def test_pluggable_embedding_and_its_validation():
    calls = []

    def embed(texts, ids):
        calls.append((texts, ids))
        return torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])

    scores = SimilarityScorer(embed).score("q", ["a", "b", "c"], [[1], [2], [3]])
    assert calls == [(["a", "b", "c"], [[1], [2], [3]])]
    c = 1 / math.sqrt(1.01)
    np.testing.assert_allclose(scores, [c / 2, (c + 0.1 * c) / 2, 0.1 * c / 2], rtol=1e-6)
    with pytest.raises(ValueError, match=r"embed must return a Tensor \[2, d\]"):
        SimilarityScorer(lambda t, i: torch.zeros(3, 4)).score("q", ["a", "b"], [[1], [2]])
    with pytest.raises(ValueError, match="same length"):
        SimilarityScorer().score("q", ["a", "b"], [[1]])
    with pytest.raises(TypeError, match="embed must be a callable"):
        SimilarityScorer(embed=3)
    for bad in (-0.1, 1.5, "high", None):
        with pytest.raises(ValueError, match="diversity must be"):
            SimilarityScorer(diversity=bad)
    assert SimilarityScorer(diversity=True).diversity == 1.0
    assert SimilarityScorer(diversity=False).diversity == 0.0
    with pytest.raises(ValueError, match="similarity:PATH"):
        SimilarityScorer.from_spec("verifier:/x")


def test_seconds_accumulate_and_tfidf_processes_no_model_token():
    s = SimilarityScorer.from_spec("similarity", ngram=3)
    assert s.method_type == "I" and s.name == "similarity" and s.embed.ngram == 3
    s.score("q", ["a", "b"], [[1, 2], [2, 3]])
    first = s.seconds
    s.score("q", ["a", "b"], [[1, 2], [2, 3]])
    assert 0 < first < s.seconds and s.tokens == 0


# ---- the toy task ---------------------------------------------------------------------------------
def test_consensus_ranks_majority_answer_paths_above_an_outlier_on_the_toy_task():
    tok = build_tokenizer()
    # a problem whose quick approach (the misconception) departs from the careful chain at once
    problem = next(
        p
        for p in generate(200, seed=3)
        if quick_op(p.start, *p.ops[0]) != apply_op(p.start, *p.ops[0])
    )
    rng = random.Random(0)
    texts = [problem.sample_solution(rng, quick=False) for _ in range(6)]
    texts.append(problem.sample_solution(rng, quick=True))
    answers = [t.rsplit(" ", 1)[1] for t in texts]
    majority = Counter(answers).most_common(1)[0][0]
    assert answers[-1] != majority
    ids = [tok(t, add_special_tokens=False)["input_ids"][:16] for t in texts]  # the prefixes
    prefixes = [tok.decode(x) for x in ids]
    scores = SimilarityScorer().score(problem.question, prefixes, ids)
    outlier = scores[-1]
    assert all(s > outlier for s, a in zip(scores, answers, strict=True) if a == majority)
    assert min(range(len(scores)), key=lambda i: scores[i]) == len(scores) - 1


# ---- a transformers embedding model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    tok = build_tokenizer()
    torch.manual_seed(1234)
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=24,
            pad_token_id=tok.pad_token_id,
        )
    )
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def toy_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(p.sample_solution(rng).split()[: rng.randint(1, 30)]) for p in generate(n, seed)
    ]


def reference_embedding(path, texts, max_length, pooling="mean"):
    """One text at a time, no padding: [bos] + the last max_length - 1 tokens, pooled, normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][-(max_length - 1) :]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).last_hidden_state[0]
        pooled = h.mean(0) if pooling == "mean" else h[0]
        rows.append(pooled / pooled.norm())
    return torch.stack(rows).double()


@pytest.mark.parametrize("device", DEVICES)
def test_transformers_embedding_matches_unpadded_forward(bert_dir, device):
    texts = toy_texts(7, seed=5)
    emb = TransformersEmbedding(bert_dir, device=device, dtype="float32", batch_size=3)
    assert emb.max_length == 24  # max_position_embeddings is tighter than the tokenizer's 512
    got = emb(texts)
    assert got.shape == (7, 32) and got.dtype == torch.float32
    ref = reference_embedding(bert_dir, texts, 24)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    lengths = [min(len(build_tokenizer()(t)["input_ids"]), 24) for t in texts]
    assert emb.tokens == sum(lengths)
    assert max(lengths) == 24 and min(lengths) < 24  # truncation and padding both exercised


def test_similarity_spec_with_a_model_keeps_the_end_of_long_prefixes(bert_dir):
    texts = toy_texts(6, seed=11)
    scorer = SimilarityScorer.from_spec(f"similarity:{bert_dir}", max_length=8, batch_size=4)
    assert scorer.name == f"similarity:{bert_dir}" and scorer.method_type == "I"
    scores = scorer.score("q", texts, [[0]] * 6)
    ref = reference_embedding(bert_dir, texts, 8)
    sim = ref @ ref.T
    np.testing.assert_allclose(
        scores, ((sim.sum(1) - sim.diagonal()) / 5).numpy(), rtol=1e-4, atol=1e-5
    )
    assert scorer.tokens == sum(min(len(build_tokenizer()(t)["input_ids"]), 8) for t in texts)


def test_sentence_transformers_pooling_config_is_honoured(bert_dir, tmp_path):
    import shutil

    path = tmp_path / "st"
    shutil.copytree(bert_dir, path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10}))
    emb = TransformersEmbedding(path)
    assert (emb.pooling, emb.max_length) == ("cls", 10)
    texts = toy_texts(4, seed=2)
    torch.testing.assert_close(
        emb(texts).double(), reference_embedding(path, texts, 10, "cls"), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="pooling must be one of"):
        TransformersEmbedding(path, pooling="max")
