"""``GET /metrics``: the server's state in the Prometheus text format (version 0.0.4), written by
hand (no client library needed).

Gauges: requests in flight, queue length (requests whose question has no path in the engine yet),
running questions, paths in the KV cache, KV blocks used and total, tokens sampled per second (over
the last :data:`~stopkit.serve.worker.RATE_WINDOW` seconds). Counters: requests by outcome,
tokens sampled, preemptions, engine steps. Histogram: request latency (accepted -> answered) of the
requests answered.
"""

from __future__ import annotations

import bisect
import math

__all__ = ["Metrics", "LATENCY_BUCKETS", "OUTCOMES", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# ok: answered; bad_request: refused (400/404); overloaded: the queue was full (503); aborted: the
# client went away first; failed: the engine failed while running it (500) or the server closed
OUTCOMES = ("ok", "bad_request", "overloaded", "aborted", "failed")


class Metrics:
    """Request counters and the latency histogram, kept on the event loop; :meth:`render` adds the
    engine's state from a worker snapshot."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self._latency_sum = 0.0

    def count(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def observe_latency(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def render(self, snapshot: dict, in_flight: int) -> str:
        """The exposition text; ``snapshot``: :meth:`Worker._snapshot`'s dict."""
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{suffix} {_number(v)}" for suffix, v in samples)

        def one(name: str, kind: str, help: str, value: float) -> None:
            family(name, kind, help, [("", value)])

        one(
            "stopkit_requests_in_flight",
            "gauge",
            "Requests accepted and not answered yet (running or waiting).",
            in_flight,
        )
        one(
            "stopkit_queue_length",
            "gauge",
            "Requests accepted whose question has no path in the engine yet.",
            max(0, in_flight - snapshot["running"]),
        )
        one(
            "stopkit_running_questions",
            "gauge",
            "Questions with paths admitted to the engine.",
            snapshot["running"],
        )
        one("stopkit_running_paths", "gauge", "Paths in the KV cache.", snapshot["running_paths"])
        one("stopkit_kv_blocks_used", "gauge", "KV cache blocks in use.", snapshot["blocks_used"])
        one(
            "stopkit_kv_blocks_total",
            "gauge",
            "KV cache blocks (the budget).",
            snapshot["blocks_total"],
        )
        one(
            "stopkit_generated_tokens_total",
            "counter",
            "Tokens sampled, over every path (pruned prefixes included).",
            snapshot["generated_tokens"],
        )
        one(
            "stopkit_generation_tokens_per_second",
            "gauge",
            "Tokens sampled per second over the last seconds.",
            snapshot["tokens_per_second"],
        )
        one(
            "stopkit_preemptions_total",
            "counter",
            "Paths preempted (their blocks freed, recomputed later).",
            snapshot["preemptions"],
        )
        one("stopkit_engine_steps_total", "counter", "Engine steps.", snapshot["steps"])
        family(
            "stopkit_requests_total",
            "counter",
            "Requests by outcome.",
            [(f'{{outcome="{o}"}}', n) for o, n in self.requests.items()],
        )
        cumulative = 0
        samples: list[tuple[str, float]] = []
        for le, n in zip((*LATENCY_BUCKETS, math.inf), self._buckets, strict=True):
            cumulative += n
            samples.append((f'_bucket{{le="{_number(le)}"}}', cumulative))
        samples += [("_sum", self._latency_sum), ("_count", cumulative)]
        family(
            "stopkit_request_latency_seconds",
            "histogram",
            "Seconds from accepting a request to its answer (answered requests).",
            samples,
        )
        return "\n".join(out) + "\n"


def _number(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(int(v))
