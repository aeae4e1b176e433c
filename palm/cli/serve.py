"""`palm serve RUN_OR_CHECKPOINT`: an OpenAI-compatible HTTP server for a checkpoint.

    palm serve runs/wt103 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "wt103", "prompt": "The meaning of life", "max_tokens": 50, "seed": 1}'

Serves /v1/completions (with streaming), /v1/models and /health (palm.serve); completions equal
generate.py's for the same seed and options. Needs the `serve` extra (FastAPI, uvicorn).
Exit status: 0 stopped; 1 a runtime failure (one `error:` line); 2 a bad command line; 130
interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from palm.cli import TRANSPOSED_WEIGHTS, run
from palm.errors import ConfigError, PalmError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palm serve",
        allow_abbrev=False,
        description="Serve a PaLM checkpoint over an OpenAI-compatible HTTP API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="a run folder (its --which checkpoint) or a checkpoint")
    p.add_argument("--which", choices=("best", "latest"), default="best")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model instead of the run's own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument(
        "--model_name", default=None, help="the model's name in the API (default: the folder's)"
    )
    p.add_argument("--max_tokens_cap", type=int, default=512, help="most max_tokens per request")
    p.add_argument(
        "--max_rows", type=int, default=32, help="most sequences decoded at once (all requests)"
    )
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait; beyond: 429")
    p.add_argument(
        "--batching",
        choices=("on", "off"),
        default="on",
        help="off: every request decodes alone, bit for bit as generate.py",
    )
    p.add_argument(
        "--batch_wait_ms",
        type=float,
        default=5.0,
        help="an idle server waits this long for more requests to start them as one batch",
    )
    p.add_argument(
        "--transposed_weights",
        choices=tuple(TRANSPOSED_WEIGHTS),
        default="auto",
        help="decode with one shared set of copies of the weights in a faster layout "
        "(on CPU oneDNN's packed one, twice the weight memory; (in, out) copies of the wide "
        "weights, ~75%%, where --max_rows is 1 or over 64); auto = on for CPU float32 only",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: serve(args), interrupted="stopped")


def serve(args: argparse.Namespace) -> None:
    if args.max_tokens_cap < 1:
        raise ConfigError(f"--max_tokens_cap must be >= 1, got {args.max_tokens_cap}")
    for flag in ("max_rows", "max_queue"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch_wait_ms must be >= 0, got {args.batch_wait_ms}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise PalmError(f"palm serve needs {' and '.join(missing)}: pip install -e '.[serve]'")
    import torch

    from palm.engine import Engine
    from palm.runs import load_model
    from palm.serve import Served, create_app, listen
    from palm.serve import run as run_server

    if args.threads:
        torch.set_num_threads(args.threads)
    sock = listen(args.host, args.port)  # before loading: a taken port fails at once
    loaded = load_model(
        args.checkpoint, args.which, args.device, getattr(torch, args.dtype), args.tokenizer
    )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        args.max_queue,
        args.max_rows,
        batching=args.batching == "on",
        gather_s=args.batch_wait_ms / 1000,
        transposed_weights=TRANSPOSED_WEIGHTS[args.transposed_weights],
    )
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(Served(engine, loaded.tokenizer, name, args.max_tokens_cap))
    host, port = sock.getsockname()[:2]
    print(
        f"serving {name} ({loaded.path}, step {loaded.step}, context "
        f"{engine.context}) on http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    run_server(app, sock, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
