"""palm: a faithful, fast PyTorch implementation of PaLM (Chowdhery et al., 2022).

Public names are imported lazily, so commands that need no torch (download.py --help, the
data pipeline) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "palm.config",
    "PRESETS": "palm.config",
    "PaLM": "palm.model",
    "KVCache": "palm.model",
    "lm_loss": "palm.loss",
    "linear_lm_loss": "palm.loss",
    "LossOutput": "palm.loss",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'palm' has no attribute {name!r}")
