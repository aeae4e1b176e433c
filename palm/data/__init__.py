"""Data pipeline: download, tokenize and pack a corpus (PaLM §2, §5), and load it for training.

    python3 download.py --path data/ --dataset python-stdlib      # or: palm download ...
    windows = TokenWindows("data/python-stdlib", "train", seq_len=256, seed=0)
    x, y = windows.batch(rank_sample_indices(first_sample, global_batch, rank, world_size))

This package never imports the model, checkpoints or pretrained weights. Names are imported on
first use (PEP 562), so `download.py` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "palm.errors",
    "IGNORE_INDEX": "palm.data.loader",
    "TokenWindows": "palm.data.loader",
    "epoch_permutation": "palm.data.loader",
    "open_split": "palm.data.loader",
    "open_windows": "palm.data.loader",
    "rank_sample_indices": "palm.data.loader",
    "Manifest": "palm.data.manifest",
    "load_manifest": "palm.data.manifest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'palm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
