"""stopkit: early path pruning (STOP) for parallel LLM reasoning, on fused paged-KV kernels."""

import logging

from stopkit import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
