"""``stopkit solve``: answer one question with N parallel paths, pruned at the check."""

from __future__ import annotations

import argparse
import json

from stopkit.cli.args import (
    Parser,
    add_command,
    add_engine_args,
    add_method_args,
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    check_sampling_args,
)
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import load_reasoner

EXAMPLES = """
  stopkit solve --model ./my-model --adapter ckpt/stop "What is 17 * 23?"
  stopkit solve --model ./my-model --method confidence --n 32 --keep 4 --prefix-tokens 1024 \\
      --vote entropy --early-stop 4 "Find the remainder of 2^100 modulo 7."
  stopkit solve --model ./my-model --method full --n 8 --json "1 + 1 = ?"
  stopkit solve --model stopkit/toy/assets/model --adapter stopkit/toy/assets/adapter --n 16 \\
      --keep 4 --prefix-tokens 12 --max-new-tokens 100 --temperature 1 --top-p 1 \\
      "26 #1 - 14 #2 + 22 #3 + 25 #4 * 20 #5 - 11 #6 * 13 #7 * 17 #8 * 27 #9 - 3 mod 31 ?"
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "solve",
        help="answer one question with parallel paths and pruning",
        description=__doc__,
        examples=EXAMPLES,
    )
    add_model_args(p, adapter=True)
    add_engine_args(p)
    add_prompt_args(p)
    p.add_argument("question", help="the question (the chat template is applied when there is one)")
    p.add_argument(
        "--method",
        default="stop",
        help="stop, confidence, entropy, similarity, similarity:PATH, verifier:PATH, "
        "random or full (default stop)",
    )
    add_sampling_args(p)
    add_method_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the whole Solution as JSON")
    p.set_defaults(run=run)


def check_solve_options(args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse bad sampling options and methods before a model is loaded (solve and eval)."""
    from stopkit.reasoner import check_solve_args  # noqa: PLC0415 (transformers)

    if "stop" in methods and not args.adapter:
        raise UserError("method stop needs --adapter (a StopScorer checkpoint folder)")
    with options():
        check_sampling_args(args)
        for method in methods:
            check_solve_args(
                n=args.n,
                keep=args.keep,
                prefix_tokens=args.prefix_tokens,
                max_new_tokens=args.max_new_tokens,
                method=method,
                vote=args.vote,
                early_stop=args.early_stop,
            )


def run(args: argparse.Namespace) -> int:
    check_solve_options(args, [args.method])
    reasoner = load_reasoner(args)
    sol = reasoner.solve(
        args.question,
        n=args.n,
        keep=args.keep,
        prefix_tokens=args.prefix_tokens,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        vote=args.vote,
        early_stop=args.early_stop,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "answer": sol.answer,
                    "votes": {str(k): v for k, v in sol.votes.items()},
                    "generated_tokens": sol.generated_tokens,
                    "scoring_tokens": sol.scoring_tokens,
                    "tokens": sol.tokens,
                    "external_tokens": sol.external_tokens,
                    "seconds": sol.seconds,
                    "phases": sol.phases,
                    "paths": [
                        {
                            "answer": p.answer,
                            "score": p.score,
                            "pruned": p.pruned,
                            "finished_in_prefix": p.finished_in_prefix,
                            "finish_reason": p.finish_reason,
                            "num_tokens": len(p.tokens),
                            "text": p.text,
                        }
                        for p in sol.paths
                    ],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    kept = sum(p.voted for p in sol.paths)
    print(f"answer: {sol.answer}")
    print(
        "votes: "
        + ", ".join(f"{a!s}={w:.3g}" for a, w in sorted(sol.votes.items(), key=lambda kv: -kv[1]))
    )
    print(
        f"paths: {len(sol.paths)} launched, {kept} kept; tokens: {sol.generated_tokens} "
        f"generated, {sol.scoring_tokens} [STOP]; {sol.seconds:.2f} s "
        + " ".join(f"{k}={v:.2f}s" for k, v in sol.phases.items())
    )
    return 0
