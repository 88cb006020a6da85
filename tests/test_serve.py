"""``stopkit serve`` on the shipped toy model, over loopback: the official openai client, 32
concurrent requests each identical to ParallelReasoner.solve with its seed, streaming, a
disconnect freeing its blocks at once, every bad request answered 400 naming the field, 503 when
the queue is full, a failing engine step failing only the requests it ran, /metrics in the
Prometheus format, and the CLI without the serve extra.

Each server runs uvicorn in a thread of this process (so tests can pause the engine thread and
look at the engine while it is paused) on its own copy of the toy model: the engine switches the
model's attention implementation during its forwards, so two engines never share a model here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
import uvicorn  # noqa: E402

text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser"
).text_string_to_metric_families

from stopkit import toy  # noqa: E402
from stopkit.engine import Engine  # noqa: E402
from stopkit.reasoner import ParallelReasoner  # noqa: E402
from stopkit.serve import Defaults, create_app  # noqa: E402
from stopkit.stop import StopScorer  # noqa: E402

MODEL = "toy"
DEFAULTS = Defaults(
    n=8,
    keep=2,
    prefix_tokens=toy.PREFIX_TOKENS,
    max_new_tokens=toy.MAX_NEW_TOKENS,
    method="stop",
    temperature=toy.TEMPERATURE,
    top_p=1.0,
)
# the solve arguments of a request that leaves everything to DEFAULTS
SOLVE = dict(
    n=8,
    keep=2,
    prefix_tokens=toy.PREFIX_TOKENS,
    max_new_tokens=toy.MAX_NEW_TOKENS,
    method="stop",
    temperature=toy.TEMPERATURE,
    top_p=1.0,
)
NUM_BLOCKS, MAX_NUM_SEQS = 600, 1024
QUESTIONS = [p.question for p in toy.task.generate(34, seed=7, split="test")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # a 2.4M-parameter model: one thread is much faster than two fighting over shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_reasoner(**engine_kwargs) -> ParallelReasoner:
    """A reasoner on its own copy of the toy model and adapter."""
    model, tokenizer = toy.load_model()
    scorer = StopScorer.load(toy.ADAPTER_DIR, model)
    engine = Engine(
        model, **{"num_blocks": NUM_BLOCKS, "max_num_seqs": MAX_NUM_SEQS, **engine_kwargs}
    )
    return ParallelReasoner(model, tokenizer, scorer, engine=engine)


@dataclass
class Served:
    url: str
    state: object  # the app's _Server: its worker, engine, metrics

    @property
    def engine(self) -> Engine:
        return self.state.worker.engine

    def post(self, path: str, timeout: float = 60, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels: value} (parsed by prometheus_client)."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_for(self, what: str, condition, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if condition(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {m}")
            time.sleep(0.02)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The engine thread stops stepping (it still handles its inbox: adds, aborts, metrics).
        Once entered, no step is in progress: a /metrics request is a barrier (the worker answers
        it between two steps)."""
        run = self.state.worker.run

        def idle():
            time.sleep(0.005)
            return []

        run.step = idle
        try:
            self.metrics()
            yield
        finally:
            del run.step


@contextlib.contextmanager
def serving(reasoner: ParallelReasoner, **kwargs) -> Iterator[Served]:
    """uvicorn on a free loopback port in a thread, stopped on exit."""
    app = create_app(
        reasoner, model_name=MODEL, defaults=kwargs.pop("defaults", DEFAULTS), **kwargs
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.server)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serving(toy_reasoner(), progress_interval=0.02) as s:
        yield s


@pytest.fixture(scope="module")
def reference() -> ParallelReasoner:
    """The in-process reference, on its own model copy and a roomy engine."""
    return toy_reasoner(num_blocks=4096)


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def assert_same(body: dict, sol, prompt_tokens: int) -> None:
    """A response (a dict in the wire format, with token ids) says what a Solution says."""
    voters = [(i, p) for i, p in enumerate(sol.paths) if p.voted]
    st = body["stopkit"]
    assert st["answer"] == sol.answer
    assert st["votes"] == {str(a): w for a, w in sol.votes.items()}
    assert st["tokens"] == sol.tokens
    assert st["paths"]["launched"] == len(sol.paths)
    assert st["paths"]["pruned"] == sum(p.pruned for p in sol.paths)
    assert len(body["choices"]) == len(voters)
    for choice, (i, path) in zip(body["choices"], voters, strict=True):
        assert choice["stopkit"]["path"] == i
        assert choice["stopkit"]["token_ids"] == path.tokens
        assert choice["finish_reason"] == {"eos": "stop", "length": "length"}[path.finish_reason]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert text == path.text
    usage = {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sol.generated_tokens,
        "total_tokens": prompt_tokens + sol.generated_tokens,
    }


# ---- the openai client; concurrency; equality with solve -------------------------------------------
METHODS = [("stop", 2, 11), ("confidence", 3, 12), ("random", 2, 13), ("full", 2, 14)]


def test_32_concurrent_requests_equal_solve(served, reference):
    """32 requests at once through the official client, half chat, half completions, four
    methods with their own keep and seed: each answer equals ParallelReasoner.solve's."""
    questions = QUESTIONS[:32]
    served.engine.stats.peak_rows = 0  # the engine is idle

    async def ask(client, i: int, q: str):
        method, keep, seed = METHODS[i % 4]
        extra = {"stopkit": {"method": method, "keep": keep, "return_token_ids": True}}
        if i % 2:
            return await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], seed=seed, extra_body=extra
            )
        return await client.completions.create(model=MODEL, prompt=q, seed=seed, extra_body=extra)

    async def ask_all():
        async with openai.AsyncOpenAI(
            base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(ask(client, i, q) for i, q in enumerate(questions)))

    responses = asyncio.run(ask_all())
    # requests ran together in the scheduler: more rows at once than one request has
    assert served.engine.stats.peak_rows >= 3 * SOLVE["n"]
    for m, (method, keep, seed) in enumerate(METHODS):
        sols = reference.solve_batch(
            questions[m::4], **{**SOLVE, "method": method, "keep": keep, "seed": seed}
        )
        for i, sol in zip(range(m, 32, 4), sols, strict=True):
            body = responses[i].model_dump()
            assert body["object"] == ("chat.completion" if i % 2 else "text_completion")
            assert body["stopkit"]["method"] == method and body["stopkit"]["seed"] == seed
            assert_same(body, sol, len(reference.prompt_ids(questions[i])))
    # solve itself, one question at a time, says the same
    for i in (0, 5):
        method, keep, seed = METHODS[i % 4]
        sol = reference.solve(
            questions[i], **{**SOLVE, "method": method, "keep": keep, "seed": seed}
        )
        assert_same(responses[i].model_dump(), sol, len(reference.prompt_ids(questions[i])))


def test_defaults_models_and_health(served, reference):
    """A request with nothing but the prompt runs the server's defaults with a random seed that
    the response reports and that reproduces it."""
    q = QUESTIONS[32]
    body = served.post(
        "/v1/completions", json={"prompt": q, "stopkit": {"return_token_ids": True}}
    ).json()
    seed = body["stopkit"]["seed"]
    assert body["stopkit"]["method"] == "stop" and len(body["stopkit"]["votes"]) >= 1
    assert_same(body, reference.solve(q, **SOLVE, seed=seed), len(reference.prompt_ids(q)))
    other = served.post("/v1/completions", json={"prompt": q}).json()["stopkit"]["seed"]
    assert other != seed
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    models = openai.OpenAI(base_url=served.url + "/v1", api_key="none").models.list()
    assert [m.id for m in models.data] == [MODEL]


# ---- streaming -------------------------------------------------------------------------------------
def read_sse(response: httpx.Response) -> list:
    """The data of each event of a server-sent event stream (JSON decoded, "[DONE]" as is)."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_sends_progress_then_the_result(path, served, reference):
    q = QUESTIONS[33]
    payload = {
        "stream": True,
        "seed": 5,
        "n": 16,
        "stream_options": {"include_usage": True},
        "stopkit": {"method": "confidence", "keep": 4, "return_token_ids": True},
    }
    payload.update(
        {"messages": [{"role": "user", "content": q}]} if "chat" in path else {"prompt": q}
    )
    with httpx.stream("POST", served.url + path, json=payload, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    kind = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    progress = [c["stopkit"]["progress"] for c in chunks if "progress" in c.get("stopkit", {})]
    results = chunks[len(progress) :]
    assert chunks[: len(progress)] == [
        c for c in chunks if c["choices"] == [] and "progress" in c["stopkit"]
    ]  # progress first
    assert progress[0] == {"phase": "queued", "tokens": 0, "live_paths": 16}
    tokens = [p["tokens"] for p in progress]
    assert tokens == sorted(tokens) and tokens[-1] > 0
    assert {"launch", "resume"} <= {p["phase"] for p in progress}
    sol = reference.solve(q, **{**SOLVE, "n": 16, "method": "confidence", "keep": 4, "seed": 5})
    # the result: one chunk per voting path, then the stopkit result and the usage
    *paths, last = results
    assert last["choices"] == [] and "progress" not in last["stopkit"]
    choices = [c["choices"][0] for c in paths]
    for c in choices:
        if "delta" in c:
            c["message"] = c.pop("delta")
    assert_same(
        {"choices": choices, "stopkit": last["stopkit"], "usage": last["usage"]},
        sol,
        len(reference.prompt_ids(q)),
    )


def test_stream_through_the_openai_client(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
    args = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], seed=1)
    chunks = list(client.chat.completions.create(stream=True, **args))
    whole = client.chat.completions.create(**args)
    assert [c.choices[0].delta.content for c in chunks if c.choices] == [
        c.message.content for c in whole.choices
    ]
    assert chunks[-1].stopkit["votes"] == whole.stopkit["votes"]


# ---- a client that goes away -----------------------------------------------------------------------
def raw_request(served: Served, payload: dict, path: str = "/v1/completions") -> socket.socket:
    """Send a POST on a bare socket (so the test can hang up whenever it wants)."""
    body = json.dumps(payload).encode()
    host, port = served.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def blocks_of(engine: Engine, prompt: list[int]) -> set[int]:
    """KV blocks held by the running rows of the request with this prompt (engine paused)."""
    sched, cache = engine.scheduler, engine.cache
    rows = [r for r in sched.running if r.prompt == prompt]
    out = set()
    for _r, i in zip(rows, sched.index_of(rows), strict=True):
        n = -(-int(cache.seq_lens[i]) // cache.block_size)
        out.update(cache.block_table[i, :n].tolist())
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_its_blocks_at_once(stream, served, reference):
    """A (hung up on) and B (kept) run together; with the engine paused, A's client hangs up:
    every block of A is freed (the blocks in use are exactly B's), then B finishes as solve
    says."""
    engine = served.engine
    qa, qb = QUESTIONS[1], QUESTIONS[2]
    pa, pb = (reference.prompt_ids(q) for q in (qa, qb))
    aborted = served.metrics()['stopkit_requests_total{outcome="aborted"}']
    b_args = {"seed": 3, "n": 16, "stopkit": {"method": "full", "return_token_ids": True}}
    b, b_result = in_background(served.post, "/v1/completions", json={"prompt": qb, **b_args})
    sock = raw_request(
        served, {"prompt": qa, "n": 16, "stream": stream, "stopkit": {"method": "full"}}
    )
    served.wait_for("both requests running", lambda m: m["stopkit_running_questions"] == 2)
    with served.paused():
        held_b = blocks_of(engine, pb)
        assert held_b and blocks_of(engine, pa)
        assert engine.cache.num_blocks - engine.cache.num_free_blocks > len(held_b)
        sock.close()
        m = served.wait_for(
            "A's blocks freed", lambda m: m["stopkit_kv_blocks_used"] == len(held_b), timeout=10
        )
        assert m['stopkit_requests_total{outcome="aborted"}'] == aborted + 1
        assert m["stopkit_running_questions"] == 1  # B still runs
        assert blocks_of(engine, pb) == held_b and not blocks_of(engine, pa)
    b.join(120)
    body = b_result[0].json()
    sol = reference.solve(qb, **{**SOLVE, "n": 16, "method": "full", "seed": 3})
    assert_same(body, sol, len(pb))
    m = served.metrics()
    assert m["stopkit_kv_blocks_used"] == 0 and m["stopkit_requests_in_flight"] == 0


# ---- bad requests, overload, failures --------------------------------------------------------------
LONG = " ".join(["1 #1 + 2"] * 80)  # far more than the toy model's 256-token context
BAD = {
    "invalid JSON": ("/v1/completions", b'{"prompt": "1 + 1", ', None, "JSON"),
    "not an object": ("/v1/completions", [1, 2], None, "JSON object"),
    "unknown method": (
        "/v1/completions",
        {"prompt": "1", "stopkit": {"method": "nope"}},
        "stopkit.method",
        "method must be one of",
    ),
    "keep > n": (
        "/v1/completions",
        {"prompt": "1", "n": 4, "stopkit": {"keep": 5}},
        "stopkit.keep",
        "keep must be <= n",
    ),
    "prefix >= max_tokens": (
        "/v1/completions",
        {"prompt": "1", "max_tokens": 10},
        "stopkit.prefix_tokens",
        "max_tokens",
    ),
    "long prompt": ("/v1/completions", {"prompt": LONG}, "prompt", "context"),
    "long prompt ids": ("/v1/completions", {"prompt": [5] * 255}, "prompt", "context"),
    "long chat": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}]},
        "messages",
        "context",
    ),
    "max_tokens beyond the context": (
        "/v1/completions",
        {"prompt": "1", "max_tokens": 300},
        "max_tokens",
        "context",
    ),
    "temperature type": (
        "/v1/completions",
        {"prompt": "1", "temperature": "hot"},
        "temperature",
        "number",
    ),
    "n type": ("/v1/completions", {"prompt": "1", "n": "8"}, "n", "integer"),
    "stream type": ("/v1/completions", {"prompt": "1", "stream": "yes"}, "stream", "boolean"),
    "content type": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "string",
    ),
    "no prompt": ("/v1/completions", {"n": 2}, "prompt", "required"),
    "no messages": ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
    "unknown stopkit option": (
        "/v1/completions",
        {"prompt": "1", "stopkit": {"prefix": 3}},
        "stopkit.prefix",
        "not permitted",
    ),
    "negative temperature": (
        "/v1/completions",
        {"prompt": "1", "temperature": -1},
        "temperature",
        "temperature must be",
    ),
    "top_p 0": ("/v1/completions", {"prompt": "1", "top_p": 0.0}, "top_p", "top_p must be"),
    "negative seed": ("/v1/completions", {"prompt": "1", "seed": -3}, "seed", "seed must be"),
    "token id out of the vocabulary": (
        "/v1/completions",
        {"prompt": [1, 2, 999]},
        "prompt",
        "token id",
    ),
    "empty prompt": ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    "stop sequences": ("/v1/completions", {"prompt": "1", "stop": ["\n"]}, "stop", "not supported"),
    "n above max_num_seqs": (
        "/v1/completions",
        {"prompt": "1", "n": MAX_NUM_SEQS + 1},
        "n",
        "max-num-seqs",
    ),
    "never fits the KV budget": ("/v1/completions", {"prompt": "1", "n": 1000}, None, "blocks"),
    "several messages, no template": (
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1"}]},
        "messages",
        "chat template",
    ),
    "image content": (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "messages[0].content",
        "text",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_400_naming_the_field(case, served):
    path, payload, param, words = BAD[case]
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = served.post(path, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == param
    assert words in error["message"]


def test_unknown_model_is_404_and_the_server_lives_on(served):
    r = served.post("/v1/completions", json={"model": "gpt-9", "prompt": "1"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(served.url + "/nope").status_code == 404
    assert httpx.get(served.url + "/health").status_code == 200
    ok = served.post(
        "/v1/completions", json={"prompt": QUESTIONS[3], "n": 2, "stopkit": {"keep": 1}}
    )
    assert ok.status_code == 200


def test_full_queue_is_503(served, monkeypatch):
    monkeypatch.setattr(served.state, "max_queue", 2)
    with served.paused():
        waiting = [
            in_background(
                served.post,
                "/v1/completions",
                json={"prompt": QUESTIONS[i], "n": 2, "stopkit": {"keep": 1}},
            )
            for i in (4, 5)
        ]
        served.wait_for("2 in flight", lambda m: m["stopkit_requests_in_flight"] == 2)
        r = served.post("/v1/completions", json={"prompt": QUESTIONS[6]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]
    for thread, result in waiting:
        thread.join(60)
        assert result[0].status_code == 200
    assert (
        served.post(
            "/v1/completions", json={"prompt": QUESTIONS[6], "n": 2, "stopkit": {"keep": 1}}
        ).status_code
        == 200
    )


def test_a_failing_step_fails_only_the_requests_it_ran(reference):
    """max_num_seqs = n: one request runs, the other waits. A step raises: the running one gets
    500, the waiting one is answered as solve says, and the server goes on."""
    with serving(toy_reasoner(max_num_seqs=8)) as s:
        run = s.state.worker.run
        real, calls = type(run).step, []

        def flaky():
            if not sending.is_set():  # paused until both requests are in the run
                time.sleep(0.005)
                return []
            calls.append(1)
            if len(calls) == 3:  # the first request is running by then, the other waits
                raise RuntimeError("injected failure")
            return real(run)

        sending = threading.Event()
        run.step = flaky
        try:
            sent = [
                in_background(
                    s.post,
                    "/v1/completions",
                    json={"prompt": QUESTIONS[i], "seed": 9, "stopkit": {"return_token_ids": True}},
                )
                for i in (7, 8)
            ]
            s.wait_for("2 in flight", lambda m: m["stopkit_requests_in_flight"] == 2)
            s.metrics()  # both are in the run now (the worker's inbox is first in, first out)
            sending.set()
            responses = []
            for thread, result in sent:
                thread.join(120)
                responses.append(result[0])
        finally:
            del run.step
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 500], [r.text for r in responses]
        failed = next(r for r in responses if r.status_code == 500).json()["error"]
        assert "injected failure" in failed["message"]
        ok = next(r for r in responses if r.status_code == 200)
        q = QUESTIONS[7] if responses[0] is ok else QUESTIONS[8]
        assert_same(ok.json(), reference.solve(q, **SOLVE, seed=9), len(reference.prompt_ids(q)))
        m = s.metrics()
        assert m['stopkit_requests_total{outcome="failed"}'] == 1
        assert m["stopkit_kv_blocks_used"] == 0
        assert httpx.get(s.url + "/health").status_code == 200
        assert (
            s.post(
                "/v1/completions", json={"prompt": QUESTIONS[9], "n": 2, "stopkit": {"keep": 1}}
            ).status_code
            == 200
        )


# ---- chat template ---------------------------------------------------------------------------------
def test_chat_template_applies_to_the_messages():
    reasoner = toy_reasoner()
    tok = reasoner.tokenizer
    # the user's turns, then the answer opens with the careful approach
    tok.chat_template = (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %} careful{% endif %}"
    )
    messages = [
        {"role": "system", "content": "ignored by this template"},
        {"role": "user", "content": QUESTIONS[10]},
    ]
    with serving(reasoner) as s:
        body = s.post(
            "/v1/chat/completions",
            json={"messages": messages, "seed": 4, "stopkit": {"return_token_ids": True}},
        ).json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(QUESTIONS[10])["input_ids"] + tok.convert_tokens_to_ids(["careful"])
    sol = reasoner.solve(ids, **SOLVE, seed=4)
    assert_same(body, sol, len(ids))


# ---- metrics ---------------------------------------------------------------------------------------
def test_metrics_parse_and_count(served):
    before = served.metrics()
    usages = [
        served.post(
            "/v1/completions", json={"prompt": QUESTIONS[i], "n": 4, "stopkit": {"keep": 2}}
        ).json()["usage"]
        for i in (11, 12)
    ]
    served.post("/v1/completions", json={"prompt": "1", "n": 0})  # a bad request
    text = httpx.get(served.url + "/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("stopkit_requests_in_flight", "gauge"),
        ("stopkit_queue_length", "gauge"),
        ("stopkit_running_questions", "gauge"),
        ("stopkit_kv_blocks_used", "gauge"),
        ("stopkit_kv_blocks_total", "gauge"),
        ("stopkit_generation_tokens_per_second", "gauge"),
        ("stopkit_generated_tokens", "counter"),
        ("stopkit_preemptions", "counter"),
        ("stopkit_requests", "counter"),
        ("stopkit_request_latency_seconds", "histogram"),
    ]:
        assert families.get(name) == kind, (name, families)
    after = served.metrics()
    assert after["stopkit_generated_tokens_total"] - before[
        "stopkit_generated_tokens_total"
    ] == sum(u["completion_tokens"] for u in usages)
    assert (
        after['stopkit_requests_total{outcome="ok"}']
        - before['stopkit_requests_total{outcome="ok"}']
        == 2
    )
    assert (
        after['stopkit_requests_total{outcome="bad_request"}']
        - before['stopkit_requests_total{outcome="bad_request"}']
        == 1
    )
    assert (
        after["stopkit_request_latency_seconds_count"]
        == after['stopkit_requests_total{outcome="ok"}']
    )
    assert (
        after['stopkit_request_latency_seconds_bucket{le="+Inf"}']
        == after["stopkit_request_latency_seconds_count"]
    )
    assert after["stopkit_kv_blocks_total"] == NUM_BLOCKS and after["stopkit_kv_blocks_used"] == 0
    assert after["stopkit_generation_tokens_per_second"] > 0
    assert after["stopkit_preemptions_total"] == served.engine.stats.preemptions


# ---- the command line ------------------------------------------------------------------------------
def test_cli_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    from stopkit.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert main(["serve", "--model", str(toy.MODEL_DIR)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'stopkit[serve]'" in err
