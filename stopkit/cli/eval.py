"""``stopkit eval``: compare pruning methods on a JSONL benchmark (stopkit.evaluate).

Every method runs on every problem for every seed with the same N, k and l_p; the launches are
reproducible per seed, so the methods differ only in what they prune. Writes results.json,
results.csv and accuracy_vs_tokens.png into --out.
"""

from __future__ import annotations

import argparse

from stopkit._checks import check_int
from stopkit.cli.args import add_command, add_engine_args, add_model_args, add_sampling_args, int_list, name_list
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import load_checker, load_problems, load_reasoner, output_dir
from stopkit.cli.solve import check_solve_options

EXAMPLES = """
  stopkit eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter ckpt/stop \\
      --data aime24.jsonl --methods full,stop,confidence,entropy,random --n 64 --keep 8 \\
      --prefix-tokens 2048 --seeds 0,1,2 --out runs/aime24
  stopkit eval --model ./my-model --data bench.jsonl --methods full,confidence --n 16 --keep 4 \\
      --prefix-tokens 256 --max-new-tokens 1024 --limit 20

The data file is JSONL: {"question": "...", "answer": "..."} per line ("id" optional).
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "eval", help="compare pruning methods on a JSONL benchmark",
                    description=__doc__, examples=EXAMPLES)
    add_model_args(p, adapter=True)
    add_engine_args(p)
    p.add_argument("--data", required=True, help="JSONL of problems: question, answer (id optional)")
    p.add_argument("--methods", type=name_list, default="full,stop,confidence,entropy,random",
                   help="comma-separated methods (default: full,stop,confidence,entropy,random)")
    add_sampling_args(p)
    p.add_argument("--seeds", type=int_list, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="questions sharing one engine session (default 1)")
    p.add_argument("--checker", default=None,
                   help="answer checker 'module:function' (text, answer) -> bool (default: built-in)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.add_argument("--out", default="stopkit-eval", help="output folder (default: stopkit-eval)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stopkit.evaluate import evaluate, format_table, write_results  # noqa: PLC0415

    if len(set(args.methods)) != len(args.methods):
        raise UserError(f"--methods names a method twice: {','.join(args.methods)}")
    check_solve_options(args, args.methods)
    with options():
        check_int("--batch-size", args.batch_size, 1)
        if args.limit is not None:
            check_int("--limit", args.limit, 1)
    checker = load_checker(args.checker)
    problems = load_problems("--data", args.data)[:args.limit]
    out = output_dir("--out", args.out)
    reasoner = load_reasoner(args)
    results = evaluate(reasoner, problems, args.methods, n=args.n, keep=args.keep,
                       prefix_tokens=args.prefix_tokens, max_new_tokens=args.max_new_tokens,
                       seeds=args.seeds, vote=args.vote, checker=checker,
                       batch_size=args.batch_size, temperature=args.temperature,
                       top_p=args.top_p, early_stop=args.early_stop)
    results["config"].update(model=args.model, adapter=args.adapter, data=str(args.data))
    paths = write_results(results, out)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
