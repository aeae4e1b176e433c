"""`python -m palm ...` is the same as the `palm` console command."""

import sys

from palm.cli import main

sys.exit(main())
