"""Sample text from a checkpoint (the same as `palm generate ...`).

    python3 generate.py runs/NAME --prompt "Once upon a time" --max_new_tokens 100 --top_p 0.9

See `python3 generate.py --help` for every flag.
"""

import sys

from palm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
