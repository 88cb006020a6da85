"""``stopkit serve``: an OpenAI-compatible server that answers every request with N parallel paths
pruned to k by STOP (or another method) and a vote (stopkit.serve).

Requests run concurrently in one engine under a fixed KV budget; the method options given here
are the defaults of requests that leave them out (a request's ``n``, ``max_tokens``,
``temperature``, ``top_p``, ``seed`` and its ``stopkit`` object override them). Needs the serve
extra: pip install 'stopkit[serve]'.
"""

from __future__ import annotations

import argparse
import logging
import socket

from stopkit._checks import check_int
from stopkit.cli.args import (
    Parser,
    add_command,
    add_engine_args,
    add_method_args,
    add_model_args,
    add_prompt_args,
    add_sampling_args,
)
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import load_reasoner
from stopkit.cli.solve import check_solve_options

log = logging.getLogger(__name__)

EXAMPLES = """
  stopkit serve --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter ckpt/stop \\
      --device cuda --n 32 --keep 8 --prefix-tokens 2048 --port 8000
  stopkit serve --model stopkit/toy/assets/model --adapter stopkit/toy/assets/adapter --n 16 \\
      --keep 4 --prefix-tokens 12 --max-new-tokens 100 --temperature 1 --top-p 1
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "What is 17 * 23?"}]}'
"""

INSTALL_HINT = "needs the serve extra (FastAPI and uvicorn): pip install 'stopkit[serve]'"


def register(subparsers: argparse._SubParsersAction[Parser]) -> None:
    p = add_command(
        subparsers,
        "serve",
        help="an OpenAI-compatible server answering with STOP",
        description=__doc__,
        examples=EXAMPLES,
    )
    add_model_args(p, adapter=True)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: --model as given)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=512,
        help="requests in flight (running and waiting) at most; more get HTTP 503 (default 512)",
    )
    add_engine_args(p)
    add_prompt_args(p)
    defaults = p.add_argument_group("request defaults")
    defaults.add_argument(
        "--method",
        default="stop",
        help="stop, confidence, entropy, similarity, similarity:PATH, "
        "verifier:PATH, random or full (default stop)",
    )
    add_sampling_args(defaults)
    add_method_args(p)
    p.set_defaults(run=run)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), so a taken port fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: PLC0415
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e})") from e

    from stopkit.serve import Defaults, create_app  # noqa: PLC0415

    check_solve_options(args, [args.method])
    with options():
        check_int("--port", args.port, 0, 65535)
        check_int("--max-queue", args.max_queue, 1)
        if args.n > args.max_num_seqs:
            raise ValueError(f"--n must be <= --max-num-seqs ({args.max_num_seqs}), got {args.n}")
    sock = _listen(args.host, args.port)
    reasoner = load_reasoner(args)
    engine = reasoner.engine
    defaults = Defaults(
        n=args.n,
        keep=args.keep,
        prefix_tokens=args.prefix_tokens,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        vote=args.vote,
        early_stop=args.early_stop,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    name = args.served_model_name or args.model
    app = create_app(reasoner, model_name=name, defaults=defaults, max_queue=args.max_queue)
    log.info(
        "serving %s on http://%s:%d (KV cache: %d blocks of %d tokens; method %s, n %d, keep %d)",
        name,
        args.host,
        sock.getsockname()[1],
        engine.cache.num_blocks,
        engine.block_size,
        args.method,
        args.n,
        args.keep,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="debug" if args.verbose else "info"))
    server.run(sockets=[sock])
    return 0
