"""``stopkit label``: Monte-Carlo labels of reasoning prefixes, as JSONL (stopkit.label).

Samples traces, pauses them at --prefix-tokens, forks --rollouts continuations per prefix (sharing
its KV blocks) and labels each prefix with the fraction of correct continuations. Every problem is
queued at once and runs as the KV budget allows; each problem's records are appended to --out as
soon as it is done. Output JSONL: one record per prefix with prefix_token_ids (prompt + prefix),
soft_label, n_correct, n_rollouts, id, question, answer, trace, prompt_len. Rerunning the same
command resumes: problem ids already in --out are skipped.

With --ray, the problems are spread over Ray workers (one per GPU of the cluster, or --workers CPU
workers), each loading the model once; this process alone writes --out, the same records as
without --ray (their order may differ). A worker that dies hands its problems to the others.
"""

from __future__ import annotations

import argparse
import json

from stopkit._checks import check_int
from stopkit.cli.args import (
    Parser,
    add_command,
    add_engine_args,
    add_model_args,
    add_prompt_args,
    add_ray_args,
    check_sampling_args,
)
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import (
    load_checker,
    load_model,
    load_problems,
    make_engine,
    output_file,
    prompt_format,
    ray_pool,
)

MAX_NEW_TOKENS = 16384  # stopkit.label.MAX_NEW_TOKENS (not imported: parsing stays cheap)

EXAMPLES = """
  stopkit label --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --problems train.jsonl \\
      --out labels.jsonl --prefix-tokens 2048 --rollouts 32 --traces 4 --max-new-tokens 16384
  stopkit label --model stopkit/toy/assets/model --problems toy.jsonl --out toy_labels.jsonl \\
      --prefix-tokens 12 --rollouts 16 --max-new-tokens 100 --temperature 1.0 --top-p 1.0
  stopkit label --ray auto --model /shared/models/R1-Distill-Qwen-7B --problems train.jsonl \\
      --out labels.jsonl --prefix-tokens 2048 --rollouts 32   # every GPU of the Ray cluster

problems JSONL: one {"question": ..., "answer": ..., "id": optional} per line.
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "label",
        help="Monte-Carlo labels of reasoning prefixes (JSONL)",
        description=__doc__,
        examples=EXAMPLES,
    )
    add_model_args(p, adapter=False)
    add_engine_args(p)
    add_prompt_args(p)
    add_ray_args(p)
    p.add_argument(
        "--problems", required=True, help="JSONL of problems: question, answer (id optional)"
    )
    p.add_argument(
        "--out", required=True, help="output JSONL (appended to; finished ids are skipped)"
    )
    p.add_argument(
        "--prefix-tokens", type=int, required=True, help="prefix length l_p in generated tokens"
    )
    p.add_argument("--rollouts", type=int, default=32, help="continuations per prefix (default 32)")
    p.add_argument("--traces", type=int, default=1, help="prefixes sampled per problem (default 1)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help="generated tokens per rollout at most, prefix included (default "
        f"{MAX_NEW_TOKENS}: reasoning models write long traces, and a rollout cut "
        "short counts as wrong)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--checker",
        default=None,
        help="answer checker 'module:function' (text, answer) -> bool (default: built-in)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.set_defaults(run=run, on_interrupt="; rerun the same command to resume")


def run(args: argparse.Namespace) -> int:
    from stopkit.label import label_problems  # noqa: PLC0415 (transformers)

    with options():
        for flag, value in (
            ("--prefix-tokens", args.prefix_tokens),
            ("--rollouts", args.rollouts),
            ("--traces", args.traces),
        ):
            check_int(flag, value, 1)
        check_int("--top-k", args.top_k, 0)
        check_sampling_args(args)
        if args.limit is not None:
            check_int("--limit", args.limit, 1)
    if args.max_new_tokens <= args.prefix_tokens:
        raise UserError(
            f"--max-new-tokens ({args.max_new_tokens}) must exceed --prefix-tokens "
            f"({args.prefix_tokens}): rollouts continue after the prefix"
        )
    checker = load_checker(args.checker)
    prompt = prompt_format(args)
    problems = load_problems("--problems", args.problems)[: args.limit]
    out = output_file("--out", args.out)
    task = dict(
        prefix_tokens=args.prefix_tokens,
        rollouts=args.rollouts,
        traces=args.traces,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        checker=checker,
    )
    pool = ray_pool(args)
    if pool is not None:
        with pool:
            stats = pool.label_problems(problems, out, **task)
    else:
        model, tokenizer = load_model(args)
        stats = label_problems(
            model, tokenizer, problems, out, engine=make_engine(args, model), prompt=prompt, **task
        )
    print(json.dumps(stats))
    return 0
