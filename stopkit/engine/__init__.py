"""stopkit's engine: a Hugging Face causal LM on the paged KV cache, with continuous batching
under a fixed KV budget.

One job per module (nano-vllm's layout): :mod:`~stopkit.engine.model_runner` (the transformers
glue: attention function, Cache subclass, packed forwards), :mod:`~stopkit.engine.scheduler`
(admission, preemption, block reservation), :mod:`~stopkit.engine.sequence` (requests and their
rows), :mod:`~stopkit.engine.sampler` (the sampling step), and the public
:class:`~stopkit.engine.Engine` and :class:`~stopkit.engine.Session` on top.
"""

from stopkit.engine.engine import CPU_MEMORY_SHARE, GPU_MEMORY_UTILIZATION, Engine, StepOutput
from stopkit.engine.model_runner import ATTENTION_NAME, SUPPORTED_MODEL_TYPES
from stopkit.engine.sequence import FINISH_REASONS, Group, Row, SamplingParams
from stopkit.engine.session import Session

__all__ = [
    "Engine",
    "Session",
    "Row",
    "Group",
    "SamplingParams",
    "StepOutput",
    "FINISH_REASONS",
    "SUPPORTED_MODEL_TYPES",
    "ATTENTION_NAME",
    "GPU_MEMORY_UTILIZATION",
    "CPU_MEMORY_SHARE",
]
