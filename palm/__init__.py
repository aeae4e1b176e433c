"""palm: a faithful, fast PyTorch implementation of PaLM (Chowdhery et al., 2022)."""

from palm.config import PRESETS, ModelConfig
from palm.loss import LossOutput, lm_loss
from palm.model import KVCache, PaLM

__all__ = ["PRESETS", "KVCache", "LossOutput", "ModelConfig", "PaLM", "lm_loss"]
__version__ = "0.1.0"
