"""Where a user error ends and a bug begins.

A :class:`UserError` is printed by :func:`stopkit.cli.main` as one line, ``stopkit <command>:
<message>``, with exit status 2. Commands raise it themselves or get it from one of two delimited
phases that run before any engine work:

- :func:`options`: checking option values. TypeError and ValueError raised inside are the user's.
- :func:`reading`: opening and parsing what the user points at (a model, a checkpoint, a JSONL
  file). The errors a missing, unreadable, truncated or mismatched input raises
  (:data:`INPUT_ERRORS`) are the user's.

Anything raised after these phases, or of another type inside them, is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

__all__ = ["UserError", "options", "reading", "INPUT_ERRORS"]

# What reading a bad input raises: missing or unreadable paths (OSError, which transformers also
# raises for a folder that is not a model), a parse error or an input that does not fit
# (ValueError, JSONDecodeError among them), a truncated or corrupt checkpoint (EOFError,
# UnpicklingError, RuntimeError from torch.load, safetensors' SafetensorError, added on first use).
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    RuntimeError,
)


class UserError(Exception):
    """A mistake in what the user gave (an option, a path, a file's content); its message is one
    line that names the culprit and what was expected. ``prog``: who reports it (``"stopkit
    solve"``), when known where it is raised (argument parsing)."""

    def __init__(self, message: str, *, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


@contextlib.contextmanager
def options() -> Iterator[None]:
    """Checking option values: a TypeError or ValueError raised inside becomes a UserError."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise UserError(one_line(e)) from e


@contextlib.contextmanager
def reading(what: str, path: str | Path | None = None) -> Iterator[None]:
    """Reading ``what`` (e.g. ``"--adapter"``) at ``path``: an error of :data:`INPUT_ERRORS`
    raised inside becomes a UserError naming them (unless its message names the path already)."""
    try:
        yield
    except _input_errors() as e:
        message = one_line(e)
        if path is None or str(path) not in message:
            message = f"cannot read {what}{'' if path is None else f' {path}'}: {message}"
        raise UserError(message) from e


def _input_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError  # noqa: PLC0415 (only once something failed)

    return (*INPUT_ERRORS, SafetensorError)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (runs of whitespace and newlines become one space; an
    OSError reads ``<reason>: <file>``; an empty message gives the exception's type)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__
