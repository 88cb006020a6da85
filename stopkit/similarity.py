"""Type I pruning (external, non-learnable): score a question's paths by how similar their
prefixes are to each other.

At the check, every unfinished path of ONE question is embedded and the cosine similarities of all
pairs are taken. Two rankings (higher score = kept first):

- **Consensus** (default): a path's score is its mean cosine similarity to the question's other
  prefixes. Typical paths -- those that go the way most paths go -- are kept, outliers pruned: the
  prefix-level analogue of a majority vote. Scores lie in [-1, 1] ([0, 1] with TF-IDF, whose
  vectors are non-negative); a lone path scores 1.
- **Diversity** (``diversity`` > 0): prune the most redundant paths first, as redundancy-pruning
  work does (Slim-SC, Hong et al., EMNLP 2025, arXiv 2509.13990: remove chains by inter-chain
  similarity; DeepPrune, arXiv 2510.08483: inter-trace redundancy). The paths are put in
  maximal-marginal-relevance order (Carbonell & Goldstein, SIGIR 1998): first the most typical
  path, then repeatedly the one maximising ``(1 - diversity) * consensus - diversity * (max cosine
  similarity to the paths already chosen)``; ``diversity = 1`` is greedy farthest-point order
  (Gonzalez 1985), so the kept top-k cover the prefixes as widely as possible, and the paths
  closest to an already chosen one come last and are pruned first. The score of the path in
  position r (0-based) of n is (n - r) / n. Ties go to the earlier path.

Embeddings (any callable ``embed(texts, ids) -> Tensor [n, d]`` can be plugged in; cosine
similarity is taken from its Gram matrix, a zero row is similar to nothing):

- :class:`TfidfEmbedding` (``method="similarity"``, model-free): TF-IDF over the **token-id**
  n-grams (n = 1..``ngram``, default 2) of each prefix, sublinear tf (1 + log count), smoothed idf
  ``log((1 + n) / (1 + df)) + 1`` computed over the question's own prefixes, rows L2-normalised.
  Token ids rather than text n-grams: the ids are exactly what the reasoning model sampled (no
  decode, no word splitter), the model's subword vocabulary works the same for prose, LaTeX, code
  and unspaced scripts, and all paths of a question come from one tokenizer, so equal text is
  equal ids in practice; a unigram+bigram of subwords spans about one to two words.
- :class:`TransformersEmbedding` (``method="similarity:PATH"``): a sentence-embedding model loaded
  with transformers ``AutoModel`` + ``AutoTokenizer`` from PATH (no remote code), run batched on
  the chosen device and dtype over the decoded prefix text, mean-pooled over the attention mask
  (or the pooling a sentence-transformers ``modules.json`` in a local PATH names: mean, cls or
  lasttoken), L2-normalised. Prefixes longer than ``max_length`` (default: the
  sentence-transformers ``max_seq_length``, else the model's limit) keep their END (truncated from
  the left), the part that says where a path is heading; paths share the beginning anyway.

Cost: :attr:`SimilarityScorer.tokens` counts the embedding model's processed tokens (padding
excluded; 0 for TF-IDF) and :attr:`SimilarityScorer.seconds` the wall time of scoring, both
cumulative over calls.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stopkit._checks import check_int
from stopkit.methods import length_limit, model_dtype, model_path, parse_method, right_pad

__all__ = [
    "SimilarityScorer",
    "TfidfEmbedding",
    "TransformersEmbedding",
    "cosine_matrix",
    "consensus_scores",
    "diversity_order",
]

Embed = Callable[[list[str], list[list[int]]], torch.Tensor]


class TfidfEmbedding:
    """Model-free prefix embedding: TF-IDF over token-id n-grams (module docstring).

    ``embed(texts, ids)`` -> float64 [n, d], rows L2-normalised (a prefix with no n-gram is a zero
    row); ``texts`` is unused; idf is computed over the n prefixes given. An n-gram that occurs in
    one prefix only is orthogonal to every other prefix, so those of each prefix are merged into
    one coordinate of their total weight: every inner product stays exact and d is the number of
    shared n-grams plus n, not the vocabulary of all n-grams.
    """

    tokens = 0  # no model runs

    def __init__(self, ngram: int = 2) -> None:
        self.ngram = check_int("ngram", ngram, 1)

    def __call__(self, texts: Sequence[str], ids: Sequence[Sequence[int]]) -> torch.Tensor:
        n = len(ids)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        toks = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        if toks.size == 0:
            return torch.zeros(n, 1, dtype=torch.float64)
        owner = np.repeat(np.arange(n), lengths)
        # tokens from each position to the end of its prefix: a k-gram starts there if >= k
        left = np.repeat(lengths.cumsum(), lengths) - np.arange(toks.size)
        base = int(toks.max()) + 1
        docs, terms, num_terms = [], [], 0
        gram = toks.copy()  # code of the k-gram starting at each position (where left >= k)
        for k in range(1, self.ngram + 1):
            valid = left >= k
            if not valid.any():
                break
            if k > 1:  # a k-gram: the dense id of its (k-1)-gram prefix, then the next token
                gram[: -(k - 1)] = gram[: -(k - 1)] * base + toks[k - 1 :]
            uniq, inv = np.unique(gram[valid], return_inverse=True)
            docs.append(owner[valid])
            terms.append(inv.ravel() + num_terms)
            num_terms += uniq.size
            gram = np.zeros_like(toks)
            gram[valid] = inv.ravel()  # dense ids keep the next codes small (no int64 overflow)
        pair, count = np.unique(
            np.concatenate(docs) * num_terms + np.concatenate(terms), return_counts=True
        )
        doc, term = pair // num_terms, pair % num_terms
        df = np.bincount(term, minlength=num_terms)
        w = (1 + np.log(count)) * (np.log((1 + n) / (1 + df[term])) + 1)
        w /= np.sqrt(np.bincount(doc, weights=w * w, minlength=n))[doc]
        shared = df[term] > 1
        shared_terms, column = np.unique(term[shared], return_inverse=True)
        out = np.zeros((n, shared_terms.size + n))
        out[doc[shared], column.ravel()] = w[shared]
        out[np.arange(n), shared_terms.size + np.arange(n)] = np.sqrt(
            np.bincount(doc[~shared], weights=w[~shared] ** 2, minlength=n)
        )
        return torch.from_numpy(out)


class TransformersEmbedding:
    """A sentence-embedding model from a local path or hub id (module docstring).

    ``embed(texts, ids)`` -> float32 [n, d] on the CPU, rows L2-normalised; ``ids`` is unused (the
    model has its own tokenizer). device, dtype ("auto", "float32", "float16", "bfloat16" or a
    torch.dtype): where and how the model runs; batch_size: texts per forward (sorted by length to
    pad little); max_length: tokens per text at most, special tokens included (None: the
    sentence-transformers ``max_seq_length``, else the tokenizer's / the model's limit); pooling:
    "mean", "cls" or "lasttoken" (None: the sentence-transformers pooling config in ``path``,
    else mean). ``tokens``: processed tokens so far, padding excluded.
    """

    POOLINGS = ("mean", "cls", "lasttoken")

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 32,
        max_length: int | None = None,
        pooling: str | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = model_path(path, "embedding model")
        self.batch_size = check_int("batch_size", batch_size, 1)
        st = _sentence_transformers_config(Path(path))
        self.pooling = pooling if pooling is not None else st.get("pooling", "mean")
        if self.pooling not in self.POOLINGS:
            raise ValueError(
                f"pooling must be one of {', '.join(self.POOLINGS)}, got {self.pooling!r}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.truncation_side = "left"  # keep the end of long prefixes
        self.model = (
            AutoModel.from_pretrained(self.path, dtype=model_dtype(dtype), trust_remote_code=False)
            .to(device)
            .eval()
        )
        self.device = self.model.device
        if max_length is None:
            max_length = st.get("max_seq_length") or length_limit(self.tokenizer, self.model.config)
            if max_length is None:
                raise ValueError(
                    f"{self.path}: no length limit found in the tokenizer or config; "
                    "pass max_length"
                )
        self.max_length = check_int("max_length", max_length, 2)
        self.tokens = 0

    @torch.inference_mode()
    def __call__(
        self, texts: Sequence[str], ids: Sequence[Sequence[int]] | None = None
    ) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, 0)
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)[
            "input_ids"
        ]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list = [None] * len(texts)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            input_ids, mask = right_pad([encoded[i] for i in rows], pad, self.device)
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            if self.pooling == "mean":
                m = mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
            elif self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = hidden[torch.arange(len(rows), device=hidden.device), mask.sum(1) - 1]
            for i, row in zip(
                rows, torch.nn.functional.normalize(pooled, dim=-1).cpu(), strict=True
            ):
                out[i] = row
            self.tokens += int(mask.sum())
        return torch.stack(out)


_ST_POOLING = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "lasttoken": "pooling_mode_lasttoken",
}


def _sentence_transformers_config(path: Path) -> dict:
    """{"pooling", "max_seq_length"} from a sentence-transformers layout in ``path``, where present."""
    found: dict = {}
    bert = path / "sentence_bert_config.json"
    if bert.is_file():
        found["max_seq_length"] = json.loads(bert.read_text()).get("max_seq_length")
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("models.Pooling"):
                cfg = json.loads((path / module["path"] / "config.json").read_text())
                modes = [m for m, key in _ST_POOLING.items() if cfg.get(key)]
                if len(modes) != 1:
                    raise ValueError(
                        f"{path}: sentence-transformers pooling {cfg} is not one of "
                        "mean, cls, lasttoken; pass pooling="
                    )
                found["pooling"] = modes[0]
    return found


def cosine_matrix(emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarities float64 [n, n] of the rows of ``emb`` [n, d]; a zero row has
    similarity 0 with every row, itself included."""
    emb = emb.double()
    gram = emb @ emb.t()
    norm = gram.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))
    return gram * inv[:, None] * inv[None, :]


def consensus_scores(sim: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each path to the others, float64 [n], from ``sim`` [n, n]
    (1 for a lone path)."""
    n = sim.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    return (sim.sum(1) - sim.diagonal()) / (n - 1)


def diversity_order(sim: torch.Tensor, diversity: float) -> list[int]:
    """Maximal-marginal-relevance order of the paths (module docstring): the most typical first,
    then each time the path maximising ``(1 - diversity) * consensus - diversity * max similarity
    to those chosen``. Ties go to the lower index."""
    n = sim.shape[0]
    if n == 0:
        return []
    relevance = consensus_scores(sim)
    order = [int(torch.argmax(relevance))]  # argmax returns the first maximum
    closest = sim[order[0]].clone()  # max similarity to the chosen set
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[0]] = True
    while len(order) < n:
        gain = (1 - diversity) * relevance - diversity * closest
        gain[chosen] = -math.inf
        nxt = int(torch.argmax(gain))
        order.append(nxt)
        chosen[nxt] = True
        closest = torch.maximum(closest, sim[nxt])
    return order


class SimilarityScorer:
    """Type I path scorer (module docstring): built once per run, ``score`` per question.

    embed: ``(texts, ids) -> Tensor [n, d]`` (default :class:`TfidfEmbedding`); diversity: 0 (or
    False) ranks by consensus, (0, 1] by maximal-marginal-relevance order with that weight on
    redundancy (True = 1: greedy farthest-point); name: the method spec it was built from.
    ``tokens``, ``seconds``: the embedding model's processed tokens and the wall seconds spent
    scoring, cumulative.
    """

    method_type = "I"

    def __init__(
        self, embed: Embed | None = None, *, diversity: float = 0.0, name: str = "similarity"
    ) -> None:
        if embed is not None and not callable(embed):
            raise TypeError(
                f"embed must be a callable (texts, ids) -> Tensor [n, d], got "
                f"{type(embed).__name__}"
            )
        if not isinstance(diversity, (int, float)) or not 0.0 <= diversity <= 1.0:
            raise ValueError(
                f"diversity must be a float in [0, 1] (or a bool: 0 / 1), got {diversity!r}"
            )
        self.embed = embed if embed is not None else TfidfEmbedding()
        self.diversity = float(diversity)
        self.name = name
        self.seconds = 0.0

    @classmethod
    def from_spec(
        cls,
        spec: str = "similarity",
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        diversity: float = 0.0,
        **embedding_kwargs: Any,
    ) -> SimilarityScorer:
        """``"similarity"`` (TF-IDF; ``embedding_kwargs``: ngram) or ``"similarity:PATH"`` (a
        :class:`TransformersEmbedding` of PATH on ``device`` / ``dtype``; ``embedding_kwargs``:
        batch_size, max_length, pooling)."""
        kind, path = parse_method(spec)
        if kind != "similarity":
            raise ValueError(f"spec must be 'similarity' or 'similarity:PATH', got {spec!r}")
        embed = (
            TfidfEmbedding(**embedding_kwargs)
            if path is None
            else TransformersEmbedding(path, device=device, dtype=dtype, **embedding_kwargs)
        )
        return cls(embed, diversity=diversity, name=spec)

    @property
    def tokens(self) -> int:
        """Tokens the embedding model processed so far (0 for TF-IDF)."""
        return int(getattr(self.embed, "tokens", 0))

    def similarities(
        self, prefixes: Sequence[str], prefix_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Cosine similarities float64 [n, n] of one question's prefixes."""
        if len(prefixes) != len(prefix_ids):
            raise ValueError(
                f"prefixes and prefix_ids must have the same length, got "
                f"{len(prefixes)} and {len(prefix_ids)}"
            )
        emb = self.embed(list(prefixes), [list(x) for x in prefix_ids])
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(prefixes):
            raise ValueError(
                f"embed must return a Tensor [{len(prefixes)}, d], got "
                f"{getattr(emb, 'shape', type(emb).__name__)}"
            )
        return cosine_matrix(emb)

    def score(
        self, question: str, prefixes: Sequence[str], prefix_ids: Sequence[Sequence[int]]
    ) -> list[float]:
        """Scores of ONE question's unfinished paths, higher = keep (consensus, or the diversity
        order's (n - position) / n). ``question`` is unused: every path shares it."""
        t0 = time.perf_counter()
        sim = self.similarities(prefixes, prefix_ids)
        n = sim.shape[0]
        if self.diversity == 0.0:
            scores = consensus_scores(sim).tolist()
        else:
            scores = [0.0] * n
            for position, i in enumerate(diversity_order(sim, self.diversity)):
                scores[i] = (n - position) / n
        self.seconds += time.perf_counter() - t0
        return scores
