"""Train a PaLM model: `python3 train.py [--config FILE] [section.key=value ...]`."""

import sys

from palm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
