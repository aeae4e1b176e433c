"""Guards of a long run: loss spikes and non-finite steps (PaLM §5.1), the checkpoint a rollback
returns to, and clean stops on signals."""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np

from palm.errors import TrainingError


class SpikeDetector:
    """PaLM §5.1 loss spikes: a loss far above the recent running statistics, or not finite."""

    def __init__(
        self, window: int, sigma: float, ratio: float, history: list[float] | None = None
    ) -> None:
        self.sigma, self.ratio = sigma, ratio
        self.losses: deque[float] = deque(history or (), maxlen=window)

    def record(self, loss: float) -> None:
        """A loss that was applied (not a spike) joins the running statistics."""
        self.losses.append(loss)

    def state_dict(self) -> list[float]:
        """The window of recent losses, as saved in a checkpoint's training state."""
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        self.losses = deque(losses, maxlen=self.losses.maxlen)

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if len(self.losses) < min(20, self.losses.maxlen):
            return False  # too little history: early losses fall fast, which is no spike
        recent = np.array(self.losses)
        mean, std = recent.mean(), recent.std()
        return loss > mean + self.sigma * std and loss > self.ratio * mean


def rollback_target(checkpoints: list[Path], spike_step: int, rollback_steps: int) -> Path:
    """PaLM §5.1 "restarted training from a checkpoint roughly 100 steps before the spike": the
    newest checkpoint at least `rollback_steps` before it, else the oldest one there is."""
    if not checkpoints:
        raise TrainingError(f"loss spike at step {spike_step} but no checkpoint to roll back to")
    earlier = [p for p in checkpoints if int(p.name.split("_")[-1]) <= spike_step - rollback_steps]
    return earlier[-1] if earlier else checkpoints[0]


def recent_repeat(earlier_steps: list[int], step: int, window: int) -> bool:
    """Whether an earlier non-finite step lies within `window` steps before `step` (then a
    skipped update is not enough: the run rolls back)."""
    return any(step - window < s < step for s in earlier_steps)


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

    def reason(self, start: float, max_minutes: float, world, device) -> str:
        """ "signal", "time_limit" or "max_steps" (go on). All ranks decide together (`world`:
        palm.distributed.Distributed), so a signal or the clock seen by any rank stops all."""
        over_time = bool(max_minutes) and time.perf_counter() - start > 60 * max_minutes
        signalled, over_time = world.all_reduce_sum(
            [float(self.received is not None), float(over_time)], device
        )
        return "signal" if signalled else "time_limit" if over_time else "max_steps"

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
