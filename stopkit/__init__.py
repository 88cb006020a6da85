"""stopkit: early path pruning (STOP) for parallel LLM reasoning, on fused paged-KV kernels.

``import stopkit`` loads only the native ops; the higher layers (which import transformers) load
on first use of their names: ``stopkit.Engine``, ``stopkit.StopScorer``, ``stopkit.ParallelReasoner``...
"""

import importlib
import logging
from typing import Any

from stopkit import ops, reference
from stopkit.cache import CacheFullError, PagedKVCache
from stopkit.pruning import PruneResult, prune

__version__ = "0.1.0"

_LAZY = {
    "Engine": "stopkit.engine",
    "Session": "stopkit.engine",
    "Row": "stopkit.engine",
    "StopScorer": "stopkit.stop",
    "ParallelReasoner": "stopkit.reasoner",
    "Solution": "stopkit.reasoner",
    "Path": "stopkit.reasoner",
    "plan": "stopkit.planner",
    "Plan": "stopkit.planner",
}
# Spelled out (not `*_LAZY`) so that linters and type checkers can read it.
__all__ = [
    "ops",
    "reference",
    "__version__",
    "PagedKVCache",
    "CacheFullError",
    "prune",
    "PruneResult",
    "Engine",
    "Session",
    "Row",
    "StopScorer",
    "ParallelReasoner",
    "Solution",
    "Path",
    "plan",
    "Plan",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stopkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


logging.getLogger(__name__).addHandler(logging.NullHandler())
