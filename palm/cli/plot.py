"""`palm plot RUN [RUN ...] [--out FILE.png] [--metric NAME]`: training curves of runs,
against steps and tokens, one legend entry per run named by the config keys in which the runs
differ (needs matplotlib: the `plot` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from palm.cli import run
from palm.plot import METRICS, plot_runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palm plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (runs/NAME)")
    p.add_argument("--out", type=Path, default=None, help="PNG file (default: RUN/curves.png)")
    p.add_argument("--metric", choices=METRICS, default="loss", help="what to plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or args.runs[0] / ("curves.png" if len(args.runs) == 1 else "compare.png")
    return run(lambda: print(f"wrote {plot_runs(args.runs, out, args.metric)}"))


if __name__ == "__main__":
    sys.exit(main())
