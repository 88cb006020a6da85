"""Labelling and evaluation over a Ray cluster (``stopkit label --ray``, ``stopkit eval --ray``).

A :class:`RayPool` is the driver's handle on Ray actors: one per GPU (``num_gpus=1``) on a
cluster with GPUs, else ``workers`` CPU actors of ``threads`` torch threads each. Each actor loads
the model (and adapter) once from a :class:`ModelSpec` (the CLI's own options, loaded by the CLI's
own loaders) and keeps one engine loop: the chunks of problems it is handed join its engine's
scheduler as they arrive (a :class:`~stopkit.label.LabelRun` or a
:class:`~stopkit.reasoner.ReasoningRun`), so its batch does not drain between chunks. The driver
keeps ``chunks_per_worker`` small chunks in flight per actor and hands an actor a new one each
time one comes back, so fast actors take more.

The driver alone writes, through the same code as one process: :meth:`RayPool.label_problems`
through :func:`stopkit.label.write_labels`, and :func:`stopkit.evaluate.evaluate` /
:func:`~stopkit.evaluate.sweep` with the pool in place of the reasoner. Each problem's records
are written as soon as its chunk returns, and they equal those of a single-process run with the
same seed (every path and rollout draws from its own random stream; the order of the lines may
differ).

Faults. An actor that dies (killed, out of memory, its node lost) loses only its chunks in
flight, of which nothing was written: they go back to the queue for the other actors, so every
problem is written exactly once. The dead actor is not replaced: a lost GPU or node rarely comes
back soon, and a replacement that cannot be placed would hold chunks forever; when every actor is
dead the run stops with an error. A driver that dies takes its actors with it (they belong to its
Ray job); rerunning the same command skips what the output already holds.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from tqdm.auto import tqdm

from stopkit._checks import check_int

if TYPE_CHECKING:
    import argparse

    from stopkit.label import LabelRun, LabelTask
    from stopkit.loading import PromptFormat
    from stopkit.reasoner import ParallelReasoner, ReasoningRun, _Plan

__all__ = ["ModelSpec", "RayPool", "INSTALL_HINT", "require_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'Ray is not installed: pip install "stopkit[ray]"'


def require_ray() -> ModuleType:
    """The ``ray`` module; ImportError with :data:`INSTALL_HINT` when it is not installed."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads, under the names of the CLI's options (``--model``, ``--dtype``,
    ``--adapter``, the engine budget, the external methods' options, the prompt format), so that
    :func:`stopkit.cli.inputs.load_reasoner` reads it as it reads them. device: None for the
    cluster's GPUs when it has any (one per worker), else the CPU; ``"cuda"`` or ``"cpu"`` to
    choose. threads: torch threads of each CPU worker. Without num_blocks or kv_cache_memory, a
    CPU worker's KV cache takes the engine's default share of its node's RAM times threads / the
    node's CPUs, so that the workers a node holds fit in it together."""

    model: str
    dtype: str = "auto"
    device: str | None = None
    adapter: str | None = None
    num_blocks: int | None = None
    kv_cache_memory: int | float | None = None
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192
    compile: bool = False
    similarity_diversity: float = 0.0
    external_device: str | None = None
    step_marker: str | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    reasoning_effort: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        check_int("threads", self.threads, 1)
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(
                f"device must be cpu, cuda or None (the cluster's GPUs when it has "
                f"any), got {self.device!r}"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> ModelSpec:
        """The spec of a parsed command line (the options it has; ``overrides`` win). Paths that
        exist here are made absolute: workers on other nodes read them on a shared file system."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        for key in ("model", "adapter"):
            if given.get(key) and Path(given[key]).exists():
                given[key] = str(Path(given[key]).resolve())
        return cls(**{**given, **overrides})


class _Call:
    """One chunk handed to a worker: its results as they finish, and who waits for them. epoch:
    the driver's run it belongs to (an abort drops the chunks of its epoch and those before)."""

    def __init__(self, kind: str, items: list, arg: Any, epoch: int) -> None:
        self.kind, self.items, self.arg, self.epoch = kind, items, arg, epoch
        self.results: list = []
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def finish(self, result: tuple) -> None:
        self.results.append(result)
        if len(self.results) == len(self.items):
            self.future.set_result(self.results)


class _Run:
    """The open run of a worker's engine thread (labelling or solving) and the chunk each of its
    problems came in."""

    def __init__(self, reasoner: ParallelReasoner, kind: str) -> None:
        from stopkit.label import LabelRun
        from stopkit.reasoner import ReasoningRun

        self.kind = kind
        self.run: LabelRun | ReasoningRun
        if kind == "label":
            self.run = LabelRun(reasoner.engine, reasoner.tokenizer, reasoner.prompt)
        else:
            self.run = ReasoningRun(reasoner, progress=False)
        self.calls: list[_Call] = []
        self.owners: dict = {}  # label: problem id -> call; solve: run index -> (call, id, answer)
        self._index = itertools.count()

    def add(self, call: _Call) -> None:
        from stopkit.label import LabelRun

        self.calls.append(call)
        if isinstance(self.run, LabelRun):
            self.run.add(call.items, call.arg)
            self.owners.update((item[0], call) for item in call.items)
            return
        _, solve_kwargs = call.arg
        for pid, question, answer in call.items:
            i = next(self._index)
            self.run.add(question, index=i, **solve_kwargs)
            self.owners[i] = (call, pid, answer)

    def step(self) -> None:
        from stopkit.evaluate import problem_record
        from stopkit.label import LabelRun

        if isinstance(self.run, LabelRun):
            for pid, records, ended in self.run.step():
                self.owners.pop(pid).finish((pid, records, ended))
            return
        for i, solution in self.run.step():
            call, pid, answer = self.owners.pop(i)
            call.finish((pid, problem_record(solution, answer, call.arg[0])))

    @property
    def done(self) -> bool:
        return not self.owners

    def close(self, error: BaseException | None = None) -> None:
        """Free the engine; chunks not finished raise ``error``, or without one return nothing
        (dropped: no one waits for them)."""
        self.run.close()
        for c in self.calls:
            if not c.future.done():
                if error is None:
                    c.future.set_result([])
                else:
                    c.future.set_exception(error)


class _Worker:
    """A Ray actor (``ray.remote(_Worker)``): the model, adapter and engine of a :class:`ModelSpec`,
    loaded once by :meth:`load`, and one engine thread that runs every chunk handed to
    :meth:`label` / :meth:`solve` together on the engine's scheduler. Each of those calls runs in
    one of the actor's threads and blocks until its chunk is done."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._inbox: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._aborted = -1  # the last epoch aborted

    def load(self) -> str:
        """Load the model and start the engine thread; returns where it runs."""
        import ray

        from stopkit.cli.inputs import load_reasoner
        from stopkit.engine import CPU_MEMORY_SHARE

        self._set_threads()
        spec = self.spec
        if spec.device == "cpu" and spec.num_blocks is None and spec.kv_cache_memory is None:
            # the engine's default share of the RAM, split over the workers the node can hold
            node = ray.get_runtime_context().get_node_id()
            cpus = next(n["Resources"]["CPU"] for n in ray.nodes() if n["NodeID"] == node)
            spec = replace(spec, kv_cache_memory=CPU_MEMORY_SHARE * spec.threads / cpus)
        self.reasoner = load_reasoner(spec)
        threading.Thread(target=self._loop, name="stopkit-engine", daemon=True).start()
        return f"{os.uname().nodename} pid {os.getpid()} on {self.reasoner.engine.device}"

    def label(self, epoch: int, items: list, task: LabelTask) -> list:
        """Label ``items`` ((id, problem, prompt ids or None)) for ``task`` (a LabelTask);
        returns ``(id, records, traces ended in the prefix)`` per problem."""
        return self._submit(_Call("label", items, task, epoch))

    def solve(self, epoch: int, items: list, checker: Callable, solve_kwargs: dict) -> list:
        """Solve ``items`` ((id, question, answer)) with ``solve_kwargs``; returns ``(id,
        problem_record)`` per problem (:func:`stopkit.evaluate.problem_record`)."""
        return self._submit(_Call("solve", items, (checker, solve_kwargs), epoch))

    def abort(self, epoch: int) -> None:
        """Drop the chunks of ``epoch`` and before, in hand or still to come (they return
        nothing); the model stays loaded. Returns once the engine is free."""
        self._submit(_Call("abort", [None], None, epoch))

    def _submit(self, call: _Call) -> list:
        if not call.items:
            return []
        self._inbox.put(call)
        return call.future.result()

    def _set_threads(self) -> None:
        if self.spec.device == "cpu":  # in each thread: OpenMP's thread count is per thread
            import torch

            torch.set_num_threads(self.spec.threads)

    def _loop(self) -> None:
        """The engine thread: add the chunks that arrive to the open run (a chunk of the other
        kind waits until the run is done), step it, hand each chunk its results."""
        self._set_threads()
        run: _Run | None = None
        waiting: deque[_Call] = deque()
        while True:
            if run is None and not waiting:
                waiting.append(self._inbox.get())
            while True:
                try:
                    waiting.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            aborts = [c for c in waiting if c.kind == "abort"]
            if aborts:  # the driver left a run: drop its chunks (a worker has one run at a time)
                self._aborted = max(self._aborted, *(c.epoch for c in aborts))
                if run is not None:
                    run.close()
                    run = None
            for c in [c for c in waiting if c.epoch <= self._aborted]:
                waiting.remove(c)
                c.future.set_result([])
            if not waiting and run is None:
                continue
            try:
                while waiting and (run is None or waiting[0].kind == run.kind):
                    call = waiting.popleft()
                    if run is None:
                        run = _Run(self.reasoner, call.kind)
                    run.add(call)
                assert run is not None  # the loop above opened one: `waiting` was not empty
                run.step()
            except Exception as e:  # noqa: BLE001 (every error must reach its chunks' callers)
                # a bad chunk or a bug: its run's chunks all fail with it
                if run is None:
                    call.future.set_exception(e)
                else:
                    run.close(e)
                    run = None
                continue
            if run.done:
                run.close()
                run = None


class RayPool:
    """The driver's handle on the Ray workers of ``spec`` (module docstring); started on first use
    (so a run with nothing left to do loads nothing), stopped by :meth:`close` or ``with``.

    workers: how many (default: every GPU of the cluster, or CPUs // threads without GPUs).
    address: the cluster when Ray is not initialised yet: None starts a local instance, ``"auto"``
    joins the one running on this machine, else ``host:port`` or ``ray://host:port``.
    chunk_size: problems per chunk; chunks_per_worker: chunks in flight per worker (together they
    are what a worker's engine holds at once, and what a worker that dies hands back).

    It does what one process does, spread over the workers: :meth:`label_problems` (as
    :func:`stopkit.label.label_problems`), and it stands in for the reasoner of
    :func:`stopkit.evaluate.evaluate` and :func:`~stopkit.evaluate.sweep` (:meth:`check_args`,
    :meth:`solve_records`)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        workers: int | None = None,
        address: str | None = None,
        chunk_size: int = 1,
        chunks_per_worker: int = 8,
    ) -> None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        self.spec = spec
        self.workers = None if workers is None else check_int("workers", workers, 1)
        self.address = address
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.chunks_per_worker = check_int("chunks_per_worker", chunks_per_worker, 1)
        self.actors: list = []
        self._ray = require_ray()
        self._own_ray = False  # whether start() started Ray (then close() stops it)
        self._epoch = 0  # one per run handed out (_map): what an abort drops

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to Ray (when not yet), start the workers and wait until each has loaded the
        model; an error of loading (a bad path, a bad budget) is raised here as the worker raised
        it. Does nothing when started."""
        if self.actors:
            return
        ray = self._ray
        spec, workers = self.spec, self.workers
        if not ray.is_initialized():
            if self.address is None:  # a single-machine run: nothing listens beyond this host
                cpus = os.cpu_count() or 1
                if spec.device != "cuda":
                    cpus = max(cpus, (workers or 1) * spec.threads)
                ray.init(
                    address="local",
                    num_cpus=cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                )
                self._own_ray = True
            else:
                _check_reachable(self.address)
                ray.init(address=self.address)
        total = ray.cluster_resources()
        gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        device = (spec.device or ("cuda" if gpus else "cpu")).split(":")[0]
        if device == "cuda":
            if gpus == 0:
                raise ValueError("device cuda: the Ray cluster has no GPU")
            n = workers or gpus
            if n > gpus:
                raise ValueError(
                    f"workers must be <= {gpus}, the GPUs of the Ray cluster (one per "
                    f"worker), got {n}"
                )
            options = {"num_gpus": 1}
        else:
            n = workers or max(1, cpus // spec.threads)
            if n * spec.threads > cpus:
                raise ValueError(
                    f"workers ({n}) x threads ({spec.threads}) must be <= {cpus}, the "
                    f"CPUs of the Ray cluster"
                )
            options = {"num_cpus": spec.threads}
        spec = replace(spec, device=device)
        # a thread per chunk in flight (blocked until the engine thread finishes it) and one for
        # abort; Ray must not restart a worker or retry its calls: the driver gives its chunks to
        # the others
        actor = ray.remote(_Worker).options(
            max_concurrency=self.chunks_per_worker + 1,
            max_restarts=0,
            max_task_retries=0,
            **options,
        )
        actors = [actor.remote(spec) for _ in range(n)]
        try:
            where = ray.get([a.load.remote() for a in actors])
        except BaseException as e:  # noqa: BLE001 (_raise_cause re-raises it)
            for a in actors:
                ray.kill(a)
            _raise_cause(ray, e)
        self.actors = actors
        log.info("%d Ray workers: %s", n, "; ".join(where))

    def close(self) -> None:
        """Stop the workers, and Ray when :meth:`start` started it; the pool starts anew if used
        again."""
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._own_ray:
            self._ray.shutdown()
            self._own_ray = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the work --------------------------------------------------------------------------------
    @property
    def prompt(self) -> PromptFormat:
        """The workers' :class:`~stopkit.loading.PromptFormat` (as a reasoner's ``prompt``)."""
        from stopkit.loading import PromptFormat

        return PromptFormat(
            template=self.spec.prompt_template,
            system=self.spec.system_prompt,
            reasoning_effort=self.spec.reasoning_effort,
        )

    def label_problems(
        self,
        problems: Sequence[dict],
        out: str | Path,
        *,
        progress: bool = True,
        **task_fields: Any,
    ) -> dict[str, int]:
        """:func:`stopkit.label.label_problems` over the workers: the same records appended to
        ``out`` as each problem's chunk returns; ids already there are skipped. Returns its
        counts."""
        from stopkit.label import LabelTask, check_problems, write_labels

        task = LabelTask(**task_fields)
        items = check_problems(problems, None)
        return write_labels(
            out, items, lambda todo: self.label_stream(todo, task, progress=progress)
        )

    def label_stream(self, items: Sequence, task: LabelTask, *, progress: bool = True) -> Iterator:
        """:func:`stopkit.label.label_stream` over the workers: ``(id, records, traces ended in
        the prefix)`` per problem as its chunk returns."""
        return self._map("label", items, (task,), progress)

    def check_args(self, **kwargs: Any) -> _Plan:
        """Validate solve's arguments as the workers' reasoner will
        (:func:`stopkit.reasoner.check_solve_args`)."""
        from stopkit.reasoner import check_solve_args

        return check_solve_args(**kwargs, has_scorer=self.spec.adapter is not None)

    def solve_records(
        self,
        items: Sequence[tuple[str, object, object]],
        checker: Callable,
        *,
        progress: bool = True,
        **solve_kwargs: Any,
    ) -> Iterator[tuple[str, dict]]:
        """Solve ``items`` ((id, question, answer)) over the workers; yields ``(id,
        problem_record)`` per problem as its chunk returns (what :func:`stopkit.evaluate.evaluate`
        records)."""
        return self._map("solve", items, (checker, solve_kwargs), progress)

    def _map(self, method: str, items: Sequence, args: tuple, progress: bool) -> Iterator:
        """Hand ``items`` out in chunks, ``chunks_per_worker`` in flight per worker, a new one to a
        worker each time one returns; yield each chunk's results as it returns. The chunks of a
        worker that dies go back to the queue; if every worker dies, RuntimeError. Leaving the
        loop early (an interrupt, an error) aborts the chunks in flight, so nothing computes on
        for nobody, and keeps the workers for the next call."""
        ray = self._ray
        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.ObjectLostError,
        )
        self.start()
        self._epoch += 1
        refs = [ray.put(a) for a in args]  # shipped once, not once per chunk
        queued = deque(
            list(items[i : i + self.chunk_size]) for i in range(0, len(items), self.chunk_size)
        )
        in_flight: dict = {}  # ObjectRef -> (actor, chunk)
        load = dict.fromkeys(self.actors, 0)
        finished = False
        try:
            with tqdm(total=len(items), desc=method, unit="problem", disable=not progress) as bar:
                while queued or in_flight:
                    for a in self.actors:
                        while queued and load[a] < self.chunks_per_worker:
                            chunk = queued.popleft()
                            ref = getattr(a, method).remote(self._epoch, chunk, *refs)
                            in_flight[ref] = (a, chunk)
                            load[a] += 1
                    [ref], _ = ray.wait(list(in_flight), num_returns=1)
                    actor, chunk = in_flight.pop(ref)
                    try:
                        results = ray.get(ref)
                    except lost as e:
                        self._lose(actor, chunk, e, queued, in_flight, load)
                        continue
                    except ray.exceptions.RayTaskError as e:
                        _raise_cause(ray, e)
                    load[actor] -= 1
                    bar.update(len(results))
                    yield from results
            finished = True
        finally:
            if not finished and in_flight:
                self._abort()

    def _abort(self) -> None:
        """Make every worker drop what it has in hand; a worker that is gone is let go."""
        ray = self._ray
        refs = {a.abort.remote(self._epoch): a for a in self.actors}
        for ref, actor in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                ray.kill(actor)
                self.actors = [a for a in self.actors if a is not actor]

    def _lose(
        self,
        actor: Any,
        chunk: list,
        error: BaseException,
        queued: deque,
        in_flight: dict,
        load: dict,
    ) -> None:
        """``actor`` died running ``chunk``: that chunk and its others in flight go back to the
        front of the queue."""
        self._ray.kill(actor)  # one cut off, not dead, must not compute on
        self.actors = [a for a in self.actors if a is not actor]
        del load[actor]
        back = [chunk]
        for ref, (a, c) in list(in_flight.items()):
            if a is actor:
                back.append(c)
                del in_flight[ref]
        queued.extendleft(reversed(back))
        log.warning(
            "a Ray worker died (%s); its %d problems in flight go to the %d left",
            str(error).splitlines()[0],
            sum(map(len, back)),
            len(self.actors),
        )
        if not self.actors:
            raise RuntimeError(
                "every Ray worker died; rerun to resume (what is written is kept)"
            ) from error


def _raise_cause(ray: ModuleType, error: BaseException) -> NoReturn:
    """Raise what a worker raised, with its own type and message (Ray's wrapping, with the
    remote traceback, stays chained)."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        raise error.cause from error
    raise error


def _check_reachable(address: str) -> None:
    """ConnectionError at once when nothing answers at a ``host:port`` or ``ray://host:port``
    address (Ray would retry for minutes); ``auto`` is Ray's to resolve."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e})") from e
