"""Argument helpers shared by the commands: the parser, the global flags, value types and the
option groups of the commands that run a model."""

from __future__ import annotations

import argparse
from typing import NoReturn

from stopkit._checks import check_real
from stopkit.cli.errors import UserError
from stopkit.loading import DTYPES

__all__ = [
    "Parser",
    "add_command",
    "add_global_flags",
    "int_list",
    "name_list",
    "device",
    "memory",
    "add_model_args",
    "add_engine_args",
    "add_method_args",
    "add_prompt_args",
    "add_sampling_args",
    "add_ray_args",
    "check_sampling_args",
]


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: a bad command line raises UserError (printed by
    main as ``stopkit solve: argument --n: invalid int value: 'x'``) instead of printing the usage
    and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message, prog=self.prog)


def add_global_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``-v/--verbose`` and ``--debug``. They are accepted before the command and after it; the
    command's copies use ``suppress`` so that they do not reset a flag given before the command."""
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="on an error, show the Python traceback instead of one line",
    )


def add_command(
    subparsers: argparse._SubParsersAction[Parser],
    name: str,
    *,
    help: str,
    description: str,
    examples: str,
) -> Parser:
    """A command's parser, with its examples under the options in ``--help``."""
    p = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples.strip("\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(p, suppress=True)
    return p


# ---- value types (argparse calls them on the option's text) ---------------------------------------
def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """``"full, stop"`` -> ``["full", "stop"]``."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``..."""
    import torch  # noqa: PLC0415

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {count} CUDA device(s)")
    return text


def memory(text: str) -> int | float:
    """``--kv-cache-memory``: bytes (an int, or with a KiB/MiB/GiB suffix) or a share (a float in
    (0, 1])."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    t = text.strip().lower()
    try:
        for unit, scale in units.items():
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * scale)
        return int(t) if t.isdigit() else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected bytes (e.g. 8GiB) or a share in (0, 1], got {text!r}"
        ) from None


# ---- option groups --------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, *, adapter: bool) -> None:
    """--model, --dtype, --device (and --adapter)."""
    p.add_argument(
        "--model",
        required=True,
        help="a transformers causal LM: a local folder or a Hugging Face hub id",
    )
    if adapter:
        p.add_argument(
            "--adapter", default=None, help="StopScorer checkpoint folder (needed by method stop)"
        )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (default: auto)")
    p.add_argument(
        "--device",
        default="cpu",
        type=device,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's KV budget and batch limits: --num-blocks, --kv-cache-memory, --max-num-seqs,
    --max-batch-tokens, and --compile (stopkit.Engine's arguments)."""
    g = p.add_argument_group("engine budget")
    g.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV cache blocks (default: sized from --kv-cache-memory)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=memory,
        default=None,
        help="KV budget: bytes (e.g. 20GiB) or a share of the memory (default: 0.9 of a "
        "GPU with the model and steps inside it, 0.25 of the available RAM on CPU)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="paths in the KV cache at once, at most (default 256)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        help="tokens per engine step, prefill chunks and decodes together (default 8192)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="decode steps through torch.compile, padded to batch-size buckets (CUDA "
        "graphs on a GPU); each bucket compiles on first use (default: eager)",
    )


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS], --workers, --worker-threads (stopkit.distributed). With --ray, --device
    defaults to the cluster's GPUs when it has any (one per worker), else the CPU."""
    g = p.add_argument_group('Ray (spread the problems over a cluster; pip install "stopkit[ray]")')
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray workers, each loading the model once: without ADDRESS on a "
        "local Ray instance; 'auto': the cluster this machine joined (ray start); "
        "else host:port or ray://host:port. Workers use one GPU each when the "
        "cluster has GPUs, else the CPU (--device cpu or cuda to choose)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray workers (default: every GPU of the cluster, or its CPUs divided by "
        "--worker-threads)",
    )
    g.add_argument(
        "--worker-threads", type=int, default=1, help="torch threads of each CPU worker (default 1)"
    )
    p.set_defaults(device=None)  # None: cpu, or the cluster's choice with --ray


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """How str questions become prompts: --prompt-template, --system-prompt, --reasoning-effort
    (stopkit.loading.PromptFormat; label and solve/eval must use the same)."""
    g = p.add_argument_group("prompt (use the same for label, eval, solve and serve)")
    g.add_argument(
        "--prompt-template",
        default=None,
        help="the user turn, with {question} where the question goes (default on chat "
        "models: the paper's '{question}\\nPlease reason step by step, and put "
        "your final answer within \\boxed{}.')",
    )
    g.add_argument("--system-prompt", default=None, help="a system turn (chat models)")
    g.add_argument(
        "--reasoning-effort",
        default=None,
        choices=("low", "medium", "high"),
        help="gpt-oss's reasoning effort, through its chat template",
    )


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Options of the external methods: --similarity-diversity, --external-device, --step-marker."""
    g = p.add_argument_group("external methods (similarity, similarity:PATH, verifier:PATH)")
    g.add_argument(
        "--similarity-diversity",
        type=float,
        default=0.0,
        help="0: similarity keeps the most typical paths (consensus); (0, 1]: ranks for "
        "diversity, pruning the most redundant first (default 0)",
    )
    g.add_argument(
        "--external-device",
        type=device,
        default=None,
        help="device of the embedding model / verifier (default: the model's)",
    )
    g.add_argument(
        "--step-marker",
        default=None,
        help="the step marker of a token-classification process reward model "
        "(default: <extra_0> when its tokenizer has it)",
    )


def add_sampling_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The paths, the check and the vote: --n, --keep, --prefix-tokens, --max-new-tokens, --vote,
    --temperature, --top-p, --early-stop."""
    p.add_argument("--n", type=int, default=64, help="paths launched per question (default 64)")
    p.add_argument("--keep", type=int, default=8, help="paths resumed after the check (default 8)")
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=2048,
        help="prefix length l_p at the check (default 2048)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=8192,
        help="tokens per path at most, prefix included (default 8192)",
    )
    p.add_argument(
        "--vote", default="majority", help="majority, score or entropy (default majority)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument(
        "--early-stop",
        type=int,
        default=None,
        help="stop all decoding once an answer has this many votes",
    )


def check_sampling_args(args: argparse.Namespace) -> None:
    """--temperature and --top-p (the engine checks them too, but only once the model is loaded);
    call inside :func:`stopkit.cli.errors.options`."""
    check_real("--temperature", args.temperature, 0)
    check_real("--top-p", args.top_p, 0, 1, low_open=True)
    if hasattr(args, "similarity_diversity"):
        check_real("--similarity-diversity", args.similarity_diversity, 0, 1)
