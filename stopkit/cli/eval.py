"""``stopkit eval``: compare pruning methods on a benchmark, in the paper's terms (stopkit.evaluate).

Every method runs on every problem for every seed with the same N, k and l_p; the launches are
reproducible per seed, so the methods differ only in what they prune. Each (method, seed) runs its
problems through the engine's scheduler at once; every problem's record is appended to
--out/records.jsonl as soon as it is done, so rerunning the same command resumes. Writes
results.json, results.csv and accuracy_vs_tokens.png into --out and prints the table: each
method's type (I: similarity, II: verifier, III: confidence/entropy, IV: stop), avg@k|N (avg@N for
full), maj@k, its vote's accuracy, tokens, the reduction against full and an external model's
tokens.

With --sweep, runs each pruning method once per l_p of --sweep-prefixes and seed, decoding every
path to its end and scoring it at the check, and reads off every keep of --sweep-keeps (or
--sweep-ratios): writes sweep.csv, sweep.png (avg@k|N against tokens, with the full point) and
prints the best retention ratio per token budget.

With --ray, the problems are spread over Ray workers (one per GPU of the cluster, or --workers CPU
workers), each loading the model and adapter once; this process alone writes --out, the same
records as without --ray (their order may differ). A worker that dies hands its problems to the
others.
"""

from __future__ import annotations

import argparse
import contextlib

from stopkit._checks import check_int
from stopkit.cli.args import (
    Parser,
    add_command,
    add_engine_args,
    add_method_args,
    add_model_args,
    add_prompt_args,
    add_ray_args,
    add_sampling_args,
    int_list,
    name_list,
)
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import load_checker, load_problems, load_reasoner, output_dir, ray_pool
from stopkit.cli.solve import check_solve_options

EXAMPLES = """
  stopkit eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter ckpt/stop \\
      --data aime24.json --methods full,stop,confidence,entropy,random --n 64 --keep 8 \\
      --prefix-tokens 2048 --seeds 0,1,2 --out runs/aime24
  stopkit eval --model ./my-model --adapter ckpt/stop --data gsm8k.jsonl \\
      --methods full,similarity,verifier:./my-prm,confidence,stop --n 16 --keep 4 \\
      --prefix-tokens 256 --max-new-tokens 1024 --limit 20
  stopkit eval --model ./my-model --adapter ckpt/stop --data math500.jsonl --methods stop \\
      --sweep --sweep-prefixes 1024,2048 --sweep-ratios 0.0625,0.125,0.25,0.5 --n 64
  stopkit eval --ray auto --model /shared/models/my-model --adapter /shared/ckpt/stop \\
      --data math500.jsonl --methods full,stop --n 64 --keep 8 --out runs/math500

Problem files: JSONL or a JSON array with question / problem / prompt and answer (or a solution
whose last \\boxed{} is taken); GPQA rows become multiple choice.
"""


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "eval",
        help="compare pruning methods on a benchmark",
        description=__doc__,
        examples=EXAMPLES,
    )
    add_model_args(p, adapter=True)
    add_engine_args(p)
    add_prompt_args(p)
    add_ray_args(p)
    p.add_argument("--data", required=True, help="problem file (JSONL or JSON array)")
    p.add_argument(
        "--methods",
        type=name_list,
        default="full,stop,confidence,entropy,random",
        help="comma-separated methods (default: full,stop,confidence,entropy,random)",
    )
    add_sampling_args(p)
    add_method_args(p)
    p.add_argument("--seeds", type=int_list, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument(
        "--checker",
        default=None,
        help="answer checker 'module:function' (text, answer) -> bool (default: built-in)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.add_argument(
        "--out",
        default="stopkit-eval",
        help="output folder (default: stopkit-eval); its records.jsonl makes reruns resume",
    )
    g = p.add_argument_group("budget sweep")
    g.add_argument(
        "--sweep",
        action="store_true",
        help="sweep keep (or the retention ratio) and l_p instead of one configuration",
    )
    g.add_argument(
        "--sweep-prefixes",
        type=int_list,
        default=None,
        help="l_p values (default: --prefix-tokens)",
    )
    g.add_argument("--sweep-keeps", type=int_list, default=None, help="keep values")
    g.add_argument(
        "--sweep-ratios",
        type=str,
        default=None,
        help="retention ratios, comma-separated (keep = ceil(ratio * n))",
    )
    p.set_defaults(run=run, on_interrupt="; rerun the same command to resume")


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sweep-ratios: expected comma-separated floats, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from stopkit import evaluate as ev  # noqa: PLC0415

    if len(set(args.methods)) != len(args.methods):
        raise UserError(f"--methods names a method twice: {','.join(args.methods)}")
    check_solve_options(args, args.methods)
    with options():
        if args.limit is not None:
            check_int("--limit", args.limit, 1)
    if args.sweep:
        if (args.sweep_keeps is None) == (args.sweep_ratios is None):
            raise UserError("--sweep needs exactly one of --sweep-keeps and --sweep-ratios")
        if args.early_stop is not None:
            raise UserError("--sweep reads every keep off one run, which --early-stop would change")
        if all(m == "full" for m in args.methods):
            raise UserError("--sweep needs a pruning method in --methods besides full")
    checker = load_checker(args.checker)
    problems = load_problems("--data", args.data)[: args.limit]
    out = output_dir("--out", args.out)
    pool = ray_pool(args)
    with pool if pool is not None else contextlib.nullcontext():  # the workers stop with it
        reasoner = pool if pool is not None else load_reasoner(args)
        common = dict(
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            seeds=args.seeds,
            checker=checker,
            out=out,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        if args.sweep:
            with options():
                ratios = None if args.sweep_ratios is None else _ratios(args.sweep_ratios)
                result = ev.sweep(
                    reasoner,
                    problems,
                    args.methods,
                    keeps=args.sweep_keeps,
                    ratios=ratios,
                    prefixes=args.sweep_prefixes or [args.prefix_tokens],
                    **common,
                )
            paths = ev.write_sweep(result, out)
            print(ev.format_sweep(result))
        else:
            result = ev.evaluate(
                reasoner,
                problems,
                args.methods,
                keep=args.keep,
                prefix_tokens=args.prefix_tokens,
                vote=args.vote,
                early_stop=args.early_stop,
                **common,
            )
            result["config"].update(
                model=args.model,
                adapter=args.adapter,
                data=str(args.data),
                prompt=vars(reasoner.prompt),
            )
            paths = ev.write_results(result, out)
            print(ev.format_table(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
