"""Evaluate a checkpoint (the same as `palm evaluate ...`): perplexity, memorization, lm-eval.

    python3 evaluate.py runs/NAME --data data/wikitext-103 --split test
    python3 evaluate.py runs/NAME --memorization --data data/wikitext-103
    python3 evaluate.py runs/NAME --tasks lambada_openai   # needs the lm-eval extra

See `python3 evaluate.py --help` for every flag.
"""

import sys

from palm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
