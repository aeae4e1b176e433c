"""Download, tokenize and pack a corpus for PaLM training (the same as `palm download ...`).

    python3 download.py --path data/ --dataset python-stdlib --vocab_size 8192 --split True

See `python3 download.py --help` and the README for every flag.
"""

import sys

from palm.cli.download import main

if __name__ == "__main__":
    sys.exit(main())
