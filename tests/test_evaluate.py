"""The evaluation harness: the paper's metrics (avg@k|N, maj@k, pass@k) against a direct
computation, records and resuming, budget sweeps read off one run, files, plot, CLI (fake reasoner;
a real one at the end)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from stopkit import evaluate as ev
from stopkit.cli import UserError, build_parser
from stopkit.loading import load_model
from stopkit.reasoner import Path, Solution


def _path(answer, *, score=None, fate="eos", in_prefix=False, n_tokens=5):
    text = f"so the answer: {answer}"
    return Path(
        tokens=list(range(n_tokens)),
        text=text,
        answer=None if fate == "pruned" else answer,
        score=score,
        pruned=fate == "pruned",
        finished_in_prefix=in_prefix,
        finish_reason=fate,
    )


class FakeReasoner:
    """Returns a fixed Solution per (question, method, seed), in a shuffled completion order, and
    records every call."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def check_args(self, **kwargs):
        if kwargs["method"] not in ("full", "stop", "random"):
            raise ValueError(f"unknown method {kwargs['method']!r}")

    def solve_iter(self, questions, *, method, seed, progress=None, **kwargs):
        self.calls.append((list(questions), method, seed, kwargs))
        order = list(range(len(questions)))
        random.Random(len(self.calls)).shuffle(order)
        for i in order:
            yield i, self.table[questions[i], method, seed]


def _solution(paths, answer, *, scoring=0, launch=10):
    votes = {}
    for p in paths:
        if p.voted and p.answer is not None:
            votes[p.answer] = votes.get(p.answer, 0) + 1
    generated = sum(len(p.tokens) for p in paths)
    return Solution(
        answer=answer,
        votes=votes,
        paths=paths,
        generated_tokens=generated,
        scoring_tokens=scoring,
        seconds=0.0,
        phases={},
        tokens={"launch": launch, "check": scoring, "resume": generated - launch},
        compute_seconds=0.25,
    )


def _random_solution(rng, ref, method):
    """N=8 paths: some finished in the prefix, the rest scored; stop prunes all but the best 3."""
    wrong = str(int(ref) + 1)
    paths = []
    for _ in range(8):
        in_prefix = rng.random() < 0.2
        answer = rng.choice([ref, ref, wrong, wrong, "9999"])
        score = None if in_prefix else rng.choice([0.1, 0.5, 0.5, 0.9, rng.random()])
        paths.append(
            _path(
                answer,
                score=score,
                in_prefix=in_prefix,
                n_tokens=rng.randrange(3, 5) if in_prefix else rng.randrange(6, 30),
            )
        )
    if method == "stop":
        rest = [i for i, p in enumerate(paths) if not p.finished_in_prefix]
        for i in sorted(rest, key=lambda i: (-paths[i].score, i))[3:]:
            p = paths[i]
            paths[i] = _path(p.answer, score=p.score, fate="pruned", n_tokens=4)
    else:
        paths = [
            _path(p.answer, in_prefix=p.finished_in_prefix, n_tokens=len(p.tokens)) for p in paths
        ]
    answers = [p.answer for p in paths if p.voted]
    top = max(answers, key=answers.count)
    return _solution(paths, top, scoring=4 * 8 if method == "stop" else 0)


def _direct(sol, ref, k):
    """avg@k|N, maj@k, pass@k of one solution, computed directly from the definition."""
    paths = sol.paths
    if k is None:  # full: all N
        kept = list(paths)
    else:
        done = [p for p in paths if p.finished_in_prefix]
        resumed = [
            (p.score, -i, p)
            for i, p in enumerate(paths)
            if not p.finished_in_prefix and not p.pruned
        ]
        kept = (done + [t[2] for t in sorted(resumed, reverse=True)])[:k]
    right = [p.answer == ref for p in kept]
    counts = {}
    for p in kept:
        counts[p.answer] = counts.get(p.answer, 0) + 1
    best = max(counts.values())
    winner = next(p.answer for p in kept if counts[p.answer] == best)
    return sum(right) / len(right), float(winner == ref), float(any(right))


@pytest.fixture
def setup():
    rng = random.Random(1234)
    problems = [
        {"id": f"p{i}", "question": f"q{i}", "answer": str(rng.randrange(100))} for i in range(6)
    ]
    table = {}
    for method in ("full", "stop"):
        for seed in (0, 1):
            for p in problems:
                table[p["question"], method, seed] = _random_solution(rng, p["answer"], method)
    return problems, table


def _check(p, a):
    return p.endswith(f": {a}")


def test_paper_metrics_records_and_resume(setup, tmp_path):
    problems, table = setup
    fake = FakeReasoner(table)
    out = tmp_path / "out"
    res = ev.evaluate(
        fake,
        problems,
        "full,stop",
        n=8,
        keep=3,
        prefix_tokens=5,
        seeds=[0, 1],
        out=out,
        checker=_check,
        progress=False,
        temperature=0.7,
    )
    assert list(res["methods"]) == ["full", "stop"]
    for method, k in (("full", None), ("stop", 3)):
        m = res["methods"][method]
        sols = [(table[p["question"], method, s], p["answer"]) for s in (0, 1) for p in problems]
        direct = [_direct(sol, ref, k) for sol, ref in sols]
        for j, key in enumerate(("avg_at_k", "maj_at_k", "pass_at_k")):
            assert m[key] == pytest.approx(sum(d[j] for d in direct) / 12), key
        assert m["vote_accuracy"] == pytest.approx(sum(sol.answer == ref for sol, ref in sols) / 12)
        assert m["tokens"] == pytest.approx(sum(sol.generated_tokens for sol, _ in sols) / 12)
        assert m["launch_tokens"] == 10 and m["seconds"] == pytest.approx(0.25)
        assert m["check_tokens"] == m["scoring_tokens"] == (32 if method == "stop" else 0)
        assert m["runs"] == 12 and [s["seed"] for s in m["per_seed"]] == [0, 1]
    assert res["methods"]["stop"]["type"] == "IV" and res["methods"]["full"]["type"] is None
    assert res["methods"]["stop"]["token_reduction"] == pytest.approx(
        1 - res["methods"]["stop"]["tokens"] / res["methods"]["full"]["tokens"]
    )
    # one call per (method, seed), every problem at once; keyword arguments forwarded
    assert len(fake.calls) == 4 and all(len(c[0]) == 6 for c in fake.calls)
    assert all(c[3]["temperature"] == 0.7 and c[3]["n"] == 8 for c in fake.calls)

    # records: one per (method, seed, problem), appended as they finish; a rerun resumes
    records = (out / ev.RECORDS).read_text().splitlines()
    assert len(records) == 24
    (out / ev.RECORDS).write_text("\n".join(records[:9]) + "\n" + records[9][:30])
    fake2 = FakeReasoner(table)
    again = ev.evaluate(
        fake2,
        problems,
        "full,stop",
        n=8,
        keep=3,
        prefix_tokens=5,
        seeds=[0, 1],
        out=out,
        checker=_check,
        progress=False,
        temperature=0.7,
    )
    assert [len(c[0]) for c in fake2.calls] == [3, 6, 6]  # (full, 1) lost 3, the rest not started
    assert json.dumps(again["methods"], sort_keys=True) == json.dumps(
        res["methods"], sort_keys=True
    )

    paths = ev.write_results(res, tmp_path / "files")
    data = json.loads(paths["json"].read_text())
    assert data["methods"]["stop"]["avg_at_k"] == pytest.approx(res["methods"]["stop"]["avg_at_k"])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["method"], r["type"]) for r in rows] == [("full", ""), ("stop", "IV")]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = ev.format_table(res)
    assert "avg@k|N" in text and "IV" in text and "vs full" in text


def test_sweep_reads_every_keep_off_one_run(setup, tmp_path):
    problems, table = setup
    fake = FakeReasoner(table)
    # the sweep's run decodes every path (prune=False): serve it the full solutions, with scores
    scored = {}
    rng = random.Random(7)
    for (q, method, seed), sol in table.items():
        if method == "full":
            paths = [
                _path(
                    p.answer,
                    score=None if p.finished_in_prefix else rng.random(),
                    in_prefix=p.finished_in_prefix,
                    n_tokens=len(p.tokens),
                )
                for p in sol.paths
            ]
            scored[q, "stop", seed] = _solution(paths, sol.answer, scoring=4 * 8)
    fake.table = scored
    res = ev.sweep(
        fake,
        problems,
        ["full", "stop"],
        n=8,
        keeps=[1, 3, 8],
        prefixes=[5],
        seeds=[0, 1],
        checker=_check,
        progress=False,
        out=tmp_path,
    )
    assert len(fake.calls) == 2 and all(
        c[3]["prune"] is False and c[3]["keep"] == 8 for c in fake.calls
    )
    by_keep = {p["keep"]: p for p in res["points"]}
    for k in (1, 3, 8):
        direct, tokens = [], []
        for s in (0, 1):
            for p in problems:
                sol = scored[p["question"], "stop", s]
                done = [x for x in sol.paths if x.finished_in_prefix]
                rest = sorted(
                    [(x.score, -i, x) for i, x in enumerate(sol.paths) if not x.finished_in_prefix],
                    reverse=True,
                )
                kept = (done + [t[2] for t in rest])[:k]
                direct.append(sum(x.answer == p["answer"] for x in kept) / len(kept))
                tokens.append(
                    sum(
                        len(x.tokens) if any(x is y for y in kept) else min(len(x.tokens), 5)
                        for x in sol.paths
                    )
                    + 32
                )
        assert by_keep[k]["avg_at_k"] == pytest.approx(sum(direct) / 12)
        assert by_keep[k]["tokens"] == pytest.approx(sum(tokens) / 12)
        assert by_keep[k]["retention"] == k / 8
    full = [
        _direct(scored[p["question"], "stop", s], p["answer"], None)
        for s in (0, 1)
        for p in problems
    ]
    assert res["full"]["avg_at_k"] == pytest.approx(sum(d[0] for d in full) / 12)
    assert res["best"] and all(
        b["tokens"] <= b["budget"] * res["full"]["tokens"] for b in res["best"]
    )
    files = ev.write_sweep(res, tmp_path / "files")
    assert list(csv.DictReader(files["csv"].open()))[-1]["method"] == "full"
    assert files["png"].stat().st_size > 1000 and "budget" in ev.format_sweep(res)
    with pytest.raises(ValueError, match="early"):
        ev.sweep(fake, problems, ["stop"], keeps=[1], early_stop=2, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        ev.sweep(fake, problems, ["stop"], progress=False)


def test_vote_checked_through_a_path_text(setup):
    """A checker that only understands texts: the voted answer is checked via a path's text."""
    problems, table = setup
    seen = []

    def checker(text, answer):
        seen.append(text)
        return text.endswith(f": {answer}")

    res = ev.evaluate(
        FakeReasoner(table), problems[:1], ["stop"], seeds=[0], progress=False, checker=checker
    )
    assert seen and all(isinstance(t, str) for t in seen)
    sol = table["q0", "stop", 0]
    assert res["methods"]["stop"]["vote_accuracy"] == float(sol.answer == problems[0]["answer"])


def test_bad_input_before_any_generation(setup):
    problems, table = setup
    fake = FakeReasoner(table)
    with pytest.raises(ValueError, match="unknown method"):
        ev.evaluate(fake, problems, "full,nope", progress=False)
    assert fake.calls == []
    with pytest.raises(ValueError, match="methods"):
        ev.evaluate(fake, problems, "", progress=False)
    with pytest.raises(ValueError, match="problems"):
        ev.evaluate(fake, [], "full", progress=False)
    with pytest.raises(ValueError, match="answer"):
        ev.evaluate(fake, [{"question": "q0"}], "full", progress=False)
    with pytest.raises(ValueError, match="unique"):
        ev.evaluate(fake, [problems[0], problems[0]], "full", progress=False)
    assert fake.calls == []


def _parser():
    return build_parser()


@pytest.mark.parametrize("command", ["eval", "solve", "plan"])
def test_cli_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"stopkit {command}" in out


def test_cli_plan(capsys):
    args = _parser().parse_args(
        [
            "plan",
            "--budget",
            "100000",
            "--prefix-tokens",
            "2048",
            "--task-tokens",
            "8192",
            "--keep",
            "8",
            "--json",
        ]
    )
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 24, "keep": 8, "expected_tokens": 98304}
    args = _parser().parse_args(
        [
            "plan",
            "--budget",
            "10",
            "--prefix-tokens",
            "2048",
            "--task-tokens",
            "8192",
            "--ratio",
            "0.5",
        ]
    )
    with pytest.raises(UserError, match="too small"):
        args.run(args)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "--data", "x.jsonl", "--methods", "full,stop"], "--adapter"),
        (["eval", "--data", "x.jsonl", "--methods", "full,nope"], "method"),
        (["eval", "--data", "x.jsonl", "--methods", "random", "--keep", "9", "--n", "4"], "keep"),
        (["solve", "--method", "random", "--prefix-tokens", "0", "q"], "prefix_tokens"),
        (["solve", "--method", "entropy", "--vote", "score", "q"], "vote"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading(argv, match, tmp_path):
    # --model points at an empty folder: loading it would fail, so these errors come first
    args = _parser().parse_args([argv[0], "--model", str(tmp_path), *argv[1:]])
    with pytest.raises(UserError, match=match):
        args.run(args)


# ---- with a real reasoner on a tiny model -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama, its tokenizer and a StopScorer checkpoint saved to disk."""
    import torch
    from test_reasoner import build_tiny

    from stopkit.stop import StopScorer

    model, tok = build_tiny()
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    StopScorer.new(model, num_tokens=4, lora_rank=8, seed=3).save(root / "adapter")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two fighting over shared cores
    yield root
    torch.set_num_threads(before)


PROBLEMS = [
    {"question": "1 + 2 =", "answer": "3"},
    {"question": "2 + 2 = x", "answer": "4"},
    {"question": "so 7 is", "answer": "7"},
]


def _last_digit(text):
    digits = [w for w in text.split() if w.isdigit()]
    return digits[-1] if digits else None


def test_evaluate_real_reasoner(tiny_dir):
    from stopkit.reasoner import ParallelReasoner
    from stopkit.stop import StopScorer

    model, tok = load_model(str(tiny_dir / "model"), dtype="float32")
    r = ParallelReasoner(model, tok, StopScorer.load(tiny_dir / "adapter", model))
    kw = dict(
        n=6,
        keep=2,
        prefix_tokens=4,
        max_new_tokens=14,
        temperature=1.0,
        top_p=1.0,
        extractor=_last_digit,
    )
    checker = lambda text, ans: _last_digit(text) == ans  # noqa: E731
    res = ev.evaluate(
        r,
        PROBLEMS,
        "full,stop,confidence,entropy,random",
        seeds=[0, 1],
        checker=checker,
        progress=False,
        **kw,
    )
    m = res["methods"]
    assert list(m) == ["full", "stop", "confidence", "entropy", "random"]
    # the same launched prefixes for every method: pruning only removes tokens
    assert all(m[k]["tokens"] < m["full"]["tokens"] for k in m if k != "full")
    assert m["stop"]["scoring_tokens"] > 0 and m["full"]["scoring_tokens"] == 0
    # recompute full's and stop's numbers by solving each problem directly
    for method in ("full", "stop"):
        votes, kept, tokens = [], [], []
        for seed in (0, 1):
            sols = [r.solve(p["question"], method=method, seed=seed, **kw) for p in PROBLEMS]
            for p, sol in zip(PROBLEMS, sols, strict=True):
                votes.append(sol.answer == p["answer"])
                k = [q for q in sol.paths if not q.pruned]
                kept.append(sum(q.answer == p["answer"] for q in k) / len(k))
                tokens.append(sol.generated_tokens)
        assert m[method]["vote_accuracy"] == pytest.approx(sum(votes) / 6)
        assert m[method]["kept_accuracy"] == pytest.approx(sum(kept) / 6)
        assert m[method]["tokens"] == pytest.approx(sum(tokens) / 6)


def test_cli_eval_and_solve(tiny_dir, tmp_path, capsys):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    common = [
        "--model",
        str(tiny_dir / "model"),
        "--adapter",
        str(tiny_dir / "adapter"),
        "--n",
        "4",
        "--keep",
        "2",
        "--prefix-tokens",
        "3",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "1.0",
        "--dtype",
        "float32",
    ]
    args = _parser().parse_args(
        [
            "eval",
            *common,
            "--data",
            str(data),
            "--methods",
            "full,stop",
            "--seeds",
            "0,1",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert args.run(args) == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["full", "stop"] and res["methods"]["stop"]["runs"] == 4
    assert res["config"]["model"] == str(tiny_dir / "model") and res["config"]["problems"] == 2
    assert (out / "results.csv").read_text().count("\n") == 3
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert "avg@k|N" in capsys.readouterr().out
    assert len((out / "records.jsonl").read_text().splitlines()) == 8

    args = _parser().parse_args(["solve", *common, "--method", "stop", "--json", "1 + 2 ="])
    assert args.run(args) == 0
    sol = json.loads(capsys.readouterr().out)
    assert len(sol["paths"]) == 4 and sol["scoring_tokens"] == 4 * sum(
        not p["finished_in_prefix"] for p in sol["paths"]
    )
    assert sol["generated_tokens"] == sum(p["num_tokens"] for p in sol["paths"])
    args = _parser().parse_args(["solve", *common, "--method", "random", "1 + 2 ="])
    assert args.run(args) == 0
    assert "answer:" in capsys.readouterr().out
