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
from stopkit.cli.args import add_command, add_model_args, add_sampling_args
from stopkit.cli.errors import UserError, options
from stopkit.cli.inputs import load_model, load_scorer
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


def _kv_memory(text: str) -> int | float:
    """``0.5`` (a share of the memory) or ``8000000000`` (bytes)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] such as 0.5 or a number of "
                                         f"bytes, got {text!r}") from None


def register(subparsers) -> None:
    p = add_command(subparsers, "serve", help="an OpenAI-compatible server answering with STOP",
                    description=__doc__, examples=EXAMPLES)
    add_model_args(p, adapter=True)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-queue", type=int, default=512,
                   help="requests in flight (running and waiting) at most; more get HTTP 503 "
                        "(default 512)")
    engine = p.add_argument_group("engine (the KV budget)")
    engine.add_argument("--num-blocks", type=int, default=None,
                        help="KV cache blocks (default: sized from --kv-cache-memory)")
    engine.add_argument("--kv-cache-memory", type=_kv_memory, default=None,
                        help="KV budget: bytes, or a share of the GPU's memory (default 0.9) or of "
                             "the free RAM on a CPU (default 0.25)")
    engine.add_argument("--max-num-seqs", type=int, default=256,
                        help="paths in the KV cache at most (default 256)")
    engine.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="tokens per engine step at most (default 8192)")
    defaults = p.add_argument_group("request defaults")
    defaults.add_argument("--method", default="stop",
                          help="stop, confidence, entropy, random or full (default stop)")
    add_sampling_args(defaults)
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

    from stopkit.engine import Engine  # noqa: PLC0415
    from stopkit.reasoner import ParallelReasoner  # noqa: PLC0415
    from stopkit.serve import Defaults, create_app  # noqa: PLC0415

    check_solve_options(args, [args.method])
    with options():
        check_int("--port", args.port, 0, 65535)
        check_int("--max-queue", args.max_queue, 1)
        for flag in ("num_blocks", "max_num_seqs", "max_batch_tokens"):
            if getattr(args, flag) is not None:
                check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
        if args.n > args.max_num_seqs:
            raise ValueError(f"--n must be <= --max-num-seqs ({args.max_num_seqs}), got {args.n}")
    sock = _listen(args.host, args.port)
    model, tokenizer = load_model(args)
    with options():
        engine = Engine(model, num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
                        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens)
    scorer = load_scorer("--adapter", args.adapter, model) if args.adapter else None
    reasoner = ParallelReasoner(model, tokenizer, scorer=scorer, engine=engine)
    defaults = Defaults(n=args.n, keep=args.keep, prefix_tokens=args.prefix_tokens,
                        max_new_tokens=args.max_new_tokens, method=args.method, vote=args.vote,
                        early_stop=args.early_stop, temperature=args.temperature, top_p=args.top_p)
    name = args.served_model_name or args.model
    app = create_app(reasoner, model_name=name, defaults=defaults, max_queue=args.max_queue)
    log.info("serving %s on http://%s:%d (KV cache: %d blocks of %d tokens; method %s, n %d, "
             "keep %d)", name, args.host, sock.getsockname()[1], engine.cache.num_blocks, engine.block_size,
             args.method, args.n, args.keep)
    server = uvicorn.Server(uvicorn.Config(app, log_level="debug" if args.verbose else "info"))
    server.run(sockets=[sock])
    return 0
