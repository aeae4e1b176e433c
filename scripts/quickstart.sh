#!/usr/bin/env bash
# Set up .venv and run the main job, offline: prepare a corpus from this Python's standard
# library, train a small PaLM on the CPU for a few minutes, report validation perplexity and
# print a sample. Re-running skips the finished data steps and continues the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
py=.venv/bin/python
"$py" download.py --path data/ --dataset python-stdlib --max_bytes 4000000 --split True --valid_fraction 0.03 --test_fraction 0.02 \
    --vocab_size 4096 --model_type bpe --seq_len 128 --batch_size 16 --n_workers 2
exec "$py" train.py --config configs/cpu-quickstart.yaml "$@"
