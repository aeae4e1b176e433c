"""`python3 train.py` / `palm train`: train a PaLM model on data prepared by download.py.

python3 train.py                                   # defaults, data/wikitext-103
python3 train.py --config configs/cpu-quickstart.yaml train.max_steps=200 model.n_layers=4
python3 train.py --resume                          # continue runs/<name>/ (error if none)
"""

from __future__ import annotations

import argparse
import sys

from palm.cli import run
from palm.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        help="YAML config file (see configs/); default: built-in "
        "defaults, identical to configs/default.yaml",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest complete checkpoint; error if there is none "
        "(the default, train.resume=auto, continues one if it exists)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, e.g. train.max_steps=200",
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["train.resume=must"] if args.resume else [])
    return run(lambda: train_from_args(args.config, overrides))


def train_from_args(config_file: str | None, overrides: list[str]) -> None:
    config = load_config(config_file, overrides)
    from palm.trainer import train  # imported late: argument errors stay fast

    result = train(config)
    if not result.is_main:
        return
    write_curves(result.run_dir)
    if result.sample is not None:
        print("sample:\n" + result.sample)
    if result.val_perplexity is None:
        validation = "no validation data"
    else:
        validation = f"validation perplexity {result.val_perplexity:.2f}"
    print(
        f"finished at step {result.step} ({result.stopped_by}); {validation}; "
        f"{result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%}; run folder {result.run_dir}"
    )


def write_curves(run_dir) -> None:
    """runs/NAME/curves.png at the end of a run (also one stopped by a signal), when matplotlib
    is installed; without it, one line saying how to get it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("curves: pip install 'palm-lm[plot]' to get runs/NAME/curves.png after each run")
        return
    from palm.plot import plot_runs

    print(f"curves: {plot_runs([run_dir], run_dir / 'curves.png')}")


if __name__ == "__main__":
    sys.exit(main())
