"""The OpenAI wire format of ``stopkit serve``: the request schemas (pydantic), and the responses,
stream chunks and errors built from a :class:`~stopkit.reasoner.Solution`.

A response's ``choices`` are the paths that voted (launch order; ``finish_reason`` "stop" for EOS,
"length" for max_tokens), each with a ``stopkit`` object (the path's index among the n launched,
its answer, score, token count, token ids on request); the response's ``stopkit`` object carries
the voted answer, the votes, the paths' fate, the token counts (launch / check / resume) and the
phase times. ``usage.completion_tokens`` counts every sampled token of every path, pruned prefixes
included.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stopkit.reasoner import Solution

__all__ = [
    "StopkitOptions",
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "UNSUPPORTED",
    "completion_response",
    "result_chunks",
    "progress_chunk",
    "error_body",
    "sse",
]

Kind = Literal["chat", "text"]
FINISH_REASONS = {"eos": "stop", "length": "length"}  # the voting paths' ends, in OpenAI's words
# OpenAI fields stopkit cannot honour: refused when set to anything but their neutral value
UNSUPPORTED = (
    "stop",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "functions",
    "echo",
    "suffix",
    "best_of",
)
_NEUTRAL: tuple[object, ...] = (
    None,
    False,
    0,
    [],
    {},
    "",
)  # e.g. penalties 0, logprobs false (and best_of 1)


class StopkitOptions(BaseModel):
    """The request's ``stopkit`` object: STOP's options (the server's defaults when absent).
    return_token_ids: add each voting path's token ids to its choice."""

    model_config = ConfigDict(strict=True, extra="forbid")

    method: str | None = None
    keep: int | None = None
    prefix_tokens: int | None = None
    vote: str | None = None
    early_stop: int | None = None
    schedule: list[list[int]] | None = None
    return_token_ids: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share. ``n`` is the number of paths launched (N); unknown fields are
    ignored, the unsupported OpenAI ones (UNSUPPORTED) refused."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stopkit: StopkitOptions | None = None

    def unsupported(self) -> str | None:
        """The first UNSUPPORTED field the request sets, None when it sets none."""
        extra = self.model_extra or {}
        return next(
            (
                f
                for f in UNSUPPORTED
                if extra.get(f) not in _NEUTRAL and not (f == "best_of" and extra[f] == 1)
            ),
            None,
        )


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens


class CompletionRequest(_Request):
    prompt: str | list[int]


# ---- responses ------------------------------------------------------------------------------------
def _answer(a: Hashable | None) -> str | None:
    return None if a is None else str(a)


def _choices(kind: Kind, sol: Solution, token_ids: bool, *, delta: bool = False) -> list[dict]:
    out = []
    voters = [(index, path) for index, path in enumerate(sol.paths) if path.voted]
    for i, (index, path) in enumerate(voters):
        info: dict[str, Any] = {
            "path": index,
            "answer": _answer(path.answer),
            "score": path.score,
            "finished_in_prefix": path.finished_in_prefix,
            "num_tokens": len(path.tokens),
        }
        if token_ids:
            info["token_ids"] = list(path.tokens)
        choice: dict[str, Any] = {"index": i}
        if kind == "text":
            choice["text"] = path.text
        elif delta:
            choice["delta"] = {"role": "assistant", "content": path.text}
        else:
            choice["message"] = {"role": "assistant", "content": path.text}
        choice.update(logprobs=None, finish_reason=FINISH_REASONS[path.finish_reason], stopkit=info)
        out.append(choice)
    return out


def _result(sol: Solution, *, method: str, seed: int) -> dict:
    paths = sol.paths
    return {
        "answer": _answer(sol.answer),
        "votes": {str(a): w for a, w in sol.votes.items()},
        "method": method,
        "seed": seed,
        "paths": {
            "launched": len(paths),
            "voted": sum(p.voted for p in paths),
            "pruned": sum(p.pruned for p in paths),
            "finished_in_prefix": sum(p.finished_in_prefix for p in paths),
            "early_stopped": sum(p.finish_reason == "early_stop" for p in paths),
        },
        "tokens": dict(sol.tokens),
        "phases": dict(sol.phases),
        "seconds": sol.seconds,
    }


def _usage(prompt_tokens: int, sol: Solution) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sol.generated_tokens,
        "total_tokens": prompt_tokens + sol.generated_tokens,
    }


def _head(kind: Kind, rid: str, created: int, model: str, chunk: bool) -> dict:
    obj = (
        ("chat.completion.chunk" if chunk else "chat.completion")
        if kind == "chat"
        else "text_completion"
    )
    return {"id": rid, "object": obj, "created": created, "model": model}


def completion_response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    sol: Solution,
    *,
    prompt_tokens: int,
    method: str,
    seed: int,
    token_ids: bool,
) -> dict:
    """The whole (non-streamed) response of a solved question."""
    return {
        **_head(kind, rid, created, model, False),
        "choices": _choices(kind, sol, token_ids),
        "usage": _usage(prompt_tokens, sol),
        "stopkit": _result(sol, method=method, seed=seed),
    }


def progress_chunk(kind: Kind, rid: str, created: int, model: str, progress: dict) -> dict:
    """A stream chunk with no choices and ``stopkit.progress``: phase ("queued": no path in the
    engine yet, "launch": decoding prefixes, "resume": past the first check), tokens sampled so
    far over all paths, paths still live."""
    phase = (
        "queued" if not progress["started"] else "launch" if not progress["checks"] else "resume"
    )
    return {
        **_head(kind, rid, created, model, True),
        "choices": [],
        "stopkit": {
            "progress": {
                "phase": phase,
                "tokens": progress["tokens"],
                "live_paths": progress["live_paths"],
            }
        },
    }


def result_chunks(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    sol: Solution,
    *,
    prompt_tokens: int,
    method: str,
    seed: int,
    token_ids: bool,
    include_usage: bool,
) -> list[dict]:
    """The stream's last chunks: one per voting path, then one with no choices carrying the
    ``stopkit`` result (and the usage when the client asked for it)."""
    head = _head(kind, rid, created, model, True)
    chunks = [{**head, "choices": [c]} for c in _choices(kind, sol, token_ids, delta=True)]
    chunks.append(
        {
            **head,
            "choices": [],
            "usage": _usage(prompt_tokens, sol) if include_usage else None,
            "stopkit": _result(sol, method=method, seed=seed),
        }
    )
    return chunks


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(
        status, "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
