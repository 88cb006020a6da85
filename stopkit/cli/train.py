"""``stopkit train``: train a StopScorer on Monte-Carlo labels (stopkit.train).

Trains the [STOP] token, LoRA adapter and head on soft labels (cross-entropy with soft targets
[1-p, p]; AdamW, no schedule). Reads stopkit label's JSONL or the authors' (labels under
Soft_label, soft_label, good_probability, label_prob or score: the first present). --drop-uniform
leaves out the problems whose labels are all 0 or all 1. The label statistics are logged first;
after each epoch the validation MSE, AUROC and accuracy. The best-MSE checkpoint is written to
--out with metrics.json, in stopkit's layout or (--layout authors) the authors' layout, with the
tokenizer, for their code; StopScorer.load reads both.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any, cast

from stopkit._checks import check_int, check_real
from stopkit.cli.args import Parser, add_command, add_model_args, name_list
from stopkit.cli.errors import options, reading
from stopkit.cli.inputs import load_model, load_scorer, output_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXAMPLES = """
  stopkit train --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --data labels.jsonl \\
      --out stop-adapter --epochs 3 --batch-size 8 --grad-accum 4 --device cuda --dtype bfloat16
  stopkit train --model stopkit/toy/assets/model --data toy_labels.jsonl --out toy-adapter \\
      --lora-rank 16 --init-token "[STOP]" --val-fraction 0.2
  stopkit train ... --val-data val_labels.jsonl        # a fixed validation file
  stopkit train ... --drop-uniform --layout authors    # difficulty filter; the authors' layout
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "train",
        help="train a StopScorer on Monte-Carlo labels",
        description=__doc__,
        examples=EXAMPLES,
    )
    add_model_args(p, adapter=False)
    p.add_argument(
        "--data",
        required=True,
        help="label JSONL (prefix_token_ids; soft_label or the authors' label keys)",
    )
    p.add_argument("--out", required=True, help="checkpoint folder (best validation MSE)")
    p.add_argument(
        "--layout",
        choices=("stopkit", "authors"),
        default="stopkit",
        help="checkpoint layout: stopkit's (default) or the authors' (for their code; "
        "a Linear head only)",
    )
    p.add_argument(
        "--drop-uniform",
        action="store_true",
        help="difficulty filter: train without the problems whose labels are all 0 or all 1",
    )
    p.add_argument(
        "--val-data", default=None, help="validation label JSONL (default: split --data)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of problem ids held out for validation when no --val-data (default 0.1)",
    )
    p.add_argument(
        "--epochs", type=int, default=3, help="passes over the training data (default 3)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="records per forward (default 8)")
    p.add_argument(
        "--grad-accum", type=int, default=1, help="forwards per optimizer step (default 1)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--init", default=None, help="start from this StopScorer checkpoint")
    p.add_argument("--num-tokens", type=int, default=4, help="[STOP] tokens K (default 4)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument(
        "--targets",
        type=name_list,
        default="q_proj,v_proj",
        help="comma-separated Linear names that get LoRA (default q_proj,v_proj)",
    )
    p.add_argument(
        "--head-hidden",
        type=int,
        default=None,
        help="width of a one-hidden-layer MLP head (default: a Linear head)",
    )
    p.add_argument(
        "--init-token",
        default=None,
        help="token (string or id) whose embedding starts the [STOP] vector "
        "(default: the mean embedding)",
    )
    p.set_defaults(run=run)


def _init_token(value: str | None, tokenizer: Any) -> int | None:
    """--init-token as a token id: an id as given, a token string through the tokenizer."""
    if value is None or value.isdigit():
        return None if value is None else int(value)
    token_id = tokenizer.convert_tokens_to_ids(value)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"--init-token {value!r} is not a token of the tokenizer")
    return token_id


def run(args: argparse.Namespace) -> int:
    from stopkit.stop import StopScorer  # noqa: PLC0415 (transformers)
    from stopkit.train import (  # noqa: PLC0415
        check_records,
        drop_uniform_problems,
        load_labels,
        split_by_problem,
        train_scorer,
    )

    with options():
        for flag, value in (
            ("--epochs", args.epochs),
            ("--batch-size", args.batch_size),
            ("--grad-accum", args.grad_accum),
        ):
            check_int(flag, value, 1)
        check_real("--lr", args.lr, 0, low_open=True)
        check_real("--weight-decay", args.weight_decay, 0)
        check_real("--val-fraction", args.val_fraction, 0, 1, high_open=True)
        if args.layout == "authors" and args.head_hidden is not None:
            raise ValueError(
                "--layout authors holds a Linear head only; drop --head-hidden or use "
                "--layout stopkit"
            )
    with reading("--data", args.data):
        records = load_labels(args.data)
    if args.val_data:
        with reading("--val-data", args.val_data):
            train, val = records, load_labels(args.val_data)
    else:
        train, val = split_by_problem(records, args.val_fraction, args.seed)
    if args.drop_uniform:
        with reading("--data", args.data):
            train = drop_uniform_problems(train)
            if not train:
                raise ValueError(
                    "every training problem's labels are all 0 or all 1: "
                    "--drop-uniform left no training records"
                )
    out = output_dir("--out", args.out)
    model, tokenizer = load_model(args)
    vocab_size = int(cast("torch.nn.Embedding", model.get_input_embeddings()).weight.shape[0])
    for flag, path, recs in (("--data", args.data, records), ("--val-data", args.val_data, val)):
        if path:
            with reading(flag, path):
                check_records(recs, vocab_size, str(path))
    if args.init:
        scorer = load_scorer("--init", args.init, model)
    else:
        with options():  # the options' values against the model: targets, token, sizes
            scorer = StopScorer.new(
                model,
                num_tokens=args.num_tokens,
                lora_rank=args.lora_rank,
                lora_alpha=args.lora_alpha,
                targets=tuple(args.targets),
                seed=args.seed,
                lora_dropout=args.lora_dropout,
                token_id=_init_token(args.init_token, tokenizer),
                head_hidden=args.head_hidden,
            )
    with options():
        scorer.check_layout(args.layout)  # e.g. an --init scorer whose head has a hidden layer
    log.info("%d training and %d validation records", len(train), len(val))
    history = train_scorer(
        scorer,
        train,
        val,
        out=out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        layout=args.layout,
        tokenizer=tokenizer,
    )
    print(json.dumps(history[-1]))
    return 0
