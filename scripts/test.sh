#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest -n auto "$@"
