"""The HTTP side of ``stopkit serve``: an OpenAI-compatible FastAPI app over one engine thread.

Routes: ``POST /v1/chat/completions`` (messages through the tokenizer's chat template; a single
user message is the prompt as :func:`stopkit.loading.prompt_ids` builds it, so it also works with a
tokenizer that has no template), ``POST /v1/completions`` (a raw prompt: a string, tokenized as is,
or token ids), ``GET /health``, ``GET /v1/models``, ``GET /metrics``.

Every request is checked here, on the event loop, before it reaches the engine: a bad one gets
HTTP 400 with OpenAI's error object naming the field (``param``), an unknown model 404; when
``max_queue`` requests are already in flight (running or waiting) the next gets 503. An accepted
request becomes a :class:`~stopkit.serve.worker.Job` for the engine thread, which runs it beside
every other in the scheduler. A client that disconnects has its question aborted at once (its
paths end and their KV blocks are freed). ``stream=true`` sends server-sent events in OpenAI's
chunk format: progress chunks (no choices, ``stopkit.progress``) while the paths decode, then one
chunk per voting path, a last chunk with the ``stopkit`` result, and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from stopkit._checks import check_int, check_real, check_token_ids
from stopkit.loading import prompt_ids
from stopkit.reasoner import ParallelReasoner, check_solve_args
from stopkit.serve.metrics import CONTENT_TYPE, Metrics
from stopkit.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Kind,
    StopkitOptions,
    completion_response,
    error_body,
    progress_chunk,
    result_chunks,
    sse,
)
from stopkit.serve.worker import BadRequest, Job, RequestFailed, ServerClosing, Worker

__all__ = ["create_app", "Defaults", "ApiError"]

log = logging.getLogger(__name__)

# check_solve_args names its argument first in its messages; the request field it comes from
_SOLVE_PARAMS = {
    "n": "n",
    "max_new_tokens": "max_tokens",
    "method": "stopkit.method",
    "keep": "stopkit.keep",
    "prefix_tokens": "stopkit.prefix_tokens",
    "vote": "stopkit.vote",
    "early_stop": "stopkit.early_stop",
    "schedule": "stopkit.schedule",
}


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out (``stopkit serve``'s options)."""

    n: int = 64
    keep: int = 8
    prefix_tokens: int = 2048
    max_new_tokens: int = 8192
    method: str = "stop"
    vote: str = "majority"
    early_stop: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95


class ApiError(Exception):
    """An error answered with OpenAI's error object: HTTP ``status``, ``message``, ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


_T = TypeVar("_T")
_Body = TypeVar("_Body", bound=BaseModel)


def _pick(value: _T | None, default: _T) -> _T:
    return default if value is None else value


@dataclass(eq=False)
class _Accepted:
    """A request handed to the engine thread: its job and what its response needs."""

    job: Job
    kind: Kind
    rid: str
    created: int
    prompt_tokens: int
    method: str
    seed: int
    token_ids: bool
    include_usage: bool
    t0: float


class _Server:
    """The state the routes share, used on the event loop only."""

    def __init__(
        self,
        reasoner: ParallelReasoner,
        *,
        model_name: str,
        defaults: Defaults,
        max_queue: int,
        progress_interval: float,
    ) -> None:
        self.reasoner = reasoner
        self.worker = Worker(reasoner, progress_interval=progress_interval)
        # the loop's own copy: the engine thread decodes with the reasoner's, and a fast
        # tokenizer must not be used from two threads at once
        self.tokenizer = copy.deepcopy(reasoner.tokenizer)
        engine = reasoner.engine
        config = engine.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context: int | None = getattr(text, "max_position_embeddings", None)
        self.vocab_size = engine.vocab_size
        self.max_num_seqs = engine.max_num_seqs
        self.has_scorer = reasoner.scorer is not None
        check_solve_args(
            n=defaults.n,
            keep=defaults.keep,
            prefix_tokens=defaults.prefix_tokens,
            max_new_tokens=defaults.max_new_tokens,
            method=defaults.method,
            vote=defaults.vote,
            early_stop=defaults.early_stop,
            has_scorer=self.has_scorer,
        )
        self.model_name, self.defaults = model_name, defaults
        self.max_queue = check_int("max_queue", max_queue, 1)
        self.created = int(time.time())
        self.in_flight: set[Job] = set()
        self.metrics = Metrics()

    # ---- checking a request ----------------------------------------------------------------------
    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        texts = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                if any(part.type != "text" or part.text is None for part in m.content):
                    raise ApiError(
                        400, "only text content parts are supported", f"messages[{i}].content"
                    )
                texts.append("".join(part.text or "" for part in m.content))  # all str (above)
            else:
                texts.append(m.content or "")
        if len(messages) == 1 and messages[0].role == "user":
            return prompt_ids(self.tokenizer, texts[0])
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(
                400,
                "this model's tokenizer has no chat template: send a single user "
                "message (its text is the prompt) or use /v1/completions",
                "messages",
            )
        try:
            text = self.tokenizer.apply_chat_template(
                [
                    {**(m.model_extra or {}), "role": m.role, "content": t}
                    for m, t in zip(messages, texts, strict=True)
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # the template refuses these messages (e.g. roles)
            raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from e
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"]) if prompt else []
            if not ids:
                raise ApiError(400, "prompt must not be empty", "prompt")
            return ids
        try:
            return check_token_ids("prompt", prompt, self.vocab_size)
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e), "prompt") from e

    def accept(self, body: ChatCompletionRequest | CompletionRequest, kind: Kind) -> _Accepted:
        """Check ``body`` (ApiError naming the field), build its job and count it in flight
        (ApiError 503 when ``max_queue`` are already)."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"the model `{body.model}` does not exist; this server serves `{self.model_name}`",
                "model",
            )
        if (field := body.unsupported()) is not None:
            raise ApiError(400, f"{field} is not supported by stopkit serve", field)
        prompt_param = "messages" if kind == "chat" else "prompt"
        prompt = (
            self.chat_prompt(body.messages)
            if isinstance(body, ChatCompletionRequest)
            else self.text_prompt(body.prompt)
        )
        o, d = body.stopkit or StopkitOptions(), self.defaults
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if self.context is not None:
            room = self.context - len(prompt)
            if room < 2:
                raise ApiError(
                    400,
                    f"the prompt has {len(prompt)} tokens; the model's context is "
                    f"{self.context} tokens, with room for at least 2 new ones",
                    prompt_param,
                )
            if max_tokens is None:
                max_tokens = min(d.max_new_tokens, room)
            elif max_tokens > room:
                raise ApiError(
                    400,
                    f"max_tokens must be <= {room} (the model's context of "
                    f"{self.context} tokens minus the prompt's {len(prompt)}), got "
                    f"{max_tokens}",
                    "max_tokens",
                )
        kwargs: dict[str, Any] = dict(
            n=_pick(body.n, d.n),
            keep=_pick(o.keep, d.keep),
            prefix_tokens=_pick(o.prefix_tokens, d.prefix_tokens),
            max_new_tokens=_pick(max_tokens, d.max_new_tokens),
            method=_pick(o.method, d.method),
            vote=_pick(o.vote, d.vote),
            early_stop=_pick(o.early_stop, d.early_stop),
            schedule=None if o.schedule is None else [tuple(s) for s in o.schedule],
        )
        try:
            check_solve_args(**kwargs, has_scorer=self.has_scorer)
        except (TypeError, ValueError) as e:
            name = str(e).split(" ", 1)[0].split("[", 1)[0]
            raise ApiError(
                400, str(e).replace("max_new_tokens", "max_tokens"), _SOLVE_PARAMS.get(name)
            ) from e
        if kwargs["n"] > self.max_num_seqs:
            raise ApiError(
                400,
                f"n must be <= {self.max_num_seqs} (the server's --max-num-seqs: a "
                f"request's paths run together), got {kwargs['n']}",
                "n",
            )
        seed = secrets.randbits(31) if body.seed is None else body.seed
        for name, check, value in (
            (
                "temperature",
                lambda v: check_real("temperature", v, 0.0),
                _pick(body.temperature, d.temperature),
            ),
            (
                "top_p",
                lambda v: check_real("top_p", v, 0.0, 1.0, low_open=True),
                _pick(body.top_p, d.top_p),
            ),
            ("top_k", lambda v: check_int("top_k", v, 0), _pick(body.top_k, 0)),
            ("min_p", lambda v: check_real("min_p", v, 0.0, 1.0), _pick(body.min_p, 0.0)),
            ("seed", lambda v: check_int("seed", v, 0), seed),
        ):
            try:
                kwargs[name] = check(value)
            except (TypeError, ValueError) as e:
                raise ApiError(400, str(e), name) from e
        if len(self.in_flight) >= self.max_queue:
            raise ApiError(
                503,
                f"the server is at its limit of {self.max_queue} requests in flight; retry later",
            )
        job = Job(prompt, kwargs, asyncio.get_running_loop(), stream=body.stream)
        self.in_flight.add(job)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _Accepted(
            job,
            kind,
            f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            int(time.time()),
            len(prompt),
            kwargs["method"],
            seed,
            o.return_token_ids,
            include_usage,
            time.perf_counter(),
        )

    def finish(self, a: _Accepted, outcome: str) -> None:
        """The request is over (idempotent): count it, and abort its question when the client
        went away first."""
        if a.job not in self.in_flight:
            return
        self.in_flight.discard(a.job)
        if outcome == "aborted":
            self.worker.abort(a.job)
        elif outcome == "ok":
            self.metrics.observe_latency(time.perf_counter() - a.t0)
        self.metrics.count(outcome)

    # ---- answering ---------------------------------------------------------------------------------
    async def respond(self, request: Request, a: _Accepted) -> Response:
        self.worker.submit(a.job)
        try:
            event = await _next_event(a.job, request)
        except BaseException:  # the handler was cancelled (the server is stopping)
            self.finish(a, "aborted")
            raise
        if event is None:
            self.finish(a, "aborted")
            return Response(status_code=499)  # nobody reads it: the client is gone
        kind, payload = event
        if kind == "error":
            self.finish(a, "bad_request" if isinstance(payload, BadRequest) else "failed")
            e = _api_error(payload)
            return _error(e.status, str(e), e.param)
        if kind == "accepted":  # stream: the engine took it; the rest goes as events
            return _EventStream(self._events(a), on_close=lambda: self.finish(a, "aborted"))
        self.finish(a, "ok")
        return JSONResponse(
            completion_response(
                a.kind,
                a.rid,
                a.created,
                self.model_name,
                payload,
                prompt_tokens=a.prompt_tokens,
                method=a.method,
                seed=a.seed,
                token_ids=a.token_ids,
            )
        )

    async def _events(self, a: _Accepted) -> AsyncIterator[str]:
        yield sse(
            progress_chunk(
                a.kind,
                a.rid,
                a.created,
                self.model_name,
                {"tokens": 0, "live_paths": a.job.kwargs["n"], "checks": 0, "started": False},
            )
        )
        while True:
            kind, payload = await a.job.events.get()
            if kind == "progress":
                yield sse(progress_chunk(a.kind, a.rid, a.created, self.model_name, payload))
                continue
            if kind == "done":
                self.finish(a, "ok")
                for chunk in result_chunks(
                    a.kind,
                    a.rid,
                    a.created,
                    self.model_name,
                    payload,
                    prompt_tokens=a.prompt_tokens,
                    method=a.method,
                    seed=a.seed,
                    token_ids=a.token_ids,
                    include_usage=a.include_usage,
                ):
                    yield sse(chunk)
            else:
                self.finish(a, "bad_request" if isinstance(payload, BadRequest) else "failed")
                e = _api_error(payload)
                yield sse(error_body(e.status, str(e), e.param))
            yield sse("[DONE]")
            return


class _EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (a client that went away
    included, even before the first event)."""

    def __init__(self, events: AsyncIterator[str], *, on_close: Callable[[], None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, request: Request) -> tuple[str, Any] | None:
    """The job's next event, None when the client disconnected first."""
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not get.done():
            get.cancel()
    return get.result() if get.done() and not get.cancelled() else None


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, BadRequest):
        return ApiError(400, str(e))
    if isinstance(e, ServerClosing):
        return ApiError(503, str(e))
    return ApiError(500, str(e) if isinstance(e, RequestFailed) else "internal error")


async def _parse(request: Request, schema: type[_Body]) -> _Body:
    """The request's JSON body as ``schema`` (whatever its Content-Type: curl's -d sends a form
    type); ApiError 400 naming the field otherwise."""
    try:
        data = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        raise ApiError(400, f"{param}: {err['msg']}", param) from None


def _param(loc: tuple) -> str | None:
    """``("stopkit", "keep")`` -> ``"stopkit.keep"``, ``("messages", 0, "content")`` ->
    ``"messages[0].content"``; pydantic's union-member tags (``"str"``, ``"list[int]"``) are
    dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            "[" in part
            or part in ("str", "int", "float", "bool", "list", "dict", "none")
            or part.startswith("function-")
        ):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def _error(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def create_app(
    reasoner: ParallelReasoner,
    *,
    model_name: str,
    defaults: Defaults = Defaults(),
    max_queue: int = 512,
    progress_interval: float = 0.2,
) -> FastAPI:
    """The server's app on ``reasoner`` (its engine is the server's own from now on: the engine
    thread starts with the app and stops with it). model_name: the id of ``/v1/models`` (a
    request naming another model gets 404); defaults: what requests leave out; max_queue:
    requests in flight (running and waiting) at most, more get 503; progress_interval: seconds
    between two progress chunks of a stream."""
    server = _Server(
        reasoner,
        model_name=model_name,
        defaults=defaults,
        max_queue=max_queue,
        progress_interval=progress_interval,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.worker.stop)

    app = FastAPI(
        title="stopkit", summary="OpenAI-compatible parallel reasoning with STOP", lifespan=lifespan
    )
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        server.metrics.count("overloaded" if e.status == 503 else "bad_request")
        return _error(e.status, str(e), e.param, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("error answering %s", request.url.path, exc_info=e)
        return _error(500, f"internal error: {type(e).__name__}")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        return await server.respond(request, server.accept(body, "chat"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        return await server.respond(request, server.accept(body, "text"))

    @app.get("/health")
    async def health() -> Response:
        if server.worker.error is not None or not server.worker.alive:
            return _error(503, server.worker.error or "the engine thread is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": server.model_name,
                        "object": "model",
                        "created": server.created,
                        "owned_by": "stopkit",
                        "max_model_len": server.context,
                    }
                ],
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        if not server.worker.alive:
            return _error(503, "the engine thread is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        server.worker.snapshot(loop, future)
        snapshot = await future
        return Response(
            server.metrics.render(snapshot, len(server.in_flight)), media_type=CONTENT_TYPE
        )

    return app
