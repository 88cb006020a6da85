"""The demo task, its tokenizer and the shipped toy model."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from stopkit import toy
from stopkit.toy import task
from stopkit.toy.tokenizer import STOP_TOKEN, build_tokenizer


def _solve_from_text(question: str) -> list[int]:
    """Independent solver: parse the question text and apply its operations left to right."""
    m = re.fullmatch(r"(\d+) (.*) mod (\d+) \?", question)
    marks = re.findall(r"#(\d+)", question)
    assert marks == [str(i) for i in range(1, len(marks) + 1)]
    assert m, question
    x, p = int(m.group(1)), int(m.group(3))
    out = []
    for op, c in re.findall(r"([+*-]) (\d+)", m.group(2)):
        x = {"+": x + int(c), "-": x - int(c), "*": x * int(c)}[op] % p
        out.append(x)
    return out


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(1 << 30)


def test_generate_is_deterministic(seed):
    a = task.generate(50, seed)
    assert a == task.generate(50, seed)
    assert a != task.generate(50, seed + 1)
    assert task.generate(20, seed) == a[:20]


def test_solutions_are_correct_and_varied(seed):
    problems = task.generate(300, seed)
    for p in problems:
        values = _solve_from_text(p.question)
        assert values == p.values and p.answer == values[-1]
        assert task.MIN_STEPS <= len(p.ops) <= task.MAX_STEPS
        assert all(c not in (0, 1) for op, c in p.ops if op == "*")
        steps = task.extract_steps(p.solution)
        assert [y for *_, y in steps] == values
        assert [x for x, *_ in steps] == [p.start] + values[:-1]
        assert [(op, c) for _, op, c, _ in steps] == list(p.ops)
        assert task.check(p.solution, p.answer)
        assert p.text == f"{p.question} {p.solution}"
    assert {len(p.ops) for p in problems} == set(range(task.MIN_STEPS, task.MAX_STEPS + 1))
    biggest = [max(c for _, c in p.ops) for p in problems]
    assert min(biggest) <= task.SMALL and max(biggest) > task.SMALL


def test_sampled_solutions_slip_at_their_rates_and_never_recover(seed):
    rng = random.Random(seed)
    slips, steps, single_slip, quick = {}, {}, 0, 0
    for p in task.generate(1500, seed):
        text = p.sample_solution(rng)
        got = task.extract_steps(text)
        assert [(op, c) for _, op, c, _ in got] == list(p.ops)
        assert [x for x, *_ in got] == [p.start] + [y for *_, y in got[:-1]]  # carries on
        assert text.split()[0] in task.APPROACHES
        quick += task.is_quick(text)
        assert task.extract_answer(text) == got[-1][3]
        step = task.quick_op if task.is_quick(text) else task.apply_op
        wrong = [y != step(x, op, c) for x, op, c, y in got]
        for (op, c), w in zip(p.ops, wrong, strict=True):
            key = task.slip_rate(op, c)
            slips[key] = slips.get(key, 0) + w
            steps[key] = steps.get(key, 0) + 1
        if sum(wrong) == 1 and not task.is_quick(text):  # a careful step is a bijection mod P
            single_slip += 1
            assert not task.check(text, p.answer)
    assert single_slip > 20
    assert abs(quick / 1500 - task.QUICK_SHARE) < 4 * (task.QUICK_SHARE / 1500) ** 0.5
    for rate, n in steps.items():
        assert abs(slips[rate] / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-3, (rate, n)


def test_quick_traces_carry_the_misconception(seed):
    rng = random.Random(seed)
    assert task.quick_op(5, "-", 8) == 3 and task.apply_op(5, "-", 8) == 28
    assert task.quick_op(8, "-", 5) == 3 and task.quick_op(5, "+", 8) == 13
    assert task.quick_op(20, "*", 3) == task.apply_op(20, "*", 3)
    hits = 0
    for p in task.generate(300, seed):
        quick_chain = p.chain(task.quick_op)
        met = any(
            op == "-" and c > x
            for x, (op, c) in zip([p.start] + quick_chain[:-1], p.ops, strict=True)
        )
        hits += met
        # without slips a quick trace writes the quick chain, and ends wrong exactly when it met a
        # subtraction of a larger number (and did not land back on the answer by chance)
        text = p.sample_solution(rng, quick=True)
        if [y for *_, y in task.extract_steps(text)] == quick_chain:
            assert task.check(text, p.answer) == (quick_chain[-1] == p.answer)
        assert task.is_quick(text) and not task.is_quick(p.solution)
        assert not task.is_quick(p.sample_solution(rng, quick=False))
        if not met:
            assert quick_chain == p.values
    assert 30 < hits < 300


def test_splits_are_disjoint(seed):
    train = task.generate(400, seed, "train")
    test = task.generate(400, seed, "test")
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)
    assert not {p.question for p in train} & {p.question for p in test}
    # the split is a function of the question text alone
    assert all(task.split_of(p.question) == "test" for p in test)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        task.generate(1, 0, "val")
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        task.generate(-1, 0)
    with pytest.raises(ValueError, match="max_steps must be an int >= 5, got 4"):
        task.generate(1, 0, min_steps=5, max_steps=4)


def test_checker_right_wrong_malformed(seed):
    p = task.generate(1, seed)[0]
    wrong = (p.answer + 1 + random.Random(seed).randrange(task.P - 1)) % task.P
    assert task.check(p.solution, p.answer)
    assert task.check(f"so \\boxed{{{p.answer}}}", p.answer)
    assert not task.check(p.solution.rsplit("answer:", 1)[0] + f"answer: {wrong}", p.answer)
    assert not task.check(p.solution.rsplit(" answer:", 1)[0], p.answer)  # no final line
    assert not task.check("answer: banana", p.answer)
    assert not task.check("", p.answer)
    assert task.extract_answer(f"answer: {wrong} , answer: {p.answer}") == p.answer  # last one wins
    with pytest.raises(TypeError, match="text"):
        task.check(None, p.answer)


def test_write_jsonl(tmp_path, seed):
    problems = task.generate(5, seed, "test")
    path = task.write_jsonl(problems, tmp_path / "sub" / "t.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"question": p.question, "answer": str(p.answer)} for p in problems]


def test_tokenizer_round_trip(tmp_path, seed):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for p in task.generate(20, seed):
        ids = tok(p.text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(ids) == 1 + len(p.text.split())  # one token per word
        assert tok.decode(ids, skip_special_tokens=True) == p.text
        assert loaded(p.text)["input_ids"] == ids
    stop = tok.convert_tokens_to_ids(STOP_TOKEN)
    assert stop not in (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.decode([stop]) == STOP_TOKEN and STOP_TOKEN in tok.all_special_tokens
    batch = tok(["1 #1 + 2 mod 31 ?", "1 #1 + 2 #2 * 3 mod 31 ?"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id  # left padding, for batched generation


@pytest.fixture(scope="module")
def shipped():
    return toy.load_model()


def test_shipped_model_matches_tokenizer(shipped):
    model, tok = shipped
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    with pytest.raises(FileNotFoundError, match=r"stopkit\.toy\.build"):
        toy.load_model(path=toy.ASSETS / "missing")
    with pytest.raises(TypeError, match="dtype"):
        toy.load_model(dtype=torch.int32)


def test_shipped_model_greedy_solves_easy_problems(shipped, seed):
    model, tok = shipped
    rng = random.Random(seed)
    problems = [
        task.Problem(
            rng.randrange(task.P),
            tuple((op, rng.randint(2, 5)) for op in rng.choices(task.OPS, k=8)),
        )
        for _ in range(8)
    ]
    enc = tok([p.question for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=100)
    right = 0
    for p, row in zip(problems, out[:, enc["input_ids"].shape[1] :], strict=True):
        assert tok.eos_token_id in row.tolist()
        text = tok.decode(row, skip_special_tokens=True)
        steps = task.extract_steps(text)
        # well formed: the question's operations in order, each step starting from the last result
        assert [(op, c) for _, op, c, _ in steps] == list(p.ops), text
        assert [x for x, *_ in steps] == [p.start] + [y for *_, y in steps[:-1]], text
        assert task.extract_answer(text) == steps[-1][3], text
        right += task.check(text, p.answer)
    assert right >= 6


def test_first_slip_finds_the_first_wrong_step(seed):
    from stopkit.toy.build import first_slip

    rng = random.Random(seed)
    for p in task.generate(200, seed):
        assert first_slip(p, p.solution) is None
        text = p.sample_solution(rng)
        ref = p.chain(task.quick_op if task.is_quick(text) else task.apply_op)
        wrong = [
            i
            for i, ((x, op, c, y), v) in enumerate(zip(task.extract_steps(text), ref, strict=True))
            if y != v
        ]
        assert first_slip(p, text) == (wrong[0] if wrong else None)
        cut = p.solution.split(" #4 ")[0]
        assert first_slip(p, cut) == 3  # stops early: a slip at the missing step
