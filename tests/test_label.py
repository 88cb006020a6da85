"""Monte-Carlo labelling (stopkit.label) on the scheduler: labels against greedy transformers
generation and against independently sampled rollouts counted by hand, resuming, streams that do
not depend on the problems' order or on the budget, traces that end in the prefix, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import QUESTIONS, TOKENIZER, tiny_model, word_tokenizer

from stopkit.cli.label import MAX_NEW_TOKENS as CLI_MAX_NEW_TOKENS
from stopkit.engine import Engine
from stopkit.label import MAX_NEW_TOKENS, _seed, label_problems, label_statistics
from stopkit.loading import prompt_ids


def last_word(text: str, answer: str) -> bool:
    return text.split()[-1] == answer


def greedy(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_label_matches_greedy_generation_and_resumes(tmp_path):
    model = tiny_model()
    P, M = 5, 12
    conts = [greedy(model, prompt_ids(TOKENIZER, q), M) for q in QUESTIONS]
    texts = [TOKENIZER.decode(c, skip_special_tokens=True) for c in conts]
    # problem 0 and 2 answered right (their greedy text's last word), problem 1 wrong
    problems = [
        {"id": f"p{i}", "question": q, "answer": texts[i].split()[-1] if i != 1 else "no"}
        for i, q in enumerate(QUESTIONS)
    ]
    out = tmp_path / "labels.jsonl"
    kw = dict(
        prefix_tokens=P,
        rollouts=3,
        traces=2,
        max_new_tokens=M,
        temperature=0.0,
        checker=last_word,
        progress=False,
    )
    stats = label_problems(model, TOKENIZER, problems, out, **kw)
    assert stats == {"problems": 3, "skipped": 0, "records": 6, "ended_in_prefix": 0}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for rec in records:
        i = int(rec["id"][1])
        prompt = prompt_ids(TOKENIZER, QUESTIONS[i])
        assert rec["prefix_token_ids"] == prompt + conts[i][:P]
        assert rec["prompt_len"] == len(prompt) and rec["question"] == QUESTIONS[i]
        assert rec["n_rollouts"] == 3 and rec["n_correct"] == (0 if i == 1 else 3)
        assert rec["soft_label"] == rec["n_correct"] / 3
    # a problem's records are written together (problems in completion order), traces in order
    ids = [r["id"] for r in records]
    assert sorted(ids) == [f"p{i}" for i in range(3) for _ in range(2)]
    assert all(ids[k] == ids[k + 1] for k in (0, 2, 4))
    assert [r["trace"] for r in records] == [0, 1] * 3
    text = out.read_text()

    # rerun: everything is skipped, nothing written
    assert label_problems(model, TOKENIZER, problems, out, **kw)["skipped"] == 3
    assert out.read_text() == text
    # an interrupted run: the last problem's records lost, a half-written line left behind
    lines = text.splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])
    stats = label_problems(model, TOKENIZER, problems, out, **kw)
    assert stats["skipped"] == 2 and stats["problems"] == 1
    assert sorted(out.read_text().splitlines()) == sorted(text.splitlines())


def test_sampled_labels_count_what_the_checker_saw(tmp_path):
    """At temperature 1 every rollout differs: the label must be the checker's verdicts on the
    decoded prefix + each of the prefix's own rollouts, as an independent generate draws them."""
    model = tiny_model()
    seen: dict[str, bool] = {}

    def checker(text: str, answer: str) -> bool:  # records what it was given
        verdict = len(text.split()) % 3 == 0
        seen[text] = verdict
        return verdict

    problems = [
        {"id": name, "question": q, "answer": "7"} for name, q in zip("ab", QUESTIONS, strict=False)
    ]
    kw = dict(
        prefix_tokens=4,
        rollouts=6,
        traces=3,
        max_new_tokens=11,
        temperature=1.0,
        top_p=1.0,
        seed=5,
        progress=False,
    )
    out = tmp_path / "l.jsonl"
    label_problems(model, TOKENIZER, problems, out, checker=checker, **kw)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        prompt, prefix = (
            rec["prefix_token_ids"][: rec["prompt_len"]],
            rec["prefix_token_ids"][rec["prompt_len"] :],
        )
        assert len(prefix) == 4
        conts = Engine(model).generate(
            [prompt + prefix],
            n=6,
            max_new_tokens=7,
            temperature=1.0,
            top_p=1.0,
            seed=_seed(5, rec["id"], "rollouts"),
        )[0]
        assert len({tuple(c) for c in conts}) > 1  # sampled: the rollouts differ
        texts = [TOKENIZER.decode(prefix + c, skip_special_tokens=True) for c in conts]
        assert all(t in seen for t in texts)  # the checker saw prefix + continuation
        assert rec["n_correct"] == sum(seen[t] for t in texts)
        assert rec["soft_label"] == rec["n_correct"] / 6
    # the rollouts have their own streams: a trace's own continuation is not rollout 0
    trace = Engine(model).generate(
        [prompt_ids(TOKENIZER, QUESTIONS[0])],
        n=3,
        max_new_tokens=11,
        temperature=1.0,
        top_p=1.0,
        seed=_seed(5, "a", "traces"),
    )[0]
    first = [r for r in records if r["id"] == "a"]
    assert [r["prefix_token_ids"][r["prompt_len"] :] for r in first] == [t[:4] for t in trace]
    rollout0 = [
        Engine(model).generate(
            [r["prefix_token_ids"]],
            n=1,
            max_new_tokens=7,
            temperature=1.0,
            top_p=1.0,
            seed=_seed(5, "a", "rollouts"),
        )[0][0]
        for r in first
    ]
    assert rollout0 != [t[4:] for t in trace]


@pytest.mark.parametrize("eos_from", ["model", "tokenizer"])
def test_label_skips_traces_that_end_in_the_prefix(tmp_path, eos_from):
    """EOS as the reasoner has it: the model's, else the tokenizer's."""
    model = tiny_model()
    prompt = prompt_ids(TOKENIZER, QUESTIONS[0])
    eos = greedy(model, prompt, 3)[2]  # greedy decoding ends at step 3
    tokenizer = TOKENIZER
    if eos_from == "model":
        model.generation_config.eos_token_id = eos
    else:
        tokenizer = word_tokenizer(eos_token=TOKENIZER.convert_ids_to_tokens(eos))
    stats = label_problems(
        model,
        tokenizer,
        [{"question": QUESTIONS[0], "answer": "1"}],
        tmp_path / "l.jsonl",
        prefix_tokens=5,
        rollouts=2,
        traces=2,
        max_new_tokens=9,
        temperature=0.0,
        progress=False,
    )
    assert stats == {"problems": 1, "skipped": 0, "records": 0, "ended_in_prefix": 2}


def test_label_streams_do_not_depend_on_order_or_budget(tmp_path):
    """Each problem's samples derive from (seed, problem id, prompt): the order of the problems,
    a resumed run or a tight KV budget (preemptions) does not change them; another seed does."""
    model = tiny_model()
    problems = [
        {"id": name, "question": q, "answer": "3"} for name, q in zip("abc", QUESTIONS, strict=True)
    ]
    kw = dict(
        prefix_tokens=4,
        rollouts=8,
        traces=3,
        max_new_tokens=10,
        temperature=1.0,
        top_p=1.0,
        checker=lambda text, answer: "3" in text.split(),
        progress=False,
    )
    runs = {}
    tight = Engine(model, num_blocks=14, block_size=8, max_num_seqs=12)
    for name, order, seed, engine in (
        ("a", problems, 7, None),
        ("b", problems[::-1], 7, None),
        ("c", problems, 8, None),
        ("d", problems, 7, tight),
    ):
        label_problems(model, TOKENIZER, order, tmp_path / name, seed=seed, engine=engine, **kw)
        runs[name] = sorted((tmp_path / name).read_text().splitlines())
    assert tight.stats.preemptions > 0
    assert runs["a"] == runs["b"] == runs["d"] and runs["a"] != runs["c"]
    recs = [json.loads(x) for x in runs["a"]]
    assert len({tuple(r["prefix_token_ids"]) for r in recs}) == len(recs)  # traces differ


def test_label_statistics_and_defaults():
    recs = [
        {"id": "a", "soft_label": 0.0},
        {"id": "a", "soft_label": 0.0},
        {"id": "b", "soft_label": 1.0},
        {"id": "b", "soft_label": 0.5},
    ]
    assert label_statistics(recs) == {
        "records": 4,
        "problems": 2,
        "mean_label": 0.375,
        "at_0": 0.5,
        "at_1": 0.25,
        "all_0_problems": 0.5,
        "all_1_problems": 0.0,
    }
    assert CLI_MAX_NEW_TOKENS == MAX_NEW_TOKENS >= 16384  # reasoning rollouts are not cut short


def test_label_rejects_bad_input(tmp_path):
    model = tiny_model()
    good = [{"question": QUESTIONS[0], "answer": "1"}]
    with pytest.raises(ValueError, match="max_new_tokens"):
        label_problems(model, TOKENIZER, good, tmp_path / "x", prefix_tokens=8, max_new_tokens=8)
    with pytest.raises(ValueError, match="rollouts"):
        label_problems(model, TOKENIZER, good, tmp_path / "x", prefix_tokens=2, rollouts=0)
    with pytest.raises(ValueError, match="question"):
        label_problems(model, TOKENIZER, [{"answer": "1"}], tmp_path / "x", prefix_tokens=2)
    with pytest.raises(ValueError, match="unique"):
        label_problems(
            model,
            TOKENIZER,
            [dict(good[0], id=3), dict(good[0], id="3")],
            tmp_path / "x",
            prefix_tokens=2,
        )
    assert not (tmp_path / "x").exists()
