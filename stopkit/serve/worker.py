"""The engine thread: the only thread that touches the engine.

A :class:`Worker` owns one :class:`~stopkit.reasoner.ReasoningRun` on the reasoner's engine and
steps it while questions are pending, so every request in flight runs in the same scheduler
(admitted as the KV budget allows, pruned, resumed, voted) beside the others. The asyncio side
talks to it through a thread-safe inbox: :meth:`Worker.submit` a :class:`Job`, :meth:`Worker.abort`
one (its paths end at once and their blocks are freed), ask for a :meth:`Worker.snapshot` of the
engine's state. The worker hands everything back on the job's event loop
(``loop.call_soon_threadsafe``) as events on the job's asyncio queue: ``("accepted", None)`` for a
streaming job once it is queued in the engine, ``("progress", {...})`` for a streaming job while its
paths decode, then ``("done", Solution)`` or ``("error", exception)``.

Failures stay local: a question the run refuses fails alone (:class:`BadRequest`); a step that
raises fails the questions it touched (those with a path admitted to the engine) and the worker
keeps going with the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stopkit.cache import CacheFullError
from stopkit.reasoner import ParallelReasoner, ReasoningRun

__all__ = ["Worker", "Job", "BadRequest", "RequestFailed", "ServerClosing", "RATE_WINDOW"]

log = logging.getLogger(__name__)

RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge is averaged


class BadRequest(Exception):
    """The run refused a question (an argument, or a request that can never fit the KV budget)."""


class RequestFailed(Exception):
    """The engine failed while running a question (a bug or a device error): the question is lost,
    the server goes on."""


class ServerClosing(Exception):
    """The server shut down before the question finished."""


@dataclass(eq=False)
class Job:
    """One question from one request. prompt: token ids; kwargs: :meth:`ReasoningRun.add`'s
    other arguments; stream: whether the client wants ``accepted`` and ``progress`` events.
    Created on the event loop ``loop``; its events arrive on ``events``."""

    prompt: list[int]
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int | None = None  # its index in the run, once added
    last_progress: dict | None = field(default=None, repr=False)

    def post(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the job's loop (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class _TokenRate:
    """Tokens per second over the last RATE_WINDOW seconds, from samples of a running total."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, now: float, total: int) -> None:
        if not self._samples or now - self._samples[-1][0] >= 0.5:
            self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()

    def rate(self, now: float, total: int) -> float:
        self.add(now, total)
        t0, n0 = self._samples[0]
        return (total - n0) / (now - t0) if now - t0 > 0 else 0.0


class Worker:
    """Steps a :class:`ReasoningRun` on ``reasoner``'s engine in its own thread (module
    docstring). progress_interval: seconds between two progress events of a streaming job."""

    def __init__(self, reasoner: ParallelReasoner, *, progress_interval: float = 0.2) -> None:
        self.reasoner = reasoner
        self.engine = reasoner.engine
        self.progress_interval = progress_interval
        self.error: str | None = None  # set when the engine is unusable (health fails)
        self.run: ReasoningRun  # opened by start
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # index in the run -> job
        self._next_index = 0
        self._tokens_before = 0  # tokens sampled by runs replaced after a failure
        self._rate = _TokenRate()
        self._last_progress = 0.0
        self._thread: threading.Thread | None = None

    # ---- the asyncio side (any thread) -------------------------------------------------------------
    def start(self) -> None:
        """Open the run and start the engine thread."""
        self.run = ReasoningRun(self.reasoner, progress=False)
        self._thread = threading.Thread(target=self._loop, name="stopkit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is left (ServerClosing), close the run and end the thread."""
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``'s question."""
        self._inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        """Drop ``job``'s question (nothing happens once it has finished)."""
        self._inbox.put(("abort", job))

    def snapshot(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        """Set ``future`` (of ``loop``) to the engine's state (:meth:`_snapshot`) between steps."""
        self._inbox.put(("snapshot", (loop, future)))

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            items = self._drain(block=not self.run.pending)
            for i, (kind, item) in enumerate(items):
                if kind == "stop":
                    self._close(items[i + 1 :] + self._drain(block=False))
                    return
                try:
                    if kind == "add":
                        self._add(item)
                    elif kind == "abort":
                        self._abort(item)
                    else:
                        self._reply(*item)
                except Exception as e:  # a bug: fail what it touched, keep serving
                    log.exception("the engine thread failed on %s", kind)
                    self._recover(RequestFailed(f"internal error: {type(e).__name__}: {e}"))
            if self.run.pending:
                try:
                    self._step()
                except Exception as e:
                    log.exception("an engine step failed; failing the requests it was running")
                    self._recover(
                        RequestFailed(
                            f"the engine failed while running this request: {type(e).__name__}: {e}"
                        )
                    )

    def _reply(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        snapshot = self._snapshot()
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_set_result, future, snapshot)

    def _drain(self, block: bool) -> list[tuple[str, Any]]:
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _add(self, job: Job) -> None:
        if self.error is not None:
            job.post("error", RequestFailed(self.error))
            return
        try:
            self.run.add(job.prompt, index=self._next_index, **job.kwargs)
        except (ValueError, TypeError, CacheFullError) as e:
            job.post("error", BadRequest(str(e)))
            return
        except Exception as e:  # add raises before queueing anything: only this job fails
            log.exception("adding a request failed")
            job.post("error", RequestFailed(f"internal error: {type(e).__name__}: {e}"))
            return
        job.index = self._next_index
        self._jobs[job.index] = job
        self._next_index += 1
        if job.stream:
            job.post("accepted")

    def _abort(self, job: Job) -> None:
        if job.index is not None and self._jobs.pop(job.index, None) is not None:
            self.run.abort(job.index)
            log.debug("request %d aborted", job.index)

    def _step(self) -> None:
        done = self.run.step()
        for index, solution in done:
            job = self._jobs.pop(index, None)
            if job is not None:
                job.post("done", solution)
        now = time.perf_counter()
        self._rate.add(now, self._tokens())
        if now - self._last_progress >= self.progress_interval:
            self._last_progress = now
            self._post_progress()

    def _post_progress(self) -> None:
        streaming = [job for job in self._jobs.values() if job.stream]
        if not streaming:
            return
        progress = self.run.progress()
        for job in streaming:
            p = progress.get(job.index) if job.index is not None else None
            if p is not None and p != job.last_progress:
                job.last_progress = p
                job.post("progress", p)

    def _recover(self, error: Exception) -> None:
        """After a failed step: fail and abort the questions it touched (a path admitted) and
        those the run lost; the others stay queued. If that fails too, start a fresh run."""
        try:
            progress = self.run.progress()
            for index, job in list(self._jobs.items()):
                p = progress.get(index)
                if p is None or p["started"]:
                    if p is not None:
                        self.run.abort(index)
                    del self._jobs[index]
                    job.post("error", error)
        except Exception:
            log.exception("could not drop the failed requests; starting a fresh run")
            for job in self._jobs.values():
                job.post("error", error)
            self._jobs.clear()
            self._tokens_before += self.run.sampled_tokens
            try:
                self.run.close()
                self.run = ReasoningRun(self.reasoner, progress=False)
            except Exception as e:
                self.error = f"the engine is unusable after an error: {type(e).__name__}: {e}"
                log.exception(self.error)

    def _close(self, unread: list[tuple[str, Any]]) -> None:
        """Fail every job (those in the run and those still in the inbox) and close the run."""
        closing = ServerClosing("the server is shutting down")
        for job in self._jobs.values():
            job.post("error", closing)
        self._jobs.clear()
        try:
            self.run.close()
        except Exception:
            log.exception("closing the run failed")
        for kind, item in unread:
            if kind == "add":
                item.post("error", closing)
            elif kind == "snapshot":
                self._reply(*item)

    def _tokens(self) -> int:
        return self._tokens_before + self.run.sampled_tokens

    def _snapshot(self) -> dict[str, float]:
        """The engine's state for the metrics: questions running (a path admitted) and waiting
        in the run, paths in the KV cache, blocks used and total, tokens sampled (total and per
        second), preemptions, steps."""
        progress = self.run.progress()
        running = sum(p["started"] for p in progress.values())
        cache, stats = self.engine.cache, self.engine.stats
        tokens = self._tokens()
        return {
            "running": running,
            "waiting": len(progress) - running,
            "running_paths": len(self.engine.scheduler.running),
            "blocks_used": cache.num_blocks - cache.num_free_blocks,
            "blocks_total": cache.num_blocks,
            "generated_tokens": tokens,
            "tokens_per_second": self._rate.rate(time.perf_counter(), tokens),
            "preemptions": stats.preemptions,
            "steps": stats.steps,
        }


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # the caller may have given up waiting
        future.set_result(value)
