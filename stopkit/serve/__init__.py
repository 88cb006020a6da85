"""``stopkit serve``: an OpenAI-compatible server that answers with parallel paths pruned by STOP.

:mod:`~stopkit.serve.app` (the FastAPI app and its routes), :mod:`~stopkit.serve.protocol` (the
OpenAI request and response formats), :mod:`~stopkit.serve.worker` (the engine thread, the only
one that touches the engine), :mod:`~stopkit.serve.metrics` (``/metrics`` in the Prometheus text
format). Needs the ``serve`` extra: ``pip install 'stopkit[serve]'``.
"""

from stopkit.serve.app import Defaults, create_app

__all__ = ["create_app", "Defaults"]
