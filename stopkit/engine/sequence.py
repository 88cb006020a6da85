"""Requests of the engine: a :class:`Group` (one prompt and its ``n`` sampled rows, with the
checkpoints where its rows pause) and a :class:`Row` (one sampled sequence, a path).

A row is WAITING (not in the KV cache: not admitted yet, or preempted; it keeps every token it
has), RUNNING (in the cache; ``num_cached`` of its prompt + tokens are cached, the rest wait for a
prefill chunk) or done (``finish_reason`` set). The scheduler moves rows between these states;
everything here is plain bookkeeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from stopkit.sampling import sample_key

__all__ = ["Row", "Group", "SamplingParams", "RowStatus", "FINISH_REASONS", "request_key"]

# How a row ended: "eos" and "length" (max_new_tokens) finish it; the others end it early:
# "pruned" (dropped at a check), "early_stop" (its question already has its answer), "aborted"
# (its request was cancelled, e.g. a client disconnected).
FINISH_REASONS = ("eos", "length", "pruned", "early_stop", "aborted")


class RowStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class SamplingParams:
    """How a group's rows sample: temperature 0 is greedy; top_k 0 and top_p 1 disable those
    filters; eos: token ids that end a row; max_new_tokens None: rows end only at EOS (or when
    dropped); record_logprobs / top_logprobs: what each row records per token (see :class:`Row`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    eos: tuple[int, ...] = ()
    max_new_tokens: int | None = None
    record_logprobs: bool = False
    top_logprobs: int = 0


def request_key(prompt: list[int]) -> int:
    """The default random-stream key of a request: a 64-bit FNV-1a hash of its prompt ids, so a
    prompt's samples depend on (seed, prompt, sample index) only, never on what else runs."""
    h = 0xCBF29CE484222325
    for t in prompt:
        h = ((h ^ (t & 0xFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h ^ len(prompt)


@dataclass(eq=False)
class Row:
    """One sampled sequence (path) of a :class:`Group`.

    prompt_index, sample_index: which prompt of the call and which of its ``n`` samples. tokens:
    the new tokens (up to and including EOS). logprobs / entropies (with ``record_logprobs``): per
    token, the log probability of the chosen token and the entropy (nats) of the MODEL's
    next-token distribution, i.e. ``log_softmax(logits)`` at temperature 1 before
    top-k/top-p/min-p; the sampler draws from the tempered, filtered distribution, these describe
    the model itself. finish_reason: None while the row is live, else one of FINISH_REASONS.
    """

    group: Group = field(repr=False)
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    status: RowStatus = field(default=RowStatus.WAITING, repr=False)
    num_cached: int = field(default=0, repr=False)  # tokens of prompt + tokens in the KV cache
    stream: tuple[int, int] = field(default=(0, 0), repr=False)  # its random stream's key
    _top_values: list[torch.Tensor] = field(default_factory=list, repr=False, init=False)
    _top_ids: list[torch.Tensor] = field(default_factory=list, repr=False, init=False)

    @property
    def prompt(self) -> list[int]:
        return self.group.prompt

    @property
    def prompt_index(self) -> int:
        return self.group.index

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the cache holds once the row is fully cached."""
        return len(self.group.prompt) + len(self.tokens)

    @property
    def live(self) -> bool:
        """Not ended: decoding continues (or waits for a check, or for room in the cache)."""
        return self.finish_reason is None

    @property
    def finished(self) -> bool:
        """Ended by EOS or by max_new_tokens (not dropped)."""
        return self.finish_reason in ("eos", "length")

    @property
    def at_check(self) -> bool:
        """Live and holding as many tokens as its group's next check: it samples no more until the
        check is resolved."""
        check = self.group.next_check
        return self.live and check is not None and len(self.tokens) >= check

    @property
    def top_logprobs(self) -> torch.Tensor:
        """float32 ``[T, k]``: the k largest log-probabilities of the model's distribution (as for
        :attr:`logprobs`) at each generated token, descending; ``[0, 0]`` when not recorded."""
        return torch.stack(self._top_values) if self._top_values else torch.zeros(0, 0)

    @property
    def top_ids(self) -> torch.Tensor:
        """int64 ``[T, k]``: the token ids of :attr:`top_logprobs`."""
        return torch.stack(self._top_ids) if self._top_ids else torch.zeros(0, 0, dtype=torch.int64)

    def unrecord(self) -> None:
        """Undo the last :meth:`record`."""
        self.tokens.pop()
        if len(self.logprobs) > len(self.tokens):
            self.logprobs.pop()
            self.entropies.pop()
        if len(self._top_values) > len(self.tokens):
            self._top_values.pop()
            self._top_ids.pop()

    def record(
        self,
        token: int,
        logprob: float | None,
        entropy: float | None,
        top: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.tokens.append(token)
        if logprob is not None and entropy is not None:  # both or neither
            self.logprobs.append(logprob)
            self.entropies.append(entropy)
        if top is not None:
            self._top_values.append(top[0])
            self._top_ids.append(top[1])


@dataclass(eq=False)
class Group:
    """One request: a prompt and its ``n`` rows, sampled with ``sampling``.

    index: the caller's index of this prompt (``Row.prompt_index``); order: admission priority
    (lower runs first and is preempted last). key: the random-stream key (sample s of the group
    draws from ``(sampling.seed, key, s)``). checks: increasing token counts at which every row
    pauses until :meth:`Engine.resume` (a check). tag: anything the caller wants back.
    """

    index: int
    order: float
    prompt: list[int]
    sampling: SamplingParams
    key: int
    n: int
    checks: tuple[int, ...] = ()
    tag: object = None
    rows: list[Row] = field(default_factory=list)
    check_index: int = 0
    started: bool = False  # some row was ever admitted (its prompt is being or was prefilled)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = [
                Row(self, s, stream=sample_key(self.sampling.seed, self.key, s))
                for s in range(self.n)
            ]

    @property
    def next_check(self) -> int | None:
        """Token count of the next unresolved check, None when there is none."""
        return self.checks[self.check_index] if self.check_index < len(self.checks) else None

    @property
    def live_rows(self) -> list[Row]:
        return [r for r in self.rows if r.live]

    @property
    def done(self) -> bool:
        """Every row ended."""
        return all(not r.live for r in self.rows)

    @property
    def ready_for_check(self) -> bool:
        """Every live row is in the cache, fully cached and at the next check (and one is live)."""
        live = self.live_rows
        return bool(live) and all(
            r.at_check and r.status is RowStatus.RUNNING and r.num_cached == r.num_tokens
            for r in live
        )
