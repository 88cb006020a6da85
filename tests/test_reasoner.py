"""ParallelReasoner: every method and vote, the schedule, early stop, exact token accounting,
reproducibility, batches and bad input, on a tiny random Llama (checked against an independent
plain-transformers forward and against the no-pruning run of the same seed)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_stop import head_of, peft_twin, two_stage_reference
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stopkit.reasoner import (
    ParallelReasoner,
    Solution,
    confidence_score,
    default_extractor,
    entropy_score,
    vote,
)
from stopkit.stop import StopScorer

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    *map(str, range(10)),
    "+",
    "=",
    "answer:",
    "so",
    "is",
    "x",
    "y",
    "then",
]
EOS = 2


def build_tiny(seed: int = 0):
    """A 2-layer Llama (head_dim 64) with a word-level tokenizer of 22 tokens; the LM head is
    scaled up so next-token distributions are peaked and differ between paths."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)
    return model, tok


def last_digit(text: str):
    digits = [w for w in text.split() if w.isdigit()]
    return digits[-1] if digits else None


QUESTION = "1 + 2 ="
# seed 1 of this model: 2 of the 8 paths end inside a 6-token prefix (one exactly at token 6),
# 6 go on, several end before max_new_tokens
RUN = dict(
    n=8,
    keep=3,
    prefix_tokens=6,
    max_new_tokens=32,
    seed=1,
    temperature=1.0,
    top_p=1.0,
    extractor=last_digit,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls: one thread is much faster than two fighting over shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny()
    scorer = StopScorer.new(model, num_tokens=4, lora_rank=8, seed=3)
    with torch.no_grad():  # a non-trivial adapter, so the [STOP] pass differs from the base model
        for lo in scorer.loras:
            lo.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return model, tok, scorer


@pytest.fixture(scope="module")
def reasoner(tiny):
    model, tok, scorer = tiny
    return ParallelReasoner(model, tok, scorer)


@pytest.fixture(scope="module")
def full(reasoner):
    """The no-pruning run of RUN: every other method must reproduce its prefixes and kept paths."""
    return reasoner.solve(QUESTION, method="full", **RUN)


def _hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log-probabilities [len(tokens), V] of the model's distribution before each token (plain
    transformers, dense attention)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1)


def _hf_entropies(model, prompt, tokens) -> torch.Tensor:
    lp = _hf_logprobs(model, prompt, tokens)
    return -(lp.exp() * lp).sum(-1)


def _hf_stop_scores(scorer: StopScorer, prompt: list[int], prefixes: dict) -> dict:
    """{path: score} of prompt + prefix by plain transformers + PEFT holding the scorer's LoRA
    factors: the prefix without the adapter, then the [STOP] tokens with it, final norm -> head."""
    ref = two_stage_reference(
        peft_twin(scorer),
        scorer.token.detach(),
        scorer.num_tokens,
        head_of(scorer),
        [prompt + p for p in prefixes.values()],
    )
    return dict(zip(prefixes, ref.tolist(), strict=True))


# ---- pure functions ---------------------------------------------------------------------------
def test_vote_rules():
    assert vote(["a", "b", "b", None], [1, 1, 1, 1]) == ("b", {"a": 1.0, "b": 2.0})
    assert vote(["a", "b", "b"], [3.0, 1.0, 1.0]) == ("a", {"a": 3.0, "b": 2.0})
    # equal weight: more paths win; then the first occurrence
    assert vote(["a", "b", "b"], [2.0, 1.0, 1.0])[0] == "b"
    assert vote(["c", "a", "a", "c"], [1, 1, 1, 1])[0] == "c"
    assert vote([None, None], [1, 1]) == (None, {})
    assert vote([], []) == (None, {})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weights"):
            vote(["a"], [bad])
    with pytest.raises(ValueError, match="same length"):
        vote(["a", "b"], [1.0])


def test_vote_random_against_counting():
    rng = random.Random(11)
    for _ in range(50):
        answers = [rng.choice(["x", "y", "z", None]) for _ in range(rng.randrange(1, 12))]
        weights = [rng.choice([0.5, 1.0, 2.0]) for _ in answers]
        winner, totals = vote(answers, weights)
        expect = {}
        for a, w in zip(answers, weights, strict=True):
            if a is not None:
                expect[a] = expect.get(a, 0.0) + w
        assert totals == pytest.approx(expect)
        if expect:
            best = max(expect.values())
            tied = [a for a in expect if expect[a] == best]
            most = max(answers.count(a) for a in tied)
            first = next(a for a in answers if a in tied and answers.count(a) == most)
            assert winner == first


def test_confidence_score_bruteforce():
    lp = torch.randn(13, 20).sort(dim=-1, descending=True).values - 3.0
    conf = [-float(lp[t, :5].double().mean()) for t in range(13)]
    for window in (1, 4, 13, 100):
        w = min(window, 13)
        expect = min(sum(conf[s : s + w]) / w for s in range(13 - w + 1))
        assert confidence_score(lp, window=window, k=5) == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="top_logprobs"):
        confidence_score(lp, k=21)
    with pytest.raises(ValueError, match="top_logprobs"):
        confidence_score(lp[:0])


def test_entropy_score():
    h = torch.rand(9) * 3
    assert entropy_score(h) == pytest.approx(-float(h.double().mean()), rel=1e-12)
    with pytest.raises(ValueError, match="entropies"):
        entropy_score(h[:0])


def test_default_extractor_normalises():
    assert (
        default_extractor("so \\boxed{0.5}") == default_extractor("answer: \\frac{1}{2}") == "1/2"
    )
    assert default_extractor("no answer here") is None


# ---- the no-pruning run -----------------------------------------------------------------------
def test_full_equals_engine_generate(reasoner, full):
    prompt = reasoner.prompt_ids(QUESTION)
    ref = reasoner.engine.generate(
        [prompt], n=8, max_new_tokens=32, temperature=1.0, top_p=1.0, seed=1
    )[0]
    assert [p.tokens for p in full.paths] == ref
    assert full.generated_tokens == sum(map(len, ref))
    assert full.scoring_tokens == 0 and not any(p.pruned or p.score is not None for p in full.paths)
    for p in full.paths:
        eos = p.tokens[-1] == EOS
        assert p.finish_reason == ("eos" if eos else "length")
        assert p.finished_in_prefix == (eos and len(p.tokens) <= 6)
        assert p.text == reasoner.tokenizer.decode(p.tokens, skip_special_tokens=True)
        assert p.answer == last_digit(p.text)
    assert sum(p.finished_in_prefix for p in full.paths) == 2
    assert any(len(p.tokens) == 6 and p.finished_in_prefix for p in full.paths)
    counts = {}
    for p in full.paths:
        if p.answer is not None:
            counts[p.answer] = counts.get(p.answer, 0) + 1
    assert (
        full.votes == counts and full.answer == vote([p.answer for p in full.paths], [1.0] * 8)[0]
    )
    assert set(full.phases) == {"launch", "check", "resume"} and full.phases["check"] == 0.0
    assert full.seconds >= sum(full.phases.values()) * 0.99 > 0


# ---- every pruning method ---------------------------------------------------------------------
def _judge(tokens, text):
    return float(sum(tokens) % 7) + 0.1 * len(text.split())


@pytest.mark.parametrize("method", ["stop", "confidence", "entropy", "random", "callable"])
def test_pruning_method(method, reasoner, tiny, full):
    model, tok, scorer = tiny
    m = _judge if method == "callable" else method
    sol = reasoner.solve(QUESTION, method=m, **RUN)
    prompt = reasoner.prompt_ids(QUESTION)
    unfinished = [i for i, p in enumerate(full.paths) if not p.finished_in_prefix]
    assert len(unfinished) == 6
    # prefixes and resumed paths are exactly those of the no-pruning run (per-path random streams)
    for i, (p, f) in enumerate(zip(sol.paths, full.paths, strict=True)):
        assert p.finished_in_prefix == f.finished_in_prefix
        if p.pruned:
            assert i in unfinished and p.tokens == f.tokens[:6] and p.answer is None
            assert p.finish_reason == "pruned"
        else:
            assert p.tokens == f.tokens and p.answer == f.answer
            assert p.finish_reason == f.finish_reason
    # exact accounting
    assert sol.generated_tokens == sum(len(p.tokens) for p in sol.paths)
    assert sol.generated_tokens == (
        full.generated_tokens
        - sum(len(f.tokens) - 6 for p, f in zip(sol.paths, full.paths, strict=True) if p.pruned)
    )
    assert sol.scoring_tokens == (4 * len(unfinished) if method == "stop" else 0)
    # the kept paths are the best 3 unfinished ones by score (ties to the earlier path)
    scores = {i: sol.paths[i].score for i in unfinished}
    assert all(sol.paths[i].score is None for i in range(8) if i not in unfinished)
    best = sorted(unfinished, key=lambda i: (-scores[i], i))[:3]
    assert sorted(i for i in unfinished if not sol.paths[i].pruned) == sorted(best)
    assert sum(p.pruned for p in sol.paths) == 3
    # scores against an independent computation on the prefixes
    prefixes = {i: full.paths[i].tokens[:6] for i in unfinished}
    stop_scores = _hf_stop_scores(scorer, prompt, prefixes) if method == "stop" else {}
    for i in unfinished:
        got = scores[i]
        if method == "stop":
            assert got == pytest.approx(stop_scores[i], rel=1e-5, abs=1e-6)
        elif method == "confidence":
            top = _hf_logprobs(model, prompt, prefixes[i]).topk(20, dim=-1).values
            conf = -top.mean(-1)  # window 2048 > 6 tokens: the mean over the whole prefix
            assert got == pytest.approx(float(conf.mean()), rel=1e-5)
        elif method == "entropy":
            assert got == pytest.approx(
                -float(_hf_entropies(model, prompt, prefixes[i]).mean()), rel=1e-5
            )
        elif method == "random":
            assert 0.0 <= got < 1.0
        else:
            assert got == _judge(prefixes[i], tok.decode(prefixes[i], skip_special_tokens=True))
    if method == "random":
        other = reasoner.solve(QUESTION, method="random", **{**RUN, "seed": 2})
        assert [p.score for p in other.paths] != [p.score for p in sol.paths]
    # the vote is the majority over every path that was not pruned
    voters = [p for p in sol.paths if not p.pruned]
    assert (sol.answer, sol.votes) == vote([p.answer for p in voters], [1.0] * len(voters))


def test_confidence_window(tiny):
    model, tok, _ = tiny
    r = ParallelReasoner(model, tok, confidence_window=3, confidence_top_k=5)
    sol = r.solve(QUESTION, method="confidence", **RUN)
    prompt = r.prompt_ids(QUESTION)
    for p in sol.paths:
        if p.score is not None:
            lp = _hf_logprobs(model, prompt, p.tokens[:6])
            conf = -lp.topk(5, dim=-1).values.mean(-1)
            expect = min(float(conf[s : s + 3].mean()) for s in range(4))
            assert p.score == pytest.approx(expect, rel=1e-5)


def test_score_and_entropy_votes(reasoner, tiny):
    model, _, _ = tiny
    prompt = reasoner.prompt_ids(QUESTION)
    sol = reasoner.solve(QUESTION, method="stop", vote="score", **RUN)
    expect = {}
    for p in sol.paths:
        if not p.pruned and p.answer is not None:
            w = 1.0 if p.finished_in_prefix else p.score  # finished in prefix: never scored
            expect[p.answer] = expect.get(p.answer, 0.0) + w
    assert sol.votes == pytest.approx(expect)
    assert sol.answer == vote(list(expect), list(expect.values()))[0]

    sol = reasoner.solve(QUESTION, method="confidence", vote="entropy", **RUN)
    expect = {}
    for p in sol.paths:
        if not p.pruned and p.answer is not None:
            h = float(_hf_entropies(model, prompt, p.tokens).mean())
            expect[p.answer] = expect.get(p.answer, 0.0) + 1.0 / h
    assert sol.votes == pytest.approx(expect, rel=1e-5)
    assert sol.answer == max(expect, key=expect.get)


# ---- beyond the paper -------------------------------------------------------------------------
def test_schedule(reasoner, tiny, full):
    model = tiny[0]
    prompt = reasoner.prompt_ids(QUESTION)
    sol = reasoner.solve(
        QUESTION,
        method="entropy",
        schedule=[(4, 5), (9, 2)],
        **{k: v for k, v in RUN.items() if k not in ("keep", "prefix_tokens")},
    )
    lens = [len(p.tokens) for p in sol.paths]
    ends = [len(f.tokens) if f.finish_reason == "eos" else math.inf for f in full.paths]

    def worst(idx, prefix, keep):
        """Independent check: the paths of ``idx`` outside the best ``keep`` by -mean entropy."""
        s = {
            i: -float(_hf_entropies(model, prompt, full.paths[i].tokens[:prefix]).mean())
            for i in idx
        }
        return sorted(sorted(idx, key=lambda i: (-s[i], i))[keep:]), s

    alive1 = [i for i in range(8) if ends[i] > 4]
    pruned1, s1 = worst(alive1, 4, 5)
    alive2 = [i for i in alive1 if i not in pruned1 and ends[i] > 9]
    pruned2, s2 = worst(alive2, 9, 2)
    assert pruned1 and pruned2  # both rounds prune something in this run
    assert [i for i in range(8) if sol.paths[i].pruned and lens[i] == 4] == pruned1
    assert [i for i in range(8) if sol.paths[i].pruned and lens[i] == 9] == pruned2
    assert sum(p.pruned for p in sol.paths) == len(pruned1) + len(pruned2)
    for i, p in enumerate(sol.paths):  # a path keeps the score of the last round that scored it
        expect = s2.get(i, s1.get(i))
        assert (p.score is None) == (expect is None)
        if expect is not None:
            assert p.score == pytest.approx(expect, rel=1e-5)
    for p, f, end in zip(sol.paths, full.paths, ends, strict=True):
        assert p.tokens == (f.tokens[: len(p.tokens)] if p.pruned else f.tokens)
        assert p.finished_in_prefix == (end <= 4)
    assert sol.generated_tokens == sum(lens)


def test_stop_schedule_scores_and_counts_every_round(reasoner, tiny, full):
    """Two stop rounds: each scores the paths alive at it (scores checked against plain
    transformers + PEFT), keeps the best, and processes num_tokens [STOP] tokens per path scored;
    the token phases add up, alone and beside another question."""
    scorer = tiny[2]
    prompt = reasoner.prompt_ids(QUESTION)
    run = dict(
        schedule=[(4, 5), (9, 2)],
        **{k: v for k, v in RUN.items() if k not in ("keep", "prefix_tokens")},
    )
    sol = reasoner.solve(QUESTION, method="stop", **run)
    ends = [len(f.tokens) if f.finish_reason == "eos" else math.inf for f in full.paths]

    def round_(alive, prefix, keep):
        s = _hf_stop_scores(scorer, prompt, {i: full.paths[i].tokens[:prefix] for i in alive})
        kept = sorted(alive, key=lambda i: (-s[i], i))[:keep]
        return kept, s

    alive1 = [i for i in range(8) if ends[i] > 4]
    kept1, s1 = round_(alive1, 4, 5)
    alive2 = [i for i in kept1 if ends[i] > 9]
    kept2, s2 = round_(alive2, 9, 2)
    assert len(alive1) > 5 and len(alive2) > 2  # both rounds prune
    lens = [
        4
        if i in alive1 and i not in kept1
        else 9
        if i in alive2 and i not in kept2
        else len(full.paths[i].tokens)
        for i in range(8)
    ]
    assert [len(p.tokens) for p in sol.paths] == lens
    assert [p.pruned for p in sol.paths] == [lens[i] < len(full.paths[i].tokens) for i in range(8)]
    for i, p in enumerate(sol.paths):
        expect = s2.get(i, s1.get(i))
        assert p.score == (None if expect is None else pytest.approx(expect, rel=1e-5, abs=1e-6))
    check = 4 * (len(alive1) + len(alive2))  # the fixture's scorer has 4 [STOP] tokens
    launch = sum(min(n, 4) for n in lens)
    assert sol.scoring_tokens == check
    assert sol.tokens == {"launch": launch, "check": check, "resume": sum(lens) - launch}
    # beside another question, each question counts its own rows
    both = reasoner.solve_batch([QUESTION, "2 + 2 ="], method="stop", **run)
    assert both[0].tokens == sol.tokens and both[0].scoring_tokens == check


def test_early_stop(reasoner, full):
    # every finished path answers "A": the run must stop right after the 2nd path ends
    run = {**RUN, "extractor": lambda text: "A"}
    ends = sorted(len(f.tokens) for f in full.paths if f.finish_reason == "eos")
    assert len(ends) >= 3
    sol = reasoner.solve(QUESTION, method="full", early_stop=2, **run)
    cut = [p for p in sol.paths if p.finish_reason == "early_stop"]
    assert cut and all(p.answer is None and not p.pruned for p in cut)
    stop_at = len(cut[0].tokens)
    assert all(len(p.tokens) == stop_at for p in cut)
    assert ends[1] <= stop_at < ends[1] + 16
    assert max(len(p.tokens) for p in sol.paths) == stop_at
    assert sol.answer == "A" and sol.votes["A"] == sum(e <= stop_at for e in ends) >= 2
    assert sol.generated_tokens == sum(len(p.tokens) for p in sol.paths) < full.generated_tokens
    for p, f in zip(sol.paths, full.paths, strict=True):
        assert p.tokens == f.tokens[: len(p.tokens)]
    # a threshold no answer reaches changes nothing
    never = reasoner.solve(QUESTION, method="full", early_stop=99, **run)
    assert [p.tokens for p in never.paths] == [p.tokens for p in full.paths]


def test_seed_reproduces_a_run(reasoner):
    a = reasoner.solve(QUESTION, method="stop", vote="score", **{**RUN, "seed": 5})
    b = reasoner.solve(QUESTION, method="stop", vote="score", **{**RUN, "seed": 5})
    c = reasoner.solve(QUESTION, method="stop", vote="score", **{**RUN, "seed": 6})

    def key(s: Solution):
        return (
            s.answer,
            s.votes,
            s.generated_tokens,
            s.scoring_tokens,
            [
                (
                    p.tokens,
                    p.text,
                    p.answer,
                    p.score,
                    p.pruned,
                    p.finished_in_prefix,
                    p.finish_reason,
                )
                for p in s.paths
            ],
        )

    assert key(a) == key(b)
    assert [p.tokens for p in a.paths] != [p.tokens for p in c.paths]


def test_solve_batch_prunes_per_question(reasoner):
    ids = reasoner.prompt_ids("2 + 2 = x")
    sols = reasoner.solve_batch([QUESTION, ids], method="confidence", **RUN)
    alone = reasoner.solve(QUESTION, method="confidence", **RUN)
    # question 0 of a batch draws the same streams as alone (scores equal up to batched float
    # rounding); pruning is per question
    assert [(p.tokens, p.pruned) for p in sols[0].paths] == [
        (p.tokens, p.pruned) for p in alone.paths
    ]
    assert [p.score or 0.0 for p in sols[0].paths] == pytest.approx(
        [p.score or 0.0 for p in alone.paths], rel=1e-5
    )
    assert (sols[0].answer, sols[0].votes) == (alone.answer, alone.votes)
    for sol in sols:
        assert len(sol.paths) == 8
        unfinished = sum(not p.finished_in_prefix for p in sol.paths)
        assert sum(p.pruned for p in sol.paths) == max(0, unfinished - 3)
        assert sol.generated_tokens == sum(len(p.tokens) for p in sol.paths)
    assert [p.tokens for p in sols[1].paths] != [p.tokens for p in sols[0].paths]


def test_chat_template_and_prompt_ids(tiny):
    model, tok, _ = tiny
    r = ParallelReasoner(model, tok)
    assert r.prompt_ids([1, 5, 6]) == [1, 5, 6]
    assert r.prompt_ids(torch.tensor([1, 5])) == [1, 5]
    assert r.prompt_ids("1 + 2") == tok("1 + 2")["input_ids"]
    templated = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    templated.chat_template = "<s> {% for m in messages %}{{ m['content'] }}{% endfor %} ="
    r = ParallelReasoner(model, templated)
    ids = r.prompt_ids("1 + 2")  # chat models get the paper's instruction (words unknown here)
    assert ids[:4] == [1, 5, 14, 6] and ids[-1] == 15 and len(ids) > 5
    with pytest.raises(TypeError, match="question"):
        r.prompt_ids(3.5)


# ---- bad input: refused before any generation -------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(keep=9), ValueError, "keep"),
        (dict(keep=0), ValueError, "keep"),
        (dict(prefix_tokens=0), ValueError, "prefix_tokens"),
        (dict(prefix_tokens=32), ValueError, "max_new_tokens"),
        (dict(n=0), ValueError, "n must"),
        (dict(method="nope"), ValueError, "method"),
        (dict(method=3), TypeError, "method"),
        (dict(vote="nope"), ValueError, "vote"),
        (dict(method="entropy", vote="score"), ValueError, "vote"),
        (dict(early_stop=0), ValueError, "early_stop"),
        (dict(schedule=[(4, 5), (4, 2)]), ValueError, "schedule"),
        (dict(schedule=[(4, 2), (8, 5)]), ValueError, "schedule"),
        (dict(schedule=[(4, 9)]), ValueError, "keep"),
        (dict(schedule=[(4, 2), (40, 1)]), ValueError, "max_new_tokens"),
        (dict(schedule=[(4,)]), TypeError, "schedule"),
        (dict(schedule=[(4, 2)], method="full"), ValueError, "full"),
        (dict(extractor="last"), TypeError, "extractor"),
        (dict(seed=None), TypeError, "seed"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_input(kwargs, exc, match, tiny, monkeypatch):
    model, tok, scorer = tiny
    r = ParallelReasoner(model, tok, scorer)
    monkeypatch.setattr(r.engine, "add_request", lambda *a, **k: pytest.fail("generation started"))
    args = {**RUN, "method": "confidence", **kwargs}
    with pytest.raises(exc, match=match):
        r.solve(QUESTION, **args)


def test_stop_needs_a_matching_scorer(tiny, monkeypatch):
    model, tok, scorer = tiny
    r = ParallelReasoner(model, tok)
    monkeypatch.setattr(r.engine, "add_request", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(ValueError, match="scorer"):
        r.solve(QUESTION, method="stop", **RUN)
    other, _ = build_tiny(seed=1)
    with pytest.raises(ValueError, match="scorer"):
        ParallelReasoner(other, tok, scorer)
    # full ignores keep
    assert r.check_args(n=2, keep=8, prefix_tokens=4, max_new_tokens=8, method="full").n == 2


# ---- external methods (the paper's Types I and II) ----------------------------------------------
def _classifier(path):
    from transformers import LlamaConfig as Cfg
    from transformers import LlamaForSequenceClassification

    from stopkit.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = LlamaForSequenceClassification(
            Cfg(
                vocab_size=len(tok),
                pad_token_id=tok.pad_token_id,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                num_labels=2,
                initializer_range=0.5,
            )
        )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["similarity", "verifier"])
def test_external_methods(kind, tiny, full, tmp_path):
    from stopkit.similarity import SimilarityScorer
    from stopkit.verifier import Verifier

    model, tok, scorer = tiny
    method = "similarity" if kind == "similarity" else f"verifier:{_classifier(tmp_path / 'v')}"
    reasoner = ParallelReasoner(model, tok, scorer)
    sol = reasoner.solve(QUESTION, method=method, **RUN)
    unfinished = [i for i, p in enumerate(full.paths) if not p.finished_in_prefix]
    prefixes = [full.paths[i].tokens[:6] for i in unfinished]
    texts = [tok.decode(p, skip_special_tokens=True) for p in prefixes]
    # an independent scorer of the same kind on the no-pruning run's prefixes
    fresh = SimilarityScorer() if kind == "similarity" else Verifier.load(method.split(":", 1)[1])
    expect = fresh.score(QUESTION, texts, prefixes)
    assert [sol.paths[i].score for i in unfinished] == pytest.approx(expect, rel=1e-5)
    best = sorted(range(len(unfinished)), key=lambda j: (-expect[j], j))[:3]
    assert sorted(unfinished[j] for j in best) == [i for i in unfinished if not sol.paths[i].pruned]
    for p, f in zip(sol.paths, full.paths, strict=True):
        assert p.tokens == (f.tokens[:6] if p.pruned else f.tokens)
    assert sol.external_tokens == fresh.tokens and (fresh.tokens > 0) == (kind == "verifier")
    assert sol.scoring_tokens == 0


def test_external_method_errors(tiny, monkeypatch):
    model, tok, scorer = tiny
    r = ParallelReasoner(model, tok, scorer)
    monkeypatch.setattr(r.engine, "add_request", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(FileNotFoundError):
        r.solve(QUESTION, method="verifier:/no/such/model", **RUN)
    with pytest.raises(ValueError, match="verifier"):
        r.solve(QUESTION, method="verifier", **RUN)
    with pytest.raises(ValueError, match="vote 'score'"):
        r.solve(QUESTION, method="similarity:/some/model", vote="score", **RUN)
