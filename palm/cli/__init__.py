"""The command line: `palm <command>`, and the root scripts, which are the same commands.

This package is the only place with argparse, printed results and exit codes. Every command is a
module with `main(argv) -> int` that hands its work to `run()`, which maps failures to the exit
codes all commands share: 0 done, 1 a runtime failure (one `error:` line naming the file and the
fix), 2 a bad command line or config, 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from palm.errors import PalmError

# subcommand -> (module, one-line help). Modules are imported lazily so `palm info` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("palm.cli.info", "parameter counts, FLOPs per token and memory of a preset or config"),
    "download": ("palm.cli.download", "download, tokenize and pack a corpus"),
    "train": ("palm.cli.train", "train a PaLM model"),
    "generate": ("palm.cli.generate", "sample text from a checkpoint"),
    "evaluate": ("palm.cli.evaluate", "perplexity and benchmark evaluation of a checkpoint"),
    "export": (
        "palm.cli.export",
        "a checkpoint for transformers or palm-rlhf-pytorch/palm-pytorch",
    ),
    "plot": ("palm.cli.plot", "training curves of runs as a PNG (matplotlib)"),
    "serve": ("palm.cli.serve", "an OpenAI-compatible HTTP server for a checkpoint"),
}

# generate's and serve's --transposed_weights -> transposed_weights (None: where it pays).
TRANSPOSED_WEIGHTS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def run(job: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run one command's work; a PalmError becomes its one `error:` line and exit code."""
    try:
        return int(job() or 0)
    except PalmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130


def usage() -> str:
    lines = ["usage: palm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `palm <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"palm: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
