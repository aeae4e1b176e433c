#!/usr/bin/env bash
# Set up .venv and run the main job on the offline default corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m palm info --preset palm-tiny "$@"
