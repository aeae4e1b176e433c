"""Guards of a long run: loss-spike detection (PaLM §5.1) and clean stops on signals."""

from __future__ import annotations

import math
import signal
from collections import deque

import numpy as np


class SpikeDetector:
    """PaLM §5.1 loss spikes: a loss far above the recent running statistics, or not finite."""

    def __init__(self, window: int, sigma: float, ratio: float, history: list[float]) -> None:
        self.sigma, self.ratio = sigma, ratio
        self.losses: deque[float] = deque(history, maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if len(self.losses) < min(20, self.losses.maxlen):
            return False  # too little history: early losses fall fast, which is no spike
        recent = np.array(self.losses)
        mean, std = recent.mean(), recent.std()
        return loss > mean + self.sigma * std and loss > self.ratio * mean


class StopSignal:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
