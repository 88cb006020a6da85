"""Labelling and evaluation over Ray (stopkit.distributed) on one local cluster with two CPU
workers and the toy model: the same records as one process, a worker killed mid-run, interrupted
runs that resume (through the CLI's --ray), and the CLI without Ray."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from stopkit import evaluate as ev
from stopkit.cli import build_parser, main
from stopkit.distributed import ModelSpec, RayPool, _check_reachable, _Worker
from stopkit.engine import Engine
from stopkit.label import LabelTask, check_problems, label_problems, label_stream, write_labels
from stopkit.loading import PromptFormat
from stopkit.reasoner import ParallelReasoner
from stopkit.stop import StopScorer
from stopkit.toy import (
    ADAPTER_DIR,
    MAX_NEW_TOKENS,
    MODEL_DIR,
    PREFIX_TOKENS,
    TEMPERATURE,
    load_model,
)
from stopkit.toy.task import check, generate

# as `stopkit label` reads them (answers as str); check(text, answer) compares with int(answer)
PROBLEMS = [
    {"id": f"q{i}", "question": p.question, "answer": str(p.answer)}
    for i, p in enumerate(generate(16, seed=7, split="train"))
]
TASK = dict(
    prefix_tokens=PREFIX_TOKENS,
    rollouts=4,
    traces=2,
    max_new_tokens=MAX_NEW_TOKENS,
    temperature=TEMPERATURE,
    top_p=1.0,
    seed=3,
    checker=check,
)
METHODS = "full,stop,random"
SOLVE = dict(
    n=6,
    keep=2,
    prefix_tokens=PREFIX_TOKENS,
    max_new_tokens=MAX_NEW_TOKENS,
    seeds=[0, 1],
    temperature=TEMPERATURE,
    top_p=1.0,
    checker=check,
    progress=False,
)
SWEEP = {k: v for k, v in SOLVE.items() if k not in ("keep", "prefix_tokens")}
SPEC = ModelSpec(str(MODEL_DIR), adapter=str(ADAPTER_DIR))
ROOT = Path(__file__).resolve().parents[1]


def label_argv(problems, out, *ray) -> list[str]:
    """``stopkit label`` of TASK on the problems file ``problems``, with ``--ray *ray``."""
    return [
        "label",
        "--ray",
        *ray,
        "--workers",
        "2",
        "--model",
        str(MODEL_DIR),
        "--problems",
        str(problems),
        "--out",
        str(out),
        "--prefix-tokens",
        str(PREFIX_TOKENS),
        "--rollouts",
        "4",
        "--traces",
        "2",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--temperature",
        str(TEMPERATURE),
        "--top-p",
        "1.0",
        "--seed",
        "3",
        "--checker",
        "stopkit.toy.task:check",
    ]


def write_problems(path, problems) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs on however many cores: the shared pool and the CLI's, of 2 workers each, fit
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    with RayPool(SPEC, workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process outputs: label lines, and eval and sweep records."""
    root = tmp_path_factory.mktemp("one-process")
    model, tokenizer = load_model()
    label_problems(model, tokenizer, PROBLEMS, root / "labels.jsonl", progress=False, **TASK)
    reasoner = ParallelReasoner(model, tokenizer, scorer=StopScorer.load(ADAPTER_DIR, model))
    ev.evaluate(reasoner, PROBLEMS[:6], METHODS, out=root / "eval", **SOLVE)
    ev.sweep(
        reasoner,
        PROBLEMS[:6],
        "stop",
        keeps=[1, 2],
        prefixes=[6, PREFIX_TOKENS],
        out=root / "sweep",
        **SWEEP,
    )
    return {
        "labels": lines(root / "labels.jsonl"),
        "eval": records(root / "eval"),
        "sweep": records(root / "sweep"),
    }


def lines(path) -> list[str]:
    return sorted(path.read_text().splitlines())


def records(folder) -> list[str]:
    """records.jsonl without the timings (what differs between any two runs)."""
    out = []
    for line in (folder / ev.RECORDS).read_text().splitlines():
        rec = json.loads(line)
        del rec["seconds"], rec["latency"]
        out.append(json.dumps(rec, sort_keys=True))
    return sorted(out)


def wait_for_free_cpus(n: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) != n:
        assert time.monotonic() < deadline, f"{ray.available_resources()} after {timeout} s"
        time.sleep(0.1)


def interrupt_after(k: int, stream):
    """Pass on ``k`` results of ``stream``, then raise KeyboardInterrupt (a Ctrl-C), leaving the
    stream as a Ctrl-C inside it would."""
    with contextlib.closing(stream):
        for i, result in enumerate(stream):
            if i == k:
                raise KeyboardInterrupt
            yield result


def test_label_eval_and_sweep_over_ray_equal_one_process(pool, one_process, tmp_path):
    stats = pool.label_problems(PROBLEMS, tmp_path / "labels.jsonl", progress=False, **TASK)
    assert stats["problems"] == 16 and stats["records"] == 32
    assert lines(tmp_path / "labels.jsonl") == one_process["labels"]
    result = ev.evaluate(pool, PROBLEMS[:6], METHODS, out=tmp_path / "eval", **SOLVE)
    assert records(tmp_path / "eval") == one_process["eval"]
    assert result["methods"]["stop"]["runs"] == 12
    ev.sweep(
        pool,
        PROBLEMS[:6],
        "stop",
        keeps=[1, 2],
        prefixes=[6, PREFIX_TOKENS],
        out=tmp_path / "sweep",
        **SWEEP,
    )
    assert records(tmp_path / "sweep") == one_process["sweep"]


def test_an_interrupted_label_run_resumes_through_the_cli(pool, one_process, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    items = check_problems(PROBLEMS, None)
    with pytest.raises(KeyboardInterrupt):
        write_labels(
            out,
            items,
            lambda todo: interrupt_after(
                5, pool.label_stream(todo, LabelTask(**TASK), progress=False)
            ),
        )
    assert len(lines(out)) == 5 * 2  # each problem's records were written as it arrived
    assert main(label_argv(write_problems(tmp_path / "problems.jsonl", PROBLEMS), out)) == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert stats["skipped"] == 5 and stats["problems"] == 11
    assert lines(out) == one_process["labels"]
    # the pool that was interrupted dropped its chunks and serves the next run
    assert len(pool.actors) == 2
    pool.label_problems(PROBLEMS[:2], tmp_path / "again.jsonl", progress=False, **TASK)
    assert set(lines(tmp_path / "again.jsonl")) <= set(one_process["labels"])


def test_a_killed_driver_loses_nothing_written(pool, one_process, tmp_path):
    """A `stopkit label --ray HOST:PORT` process joins this cluster and is killed (SIGKILL) once a
    problem is written; Ray frees its workers, and a rerun (here on the shared pool: the CLI's
    resume is tested above) finishes the file."""
    free = ray.cluster_resources()["CPU"] - len(pool.actors)
    wait_for_free_cpus(free)  # those of the last test's workers come back
    problems, out = PROBLEMS[:6], tmp_path / "labels.jsonl"
    argv = label_argv(
        write_problems(tmp_path / "problems.jsonl", problems),
        out,
        ray.get_runtime_context().gcs_address,
    )
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "stopkit", *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while not (out.is_file() and out.stat().st_size) and driver.poll() is None:
                assert time.monotonic() < deadline, "the driver wrote nothing in 300 s"
                time.sleep(0.01)
            assert ray.available_resources().get("CPU", 0) == free - 2  # its workers are here
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()
    assert 0 < out.read_text().count("\n") < 2 * len(problems)
    wait_for_free_cpus(free)  # the killed driver's workers are gone
    stats = pool.label_problems(problems, out, progress=False, **TASK)
    assert stats["skipped"] >= 1 and stats["skipped"] + stats["problems"] == len(problems)
    ids = {p["id"] for p in problems}
    assert lines(out) == [x for x in one_process["labels"] if json.loads(x)["id"] in ids]


def test_the_prompt_options_reach_the_workers(cluster):
    args = build_parser().parse_args(
        label_argv("p.jsonl", "l.jsonl") + ["--prompt-template", "mod {question}"]
    )
    spec = ModelSpec.from_args(args)
    prompt = PromptFormat(template="mod {question}")
    assert RayPool(spec).prompt == prompt  # what eval writes in its config
    worker = _Worker(replace(spec, device="cpu"))
    worker.load()
    assert worker.reasoner.prompt == prompt  # what eval's workers solve with
    got = worker.label(1, check_problems(PROBLEMS[:2], None), LabelTask(**TASK))
    model, tokenizer = load_model()
    want = label_stream(
        Engine(model),
        tokenizer,
        check_problems(PROBLEMS[:2], tokenizer, prompt),
        LabelTask(**TASK),
        progress=False,
    )
    assert sorted(got) == sorted(want)
    mod = tokenizer.convert_tokens_to_ids("mod")
    assert all(r["prefix_token_ids"][1] == mod for _, recs, _ in got for r in recs)


def test_an_interrupted_eval_resumes_through_the_cli(
    pool, one_process, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "eval"
    solve_records = pool.solve_records
    monkeypatch.setattr(
        pool, "solve_records", lambda *a, **kw: interrupt_after(4, solve_records(*a, **kw))
    )
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(pool, PROBLEMS[:6], METHODS, out=folder, **SOLVE)
    assert len((folder / ev.RECORDS).read_text().splitlines()) == 4
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:6]))
    argv = [
        "eval",
        "--ray",
        "--workers",
        "2",
        "--model",
        str(MODEL_DIR),
        "--adapter",
        str(ADAPTER_DIR),
        "--data",
        str(tmp_path / "problems.jsonl"),
        "--methods",
        METHODS,
        "--n",
        "6",
        "--keep",
        "2",
        "--prefix-tokens",
        str(PREFIX_TOKENS),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--seeds",
        "0,1",
        "--temperature",
        str(TEMPERATURE),
        "--top-p",
        "1.0",
        "--checker",
        "stopkit.toy.task:check",
        "--out",
        str(folder),
    ]
    assert main(argv) == 0
    assert "stop" in capsys.readouterr().out
    assert records(folder) == one_process["eval"]
    assert (folder / "results.json").is_file()


def test_a_killed_worker_hands_its_problems_to_the_other(pool, one_process, monkeypatch, caplog):
    # one chunk in flight per worker: the other 14 problems wait in the driver's queue, so the
    # killed worker is sure to hold (or be handed) problems that are not done
    monkeypatch.setattr(pool, "chunks_per_worker", 1)
    pool.start()
    victim, results = None, []
    try:
        with caplog.at_level(logging.WARNING, logger="stopkit.distributed"):
            for result in pool.label_stream(
                check_problems(PROBLEMS, None), LabelTask(**TASK), progress=False
            ):
                results.append(result)
                if victim is None:
                    victim = pool.actors[0]
                    ray.kill(victim)
        assert len(pool.actors) == 1 and pool.actors[0] is not victim
    finally:
        pool.close()  # the next test starts two afresh
    lost = [int(m) for m in re.findall(r"its (\d+) problems in flight", caplog.text)]
    assert lost and lost[0] >= 1
    assert sorted(pid for pid, _, _ in results) == sorted(p["id"] for p in PROBLEMS)  # each once
    assert sorted(json.dumps(r) for _, recs, _ in results for r in recs) == one_process["labels"]


def test_a_worker_runs_its_chunks_on_one_engine_and_drops_them_on_abort(cluster, one_process):
    """The worker's engine loop in this process (not an actor): chunks handed to it concurrently
    give their problems' records; an abort drops the chunks of its run, also one arriving after
    it."""
    worker = _Worker(replace(SPEC, device="cpu"))
    worker.load()
    engine = worker.reasoner.engine
    # the engine's default KV share of the RAM, split over the 4 CPUs of the node
    default = Engine(worker.reasoner.model).cache.num_blocks
    assert 0.2 * default <= engine.cache.num_blocks <= 0.3 * default
    items, task = check_problems(PROBLEMS, None), LabelTask(**TASK)
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        chunks = [threads.submit(worker.label, 1, chunk, task) for chunk in (items[:3], items[3:4])]
        got = [r for c in chunks for _, recs, _ in c.result() for r in recs]
        first4 = {p["id"] for p in PROBLEMS[:4]}
        assert sorted(map(json.dumps, got)) == [
            line for line in one_process["labels"] if json.loads(line)["id"] in first4
        ]
        dropped = threads.submit(worker.label, 2, items, task)
        while not engine.scheduler.has_work():  # the chunk is on the engine (for seconds)
            time.sleep(0.001)
        worker.abort(2)
        assert dropped.result() == [] and not engine.scheduler.has_work()
    assert worker.label(2, items[:1], task) == []  # late, of the aborted run
    assert [pid for pid, _, _ in worker.label(3, items[:1], task)] == ["q0"]


def test_cli_without_ray_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    (tmp_path / "p.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    assert (
        main(
            [
                "label",
                "--ray",
                "--model",
                str(MODEL_DIR),
                "--problems",
                str(tmp_path / "p.jsonl"),
                "--out",
                str(tmp_path / "l.jsonl"),
                "--prefix-tokens",
                "4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err == 'stopkit label: Ray is not installed: pip install "stopkit[ray]"\n'
    assert (
        main(
            [
                "eval",
                "--workers",
                "2",
                "--model",
                str(MODEL_DIR),
                "--data",
                str(tmp_path / "p.jsonl"),
                "--methods",
                "full",
                "--n",
                "2",
                "--keep",
                "1",
                "--prefix-tokens",
                "4",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == "stopkit eval: --workers needs --ray\n"


def test_an_address_where_nothing_answers_fails_at_once():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto"):
            _check_reachable(address)
    with pytest.raises(ConnectionError, match=f"nothing answers at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")  # closed now
