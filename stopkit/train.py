"""Training of a StopScorer on Monte-Carlo labels (``stopkit train``; labels come from
:mod:`stopkit.label`).

Training: soft-label cross-entropy (targets ``[1 - p, p]``) on the scorer's logits, AdamW (lr 1e-4,
no schedule), mini-batches with gradient accumulation; the prefix pass runs without the adapter
and without gradients (:meth:`stopkit.stop.StopScorer.forward`). After every epoch the validation
MSE (score vs soft label), AUROC, accuracy (binary target ``label >= 0.5``, prediction
``score >= 0.5``) and the within-problem pair accuracy (:func:`pair_accuracy`) are logged and the
checkpoint with the best validation MSE is saved, in stopkit's layout or the authors'.

Label files: ``stopkit label``'s JSONL, or the authors' (their label keys, :data:`LABEL_KEYS`).
Optional difficulty filter (``drop_uniform``): problems whose labels are all 0 or all 1 are left
out of training. The label statistics are logged when training starts.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stopkit._checks import check_int, check_real, check_token_ids
from stopkit.label import label_statistics
from stopkit.loading import read_jsonl
from stopkit.stop import StopScorer

__all__ = [
    "auroc",
    "pair_accuracy",
    "metrics",
    "LABEL_KEYS",
    "PREFIX_KEYS",
    "load_labels",
    "check_records",
    "drop_uniform_problems",
    "split_by_problem",
    "evaluate_scorer",
    "train_scorer",
]

log = logging.getLogger(__name__)


# ---- metrics -------------------------------------------------------------------------------------
def auroc(scores: torch.Tensor | Sequence[float], targets: torch.Tensor | Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for boolean ``targets`` ``[N]`` (rank
    statistic, ties count one half). NaN when only one class is present."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(targets).reshape(-1).bool()
    if s.shape != y.shape:
        raise ValueError(
            f"scores and targets must have the same length, got {s.numel()} and {y.numel()}"
        )
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based, ties averaged
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def pair_accuracy(
    scores: torch.Tensor | Sequence[float],
    labels: torch.Tensor | Sequence[float],
    groups: Sequence[Hashable],
    *,
    margin: float = 0.25,
) -> float:
    """How often ``scores`` order two prefixes of the same group (problem) as their soft labels
    do, over the pairs whose labels differ by more than ``margin`` (ties count one half). This is
    what pruning needs: it ranks the paths of one question. NaN when there is no such pair."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    p = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    index: dict[str, int] = {}
    g = torch.as_tensor([index.setdefault(str(x), len(index)) for x in groups], dtype=torch.int64)
    if not s.shape == p.shape == g.shape:
        raise ValueError(
            f"scores, labels and groups must have one length, got {s.numel()}, "
            f"{p.numel()} and {g.numel()}"
        )
    order = torch.argsort(g, stable=True)  # one group at a time: memory ~ the largest group^2
    counts = torch.bincount(g, minlength=len(index)).tolist()
    wins, pairs = 0.0, 0
    for gs, gp in zip(s[order].split(counts), p[order].split(counts), strict=True):
        better = gp[:, None] - gp[None, :] > margin  # row i's label beats row j's
        ds = (gs[:, None] - gs[None, :])[better]
        wins += float((ds > 0).sum()) + 0.5 * float((ds == 0).sum())
        pairs += ds.numel()
    return wins / pairs if pairs else math.nan


def metrics(
    scores: torch.Tensor | Sequence[float],
    labels: torch.Tensor | Sequence[float],
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """{"mse", "auroc", "accuracy"} of scores ``[N]`` against soft labels ``[N]`` (binary target
    ``label >= 0.5``; a prediction is positive when ``score >= 0.5``), and with ``groups`` ``[N]``
    (problem ids) the within-problem ``pair_accuracy``."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    p = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    if s.shape != p.shape or s.numel() == 0:
        raise ValueError(
            f"scores and labels must be non-empty and of one length, got {s.numel()} "
            f"and {p.numel()}"
        )
    y = p >= 0.5
    out = {
        "mse": float(((s - p) ** 2).mean()),
        "auroc": auroc(s, y),
        "accuracy": float(((s >= 0.5) == y).double().mean()),
    }
    if groups is not None:
        out["pair_accuracy"] = pair_accuracy(s, p, groups)
    return out


# ---- label data ----------------------------------------------------------------------------------
# The label keys the authors' trainer reads, in its order (the first one a record has wins); stopkit
# label writes soft_label. Their trainer reads the prefix ids from prefix_token_ids only.
LABEL_KEYS = ("Soft_label", "soft_label", "good_probability", "label_prob", "score")
PREFIX_KEYS = ("prefix_token_ids",)


def _check_record(
    rec: dict, where: str, vocab_size: int | None = None, default_id: Hashable = None
) -> dict:
    """A label record as ``{"id", "prefix_token_ids", "soft_label"}``, checked; ValueError (never
    TypeError: a record is data) naming ``where`` (a file:line or a list element)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where} must be a dict (a label record), got {type(rec).__name__}")
    fields = {}
    for what, keys in (("prefix ids", PREFIX_KEYS), ("label", LABEL_KEYS)):
        key = next((k for k in keys if k in rec), None)
        if key is None:
            raise ValueError(
                f"{where}: no {what}: the record has keys {sorted(rec)[:12]}, "
                f"accepted {'one of ' if len(keys) > 1 else ''}{', '.join(keys)}"
            )
        fields[what] = key
    try:
        ids = check_token_ids(
            f"{where}: {fields['prefix ids']}", rec[fields["prefix ids"]], vocab_size
        )
        p = check_real(f"{where}: {fields['label']}", rec[fields["label"]], 0, 1)
    except TypeError as e:
        raise ValueError(str(e)) from None
    pid = rec.get("id", rec.get("problem_id"))
    return {"id": default_id if pid is None else pid, "prefix_token_ids": ids, "soft_label": p}


def drop_uniform_problems(records: list[dict]) -> list[dict]:
    """The records of the problems (``id``) whose labels are not all 0 and not all 1: the
    difficulty filter. A problem no rollout ever solves, or every rollout solves, teaches the
    scorer nothing about which of its paths to keep."""
    labels: dict[str, set[float]] = {}
    for r in records:
        labels.setdefault(str(r["id"]), set()).add(r["soft_label"])
    keep = {pid for pid, v in labels.items() if v != {0.0} and v != {1.0}}
    kept = [r for r in records if str(r["id"]) in keep]
    log.info(
        "difficulty filter: dropped %d of %d problems (%d of %d records) whose labels are all "
        "0 or all 1",
        len(labels) - len(keep),
        len(labels),
        len(records) - len(kept),
        len(records),
    )
    return kept


def load_labels(path: str | Path, *, drop_uniform: bool = False) -> list[dict]:
    """Training records from a label JSONL: ``stopkit label``'s, or the authors' (prefix ids under
    ``prefix_token_ids``; the label, in [0, 1], under the first of :data:`LABEL_KEYS` present:
    ``Soft_label``, ``soft_label``, ``good_probability``, ``label_prob``, ``score``; ``id`` or
    ``problem_id`` optional, default the line number). Returns dicts with ``id``,
    ``prefix_token_ids``, ``soft_label``. drop_uniform: leave out the problems whose labels are all
    0 or all 1 (:func:`drop_uniform_problems`). Raises ValueError naming the line of a bad record."""
    path = Path(path)
    records = [
        _check_record(rec, f"{path}:{lineno}", default_id=lineno)
        for lineno, rec in read_jsonl(path, "label")
    ]
    if not records:
        raise ValueError(f"{path} holds no records")
    if drop_uniform:
        records = drop_uniform_problems(records)
        if not records:
            raise ValueError(
                f"{path}: every problem's labels are all 0 or all 1; the difficulty "
                "filter (drop_uniform) left no records"
            )
    return records


def split_by_problem(
    records: list[dict], val_fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded random ``val_fraction`` of the problem ids (at least one when the
    fraction is > 0 and there are two ids or more) goes to validation, so no problem's prefixes are
    on both sides."""
    val_fraction = check_real("val_fraction", val_fraction, 0, 1, high_open=True)
    ids = sorted({str(r["id"]) for r in records})
    random.Random(seed).shuffle(ids)
    n_val = min(len(ids) - 1, math.ceil(val_fraction * len(ids))) if val_fraction > 0 else 0
    val_ids = set(ids[:n_val])
    return (
        [r for r in records if str(r["id"]) not in val_ids],
        [r for r in records if str(r["id"]) in val_ids],
    )


def check_records(records: list[dict], vocab_size: int, name: str) -> list[dict]:
    """The records as ``{"id", "prefix_token_ids", "soft_label"}`` (label keys as in
    :func:`load_labels`; ``id`` default the index); ValueError naming ``name[i]`` unless every
    record has prefix ids in ``[0, vocab_size)`` (the model's vocabulary) and a label in [0, 1]."""
    return [
        _check_record(r, f"{name}[{i}]", vocab_size, default_id=i) for i, r in enumerate(records)
    ]


# ---- training ------------------------------------------------------------------------------------
def _batches(records: list[dict], batch_size: int) -> list[list[dict]]:
    return [records[i : i + batch_size] for i in range(0, len(records), batch_size)]


@torch.no_grad()
def evaluate_scorer(
    scorer: StopScorer, records: list[dict], *, batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """Validation metrics (:func:`metrics`) of ``scorer`` on label records, computed with the
    training forward in eval mode (no dropout)."""
    was_training = scorer.training
    scorer.eval()
    try:
        scores = [
            torch.softmax(scorer([r["prefix_token_ids"] for r in batch]), dim=-1)[:, 1].cpu()
            for batch in tqdm(
                _batches(records, batch_size), desc="validate", leave=False, disable=not progress
            )
        ]
    finally:
        scorer.train(was_training)
    return metrics(
        torch.cat(scores), [r["soft_label"] for r in records], [r["id"] for r in records]
    )


def train_scorer(
    scorer: StopScorer,
    train: list[dict],
    val: list[dict],
    *,
    out: str | Path | None = None,
    epochs: int = 3,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
    drop_uniform: bool = False,
    layout: str = "stopkit",
    tokenizer: Any = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``scorer`` (token, LoRA, head; the model stays frozen) on label records.

    train, val: label records (:func:`check_records`). Each optimizer step sees ``batch_size *
    grad_accum`` records. drop_uniform: train only on the problems whose labels are not all 0 and
    not all 1 (:func:`drop_uniform_problems`; validation keeps every record). The label statistics
    (:func:`stopkit.label.label_statistics`) of both sets are logged first. Returns the history:
    one dict per epoch (epoch 0 = before training) with ``train_loss`` (mean soft-label
    cross-entropy of the epoch) and the validation ``mse``, ``auroc``, ``accuracy``,
    ``pair_accuracy``. With ``out``, the epoch with the best validation MSE is saved there
    (:meth:`StopScorer.save` with ``layout`` and ``tokenizer``) with ``metrics.json``; without
    validation records, the last epoch is saved.
    """
    epochs = check_int("epochs", epochs, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    grad_accum = check_int("grad_accum", grad_accum, 1)
    lr = check_real("lr", lr, 0, low_open=True)
    weight_decay = check_real("weight_decay", weight_decay, 0)
    scorer.check_layout(layout)
    if not train:
        raise ValueError("train must hold at least one record")
    vocab = int(cast(torch.nn.Embedding, scorer.model.get_input_embeddings()).weight.shape[0])
    train = check_records(train, vocab, "train")
    val = check_records(val, vocab, "val")
    if drop_uniform:
        train = drop_uniform_problems(train)
        if not train:
            raise ValueError(
                "every training problem's labels are all 0 or all 1: the difficulty "
                "filter (drop_uniform) left no training records"
            )
    for name, records in (("training", train), ("validation", val)):
        if records:
            log.info("%s labels: %s", name, json.dumps(label_statistics(records)))
    out = Path(out) if out is not None else None
    model = scorer.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:  # no gradient buffers for the base model; restored below
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    history = [
        {
            "epoch": 0,
            "train_loss": math.nan,
            **(evaluate_scorer(scorer, val, batch_size=batch_size) if val else {}),
        }
    ]
    log.info("epoch 0 (untrained): %s", _fmt(history[0]))
    best = {"mse": math.inf}
    try:
        for epoch in range(1, epochs + 1):
            order = list(train)
            rng.shuffle(order)
            batches = _batches(order, batch_size)
            scorer.train()
            total, seen = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", disable=not progress)
            for i, batch in enumerate(bar):
                logits = scorer([r["prefix_token_ids"] for r in batch])
                label = torch.tensor([r["soft_label"] for r in batch], device=logits.device)
                loss = F.cross_entropy(logits, torch.stack([1 - label, label], dim=1))
                # weight by records so an uneven last group counts like the others
                group = batches[i - i % grad_accum : i - i % grad_accum + grad_accum]
                (loss * len(batch) / sum(len(b) for b in group)).backward()
                if i % grad_accum == grad_accum - 1 or i == len(batches) - 1:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.item() * len(batch)
                seen += len(batch)
                bar.set_postfix(loss=f"{total / seen:.4f}")
            scorer.eval()
            row = {
                "epoch": epoch,
                "train_loss": total / seen,
                **(evaluate_scorer(scorer, val, batch_size=batch_size) if val else {}),
            }
            history.append(row)
            improved = not val or row["mse"] < best["mse"]
            log.info("epoch %d: %s%s", epoch, _fmt(row), " (best)" if improved and val else "")
            if improved:
                best = row
                if out is not None:
                    scorer.save(out, layout=layout, tokenizer=tokenizer)
            if out is not None:
                (out / "metrics.json").write_text(
                    json.dumps({"best": best, "history": history}, indent=2) + "\n"
                )
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        scorer.eval()
    return history


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch")
