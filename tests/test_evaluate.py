"""The evaluation harness: metrics, files, plot, CLI (fake reasoner; a real one at the end)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from stopkit import evaluate as ev
from stopkit.cli import UserError, build_parser
from stopkit.reasoner import Path, Solution


def _path(answer, pruned=False, n_tokens=5, finished_in_prefix=False):
    text = "pruned" if answer is None else f"so the answer: {answer}"
    return Path(tokens=list(range(n_tokens)), text=text, answer=answer, score=None, pruned=pruned,
                finished_in_prefix=finished_in_prefix,
                finish_reason="pruned" if pruned else "eos")


class FakeReasoner:
    """Returns a fixed, seed-dependent Solution per question and records every call."""

    def __init__(self, table):
        self.table = table  # (question, method, seed) -> Solution
        self.calls = []
        self.checked = []

    def check_args(self, **kwargs):
        if kwargs["method"] not in ("full", "stop", "random"):
            raise ValueError(f"unknown method {kwargs['method']!r}")
        self.checked.append(kwargs)

    def solve_batch(self, questions, *, method, seed, **kwargs):
        self.calls.append((list(questions), method, seed, kwargs))
        return [self.table[q, method, seed] for q in questions]


def _solution(paths, answer, tokens, scoring=0):
    votes = {}
    for p in paths:
        if not p.pruned and p.answer is not None:
            votes[p.answer] = votes.get(p.answer, 0) + 1
    return Solution(answer=answer, votes=votes, paths=paths, generated_tokens=tokens,
                    scoring_tokens=scoring, seconds=0.0, phases={})


@pytest.fixture
def setup():
    rng = random.Random(1234)
    problems = [{"question": f"q{i}", "answer": str(rng.randrange(100))} for i in range(5)]
    table, expected = {}, {}
    for method in ("full", "stop"):
        rows = []
        for seed in (0, 1):
            for p in problems:
                ref = p["answer"]
                wrong = str(int(ref) + 1)
                n_good = rng.randrange(0, 4)
                kept = [_path(ref)] * n_good + [_path(wrong)] * (3 - n_good) + [_path(None)]
                pruned = [_path(wrong, pruned=True)] * rng.randrange(0, 3)
                answer = ref if n_good >= 2 else (wrong if n_good < 2 else None)
                tokens = rng.randrange(50, 500)
                table[p["question"], method, seed] = _solution(kept + pruned, answer, tokens,
                                                               scoring=4 * len(pruned))
                rows.append((float(answer == ref), n_good / 4, tokens, 4 * len(pruned)))
        expected[method] = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
    return problems, table, expected


def test_metrics_and_files(setup, tmp_path):
    problems, table, expected = setup
    fake = FakeReasoner(table)
    res = ev.evaluate(fake, problems, "full,stop", n=4, keep=2, prefix_tokens=3, seeds=[0, 1],
                      batch_size=2, progress=False, temperature=0.7)
    assert list(res["methods"]) == ["full", "stop"]
    for method, (vote, kept, tokens, scoring) in expected.items():
        m = res["methods"][method]
        assert m["vote_accuracy"] == pytest.approx(vote)
        assert m["kept_accuracy"] == pytest.approx(kept)
        assert m["tokens"] == pytest.approx(tokens)
        assert m["scoring_tokens"] == pytest.approx(scoring)
        assert m["runs"] == 10 and m["seconds"] >= 0
        assert [s["seed"] for s in m["per_seed"]] == [0, 1]
        assert sum(s["tokens"] for s in m["per_seed"]) / 2 == pytest.approx(tokens)
    # batches of 2 over 5 problems -> 3 calls per (method, seed); kwargs forwarded
    assert len(fake.calls) == 12
    assert [len(c[0]) for c in fake.calls[:3]] == [2, 2, 1]
    assert all(c[3]["temperature"] == 0.7 and c[3]["n"] == 4 for c in fake.calls)
    assert res["config"]["n"] == 4 and res["config"]["seeds"] == [0, 1]

    paths = ev.write_results(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["methods"]["stop"]["kept_accuracy"] == pytest.approx(expected["stop"][1])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["full", "stop"]
    assert float(rows[0]["tokens"]) == pytest.approx(expected["full"][2])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table_text = ev.format_table(res)
    assert "full" in table_text and "stop" in table_text


def test_vote_checked_through_a_path_text(setup):
    """A checker that only understands texts: the voted answer is checked via a path's text."""
    problems, table, _ = setup
    seen = []

    def checker(text, answer):
        seen.append(text)
        return text.endswith(f": {answer}")

    res = ev.evaluate(FakeReasoner(table), problems[:1], ["stop"], seeds=[0], progress=False,
                      checker=checker)
    assert all(isinstance(t, str) for t in seen)
    sol = table["q0", "stop", 0]
    assert res["methods"]["stop"]["vote_accuracy"] == float(sol.answer == problems[0]["answer"])


def test_bad_input_before_any_generation(setup):
    problems, table, _ = setup
    fake = FakeReasoner(table)
    with pytest.raises(ValueError, match="unknown method"):
        ev.evaluate(fake, problems, "full,nope", progress=False)
    assert fake.calls == []
    with pytest.raises(ValueError, match="methods"):
        ev.evaluate(fake, problems, "", progress=False)
    with pytest.raises(ValueError, match="problems"):
        ev.evaluate(fake, [], "full", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ev.evaluate(fake, problems, "full", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="answer"):
        ev.evaluate(fake, [{"question": "q0"}], "full", progress=False)
    assert fake.calls == []


def test_load_problems(tmp_path):
    f = tmp_path / "bench.jsonl"
    f.write_text('{"question": "1+1?", "answer": 2}\n\n{"id": "b", "question": "x", "answer": "1/2"}\n')
    probs = ev.load_problems(f)
    assert probs == [{"id": 1, "question": "1+1?", "answer": "2"},
                     {"id": "b", "question": "x", "answer": "1/2"}]
    f.write_text('{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="bench.jsonl:1"):
        ev.load_problems(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="JSON"):
        ev.load_problems(f)
    with pytest.raises(FileNotFoundError, match="question"):
        ev.load_problems(tmp_path / "missing.jsonl")


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
    args = _parser().parse_args(["plan", "--budget", "100000", "--prefix-tokens", "2048",
                                 "--task-tokens", "8192", "--keep", "8", "--json"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 24, "keep": 8, "expected_tokens": 98304}
    args = _parser().parse_args(["plan", "--budget", "10", "--prefix-tokens", "2048",
                                 "--task-tokens", "8192", "--ratio", "0.5"])
    with pytest.raises(UserError, match="too small"):
        args.run(args)


@pytest.mark.parametrize("argv,match", [
    (["eval", "--data", "x.jsonl", "--methods", "full,stop"], "--adapter"),
    (["eval", "--data", "x.jsonl", "--methods", "full,nope"], "method"),
    (["eval", "--data", "x.jsonl", "--methods", "random", "--keep", "9", "--n", "4"], "keep"),
    (["solve", "--method", "random", "--prefix-tokens", "0", "q"], "prefix_tokens"),
    (["solve", "--method", "entropy", "--vote", "score", "q"], "vote"),
])
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

    from stopkit.stop import StopScorer
    from test_reasoner import build_tiny

    model, tok = build_tiny()
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    StopScorer.new(model, num_tokens=4, lora_rank=8, seed=3).save(root / "adapter")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two fighting over shared cores
    yield root
    torch.set_num_threads(before)


PROBLEMS = [{"question": "1 + 2 =", "answer": "3"}, {"question": "2 + 2 = x", "answer": "4"},
            {"question": "so 7 is", "answer": "7"}]


def _last_digit(text):
    digits = [w for w in text.split() if w.isdigit()]
    return digits[-1] if digits else None


def test_evaluate_real_reasoner(tiny_dir):
    from stopkit.reasoner import ParallelReasoner
    from stopkit.stop import StopScorer

    model, tok = ev.load_model(str(tiny_dir / "model"), dtype="float32")
    r = ParallelReasoner(model, tok, StopScorer.load(tiny_dir / "adapter", model))
    kw = dict(n=6, keep=2, prefix_tokens=4, max_new_tokens=14, temperature=1.0, top_p=1.0,
              extractor=_last_digit)
    checker = lambda text, ans: _last_digit(text) == ans  # noqa: E731
    res = ev.evaluate(r, PROBLEMS, "full,stop,confidence,entropy,random", seeds=[0, 1],
                      checker=checker, progress=False, batch_size=2, **kw)
    m = res["methods"]
    assert list(m) == ["full", "stop", "confidence", "entropy", "random"]
    # the same launched prefixes for every method: pruning only removes tokens
    assert all(m[k]["tokens"] < m["full"]["tokens"] for k in m if k != "full")
    assert m["stop"]["scoring_tokens"] > 0 and m["full"]["scoring_tokens"] == 0
    # recompute full's and stop's numbers by solving each problem directly
    for method in ("full", "stop"):
        votes, kept, tokens = [], [], []
        for seed in (0, 1):
            sols = r.solve_batch([p["question"] for p in PROBLEMS[:2]], method=method, seed=seed, **kw) \
                + r.solve_batch([PROBLEMS[2]["question"]], method=method, seed=seed, **kw)
            for p, sol in zip(PROBLEMS, sols):
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
    common = ["--model", str(tiny_dir / "model"), "--adapter", str(tiny_dir / "adapter"),
              "--n", "4", "--keep", "2", "--prefix-tokens", "3", "--max-new-tokens", "8",
              "--temperature", "1.0", "--top-p", "1.0", "--dtype", "float32"]
    args = _parser().parse_args(["eval", *common, "--data", str(data), "--methods", "full,stop",
                                 "--seeds", "0,1", "--limit", "2", "--out", str(tmp_path / "out")])
    assert args.run(args) == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["full", "stop"] and res["methods"]["stop"]["runs"] == 4
    assert res["config"]["model"] == str(tiny_dir / "model") and res["config"]["problems"] == 2
    assert (out / "results.csv").read_text().count("\n") == 3
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert "vote acc" in capsys.readouterr().out

    args = _parser().parse_args(["solve", *common, "--method", "stop", "--json", "1 + 2 ="])
    assert args.run(args) == 0
    sol = json.loads(capsys.readouterr().out)
    assert len(sol["paths"]) == 4 and sol["scoring_tokens"] == 4 * sum(
        not p["finished_in_prefix"] for p in sol["paths"])
    assert sol["generated_tokens"] == sum(p["num_tokens"] for p in sol["paths"])
    args = _parser().parse_args(["solve", *common, "--method", "random", "1 + 2 ="])
    assert args.run(args) == 0
    assert "answer:" in capsys.readouterr().out
