"""Loading what the user points the commands at. Each loader runs inside
:func:`stopkit.cli.errors.reading`, so a missing, unreadable, corrupt or mismatched input is a
one-line UserError naming the option and the path."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stopkit._checks import check_int
from stopkit.cli.errors import UserError, one_line, options, reading

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from stopkit.answers import Checker
    from stopkit.distributed import ModelSpec, RayPool
    from stopkit.engine import Engine
    from stopkit.loading import PromptFormat
    from stopkit.reasoner import ParallelReasoner
    from stopkit.stop import StopScorer

__all__ = [
    "load_model",
    "load_scorer",
    "load_reasoner",
    "load_problems",
    "load_checker",
    "ray_pool",
    "output_dir",
    "output_file",
]

# what from_pretrained would look up on the Hugging Face hub: "name" or "org/name"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_model(args: argparse.Namespace | ModelSpec) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from ``--model`` with ``--dtype`` on ``--device``."""
    from stopkit.loading import load_model as load  # noqa: PLC0415 (transformers)

    path = Path(args.model)
    if path.exists():
        gguf = path.suffix.lower() == ".gguf" or (path.is_dir() and any(path.glob("*.gguf")))
        if not gguf and not (path / "config.json").is_file():
            raise UserError(
                f"--model {path}: no config.json there; a transformers model folder "
                "holds config.json, the weights and the tokenizer files (or give a "
                ".gguf file)"
            )
        shown = args.model
    elif _HUB_ID.fullmatch(args.model) is None:
        raise UserError(f"--model {args.model}: no such folder (nor a Hugging Face hub id)")
    else:
        shown = f"{args.model} (no such local folder, so looked up on the Hugging Face hub)"
    with reading("--model", shown):
        return load(args.model, dtype=args.dtype, device=args.device or "cpu")


def load_scorer(flag: str, path: str, model: PreTrainedModel) -> StopScorer:
    """A StopScorer checkpoint bound to ``model``: a missing or corrupt file, or a checkpoint of
    another model (its hidden size or LoRA shapes differ) is a UserError."""
    from stopkit.stop import StopScorer  # noqa: PLC0415

    with reading(flag, path):
        return StopScorer.load(path, model)


def prompt_format(args: argparse.Namespace | ModelSpec) -> PromptFormat:
    """The PromptFormat of ``add_prompt_args``'s options; a bad value is a UserError."""
    from stopkit.loading import PromptFormat  # noqa: PLC0415

    with options():
        return PromptFormat(
            template=args.prompt_template,
            system=args.system_prompt,
            reasoning_effort=args.reasoning_effort,
        )


def make_engine(args: argparse.Namespace | ModelSpec, model: PreTrainedModel) -> Engine:
    """A stopkit.Engine on ``model`` with the budget options of ``add_engine_args``; a bad value
    is a UserError naming the option."""
    from stopkit.engine import Engine  # noqa: PLC0415

    try:
        return Engine(
            model,
            num_blocks=args.num_blocks,
            kv_cache_memory=args.kv_cache_memory,
            max_num_seqs=args.max_num_seqs,
            max_batch_tokens=args.max_batch_tokens,
            compile=args.compile,
        )
    except (TypeError, ValueError) as e:
        flag = next(
            (
                f"--{k.replace('_', '-')}"
                for k in ("num_blocks", "kv_cache_memory", "max_num_seqs", "max_batch_tokens")
                if str(e).startswith(k)
            ),
            "engine",
        )
        raise UserError(f"{flag}: {e}") from e


def load_reasoner(args: argparse.Namespace | ModelSpec) -> ParallelReasoner:
    """A ParallelReasoner on ``--model`` with the StopScorer of ``--adapter`` when given, on an
    engine with the budget options."""
    from stopkit.reasoner import ParallelReasoner  # noqa: PLC0415

    model, tokenizer = load_model(args)
    scorer = load_scorer("--adapter", args.adapter, model) if args.adapter else None
    external: dict[str, Any] = {}
    if hasattr(args, "similarity_diversity"):
        external = dict(
            similarity_diversity=args.similarity_diversity,
            external_device=args.external_device,
            verifier_options={} if args.step_marker is None else {"step_marker": args.step_marker},
        )
    return ParallelReasoner(
        model,
        tokenizer,
        scorer=scorer,
        engine=make_engine(args, model),
        prompt=prompt_format(args),
        **external,
    )


def ray_pool(args: argparse.Namespace) -> RayPool | None:
    """A started stopkit.distributed.RayPool of ``--ray``, ``--workers``, ``--worker-threads`` and
    the model options (every worker has loaded the model); None without ``--ray``. A missing Ray,
    a cluster that cannot be reached or cannot hold the workers, and a model or adapter a worker
    cannot load are UserErrors."""
    if args.ray is None:
        if args.workers is not None:
            raise UserError("--workers needs --ray")
        return None
    with options():
        for flag, value in (("--workers", args.workers), ("--worker-threads", args.worker_threads)):
            if value is not None:
                check_int(flag, value, 1)
    prompt_format(args)  # a bad prompt option fails here, before any worker starts
    try:
        from stopkit.distributed import ModelSpec, RayPool, require_ray  # noqa: PLC0415

        require_ray()
    except ImportError as e:
        raise UserError(str(e)) from e
    pool = RayPool(
        ModelSpec.from_args(args, threads=args.worker_threads),
        workers=args.workers,
        address=args.ray or None,
    )
    try:
        with options():
            pool.start()
    except ConnectionError as e:
        raise UserError(f"--ray {args.ray}: {one_line(e)}") from e
    return pool


def load_problems(flag: str, path: str) -> list[dict]:
    """Problems from a JSONL file (stopkit.loading.load_problems)."""
    from stopkit.loading import load_problems as load  # noqa: PLC0415

    with reading(flag, path):
        return load(path)


def load_checker(spec: str | None) -> Checker:
    """The answer checker ``module:function`` of ``--checker`` (None: the built-in one)."""
    from stopkit.answers import load_checker as load  # noqa: PLC0415

    with options():
        return load(spec)


def output_dir(flag: str, path: str | Path) -> Path:
    """Output folder ``path``, created now (with its parents) so that a bad location fails before
    any work."""
    _writable_dir(flag, Path(path), Path(path))
    return Path(path)


def output_file(flag: str, path: str | Path) -> Path:
    """Output file ``path``: its folder is created now, and it must not be a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; expected a file path")
    _writable_dir(flag, path, path.parent)
    return path


def _writable_dir(flag: str, given: Path, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{flag} {given}: cannot create the folder {e.filename or folder} ({e.strerror or e})"
        ) from e
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {given}: the folder {folder} is not writable")
