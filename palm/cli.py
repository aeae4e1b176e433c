"""The `palm` console command: one entry point, one subcommand per job.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only
dispatches, so `palm train ...` and `python3 train.py ...` run exactly the same code.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported lazily so `palm info` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("palm.info", "parameter counts, FLOPs per token and memory of a preset or config"),
    "download": ("palm.data.cli", "download, tokenize and pack a corpus"),
    "train": ("palm.train", "train a PaLM model"),
    "generate": ("palm.generate", "sample text from a checkpoint"),
    "evaluate": ("palm.evaluate", "perplexity and benchmark evaluation of a checkpoint"),
    "export": ("palm.export", "a checkpoint as a palm-rlhf-pytorch or palm-pytorch state dict"),
}


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
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"palm: the {name!r} command is not available in this version yet", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
