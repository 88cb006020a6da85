"""The demo behind ``stopkit demo``: STOP against full decoding and the baselines on the toy task.

Loads the shipped tiny model and its STOP adapter (nothing is trained or downloaded), samples N
paths for each held-out problem, and compares methods at the same N, k and l_p: ``full`` (every
path to the end), ``stop`` (the learned scorer), ``confidence`` (DeepConf-style) and ``random``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from stopkit._checks import check_int, check_ints
from stopkit.toy import ADAPTER_DIR, MAX_NEW_TOKENS, PREFIX_TOKENS, TEMPERATURE, task

log = logging.getLogger(__name__)

METHODS = ("full", "stop", "confidence", "random")
EXTRA_METHODS = ("entropy", "similarity")  # run when asked for, not by default


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults: the README's table."""

    problems: int = 128  # held-out problems
    n: int = 32  # paths per problem
    keep: int = 8  # paths resumed after the check (N*l_p + k*(T-l_p) ~ 38% of N*T)
    prefix_tokens: int = PREFIX_TOKENS  # l_p: tokens decoded before the check (the adapter's)
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 1234  # which held-out problems
    methods: tuple[str, ...] = METHODS
    threads: int = 1  # torch threads: a 2.4M-parameter model gains nothing from more

    def __post_init__(self) -> None:
        """Checked when made, so a bad config fails before the model loads."""
        for name in ("problems", "n", "threads"):
            check_int(name, getattr(self, name), 1)
        check_int("keep", self.keep, 1, self.n)
        check_int("prefix_tokens", self.prefix_tokens, 1, MAX_NEW_TOKENS - 1)
        check_int("data_seed", self.data_seed)
        if not check_ints("seeds", self.seeds):
            raise ValueError("seeds must hold at least one seed, got ()")
        methods = self.methods
        if isinstance(methods, str) or not methods or len(set(methods)) != len(methods):
            raise ValueError(
                f"methods must be a non-empty tuple of distinct method names, got {self.methods!r}"
            )
        unknown = [m for m in self.methods if m not in METHODS + EXTRA_METHODS]
        if unknown:
            raise ValueError(
                f"methods must be among {', '.join(METHODS + EXTRA_METHODS)}, got {unknown}"
            )


def run_demo(config: DemoConfig = DemoConfig(), *, progress: bool = True) -> dict:
    """Run the demo; returns ``{"methods": {name: {avg_at_k, maj_at_k, pass_at_k, vote_accuracy,
    kept_accuracy, tokens, seconds, ...}}, "config": {...}}`` (the schema of ``stopkit demo
    --json``)."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, t0, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, t0: float, progress: bool) -> dict:
    from stopkit.evaluate import evaluate
    from stopkit.reasoner import ParallelReasoner
    from stopkit.stop import StopScorer
    from stopkit.toy import load_model

    model, tokenizer = load_model(torch.float32)
    scorer = StopScorer.load(ADAPTER_DIR, model) if "stop" in config.methods else None
    reasoner = ParallelReasoner(model, tokenizer, scorer)
    problems = task.generate(config.problems, seed=config.data_seed, split="test")
    log.info(
        "loaded the toy model and adapter in %.1fs; %d held-out problems",
        time.perf_counter() - t0,
        len(problems),
    )
    results = evaluate(
        reasoner,
        [{"question": p.question, "answer": p.answer} for p in problems],
        list(config.methods),
        n=config.n,
        keep=config.keep,
        prefix_tokens=config.prefix_tokens,
        max_new_tokens=MAX_NEW_TOKENS,
        seeds=config.seeds,
        checker=task.check,
        progress=progress,
        temperature=TEMPERATURE,
        top_p=1.0,
        extractor=task.extract_answer,
    )
    results["config"]["seconds_total"] = round(time.perf_counter() - t0, 2)
    return results
