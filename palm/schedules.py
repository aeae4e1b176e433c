"""Learning-rate and batch-size schedules (PaLM §5) as pure functions of the step.

Convention: `step` counts optimizer updates already done, so the first update is step 0. This is
T5X's (its schedules read `state.step`, 0 at the first update); the optimizer's own beta2 counter
is that plus one (see palm/optim.py). `samples_before(step)` is then exactly the number of
sequences consumed before update `step`, which is what a resumed data loader needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from palm.config import SCHEDULES, Config
from palm.errors import ConfigError

__all__ = [
    "LR_SCHEDULES",
    "BatchRamp",
    "LRSchedule",
    "batch_size_at",
    "constant_lr",
    "cosine_lr",
    "lr_at",
    "micro_batches",
    "palm_lr",
    "samples_before",
]


def _check_step(step: int) -> None:
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")


def palm_lr(step: int, *, peak: float = 1e-2, constant_steps: int = 10_000) -> float:
    """PaLM §5: "1e-2 for the first 10,000 steps, then decayed at a rate of 1/sqrt(k)".

    Written as peak * sqrt(constant_steps / k) for k >= constant_steps, which is exactly 1/sqrt(k)
    for the paper's values (1e-2 * sqrt(1e4) = 1) and stays continuous when a smaller run scales
    `peak` or `constant_steps`.
    """
    _check_step(step)
    if step < constant_steps:
        return peak
    return peak * math.sqrt(constant_steps / step)


def cosine_lr(
    step: int, *, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """Linear warm-up to `peak`, cosine decay to min_ratio * peak at `total_steps`, then flat.

    Not PaLM's schedule (PaLM §5 uses `palm_lr`); the common GPT-style alternative for short runs.
    Warm-up reaches peak at step warmup_steps - 1, so step 0 already learns (peak / warmup_steps).
    """
    _check_step(step)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = min_ratio * peak
    if step >= total_steps:
        return floor
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_lr(step: int, *, peak: float, warmup_steps: int = 0) -> float:
    """`peak` at every step after an optional linear warm-up (not PaLM §5's; for fine-tuning)."""
    _check_step(step)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak


LR_SCHEDULES = SCHEDULES  # the config's list: one copy


@dataclass(frozen=True)
class LRSchedule:
    """Which learning-rate schedule and its settings; `lr_at(step, schedule)` evaluates it."""

    name: str = "palm"  # one of LR_SCHEDULES; "palm" is PaLM §5's constant-then-1/sqrt(k)
    peak: float = 1e-2  # highest learning rate (PaLM: 1e-2)
    constant_steps: int = 10_000  # "palm": steps at `peak` before 1/sqrt(k) decay (PaLM: 10k)
    warmup_steps: int = 0  # "cosine"/"constant": linear warm-up steps (PaLM uses none)
    total_steps: int = 0  # "cosine": step at which the decay reaches min_ratio * peak
    min_ratio: float = 0.1  # "cosine": final learning rate as a fraction of peak

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr schedule {self.name!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if not self.peak > 0.0:
            raise ConfigError(f"peak learning rate must be > 0, got {self.peak}")
        if self.name == "palm" and self.constant_steps < 1:
            raise ConfigError(f"constant_steps must be >= 1, got {self.constant_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.name == "cosine" and not 0 <= self.warmup_steps < self.total_steps:
            raise ConfigError(
                f"cosine needs 0 <= warmup_steps < total_steps, got "
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    @classmethod
    def from_config(cls, config: Config) -> LRSchedule:
        """The schedule a run's `optim` section describes, over its `train.max_steps`."""
        o = config.optim
        return cls(
            name=o.schedule,
            peak=o.lr,
            constant_steps=o.constant_steps,
            warmup_steps=o.warmup_steps,
            total_steps=config.train.max_steps,
            min_ratio=o.min_lr_ratio,
        )


def lr_at(step: int, schedule: LRSchedule) -> float:
    """The learning rate for update `step` (0-based) under `schedule` (PaLM §5 by default)."""
    if schedule.name == "palm":
        return palm_lr(step, peak=schedule.peak, constant_steps=schedule.constant_steps)
    if schedule.name == "cosine":
        return cosine_lr(
            step,
            peak=schedule.peak,
            warmup_steps=schedule.warmup_steps,
            total_steps=schedule.total_steps,
            min_ratio=schedule.min_ratio,
        )
    return constant_lr(step, peak=schedule.peak, warmup_steps=schedule.warmup_steps)


@dataclass(frozen=True)
class BatchRamp:
    """Global batch size (in sequences) by step, PaLM §5: "for the 540B model, we used a batch
    size of 512 until step 50k, then doubled it to 1024 until step 115k, and finally doubled it
    again to 2048 until training was complete at step 255k".

    `stages` holds (until_step, batch_size) pairs: steps [previous until_step, until_step) use
    batch_size. The last stage is open-ended: its until_step only records the planned end of
    training and the last batch size continues after it.
    """

    stages: tuple[tuple[int, int], ...]  # ((until_step, batch_size), ...), until strictly rising

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but store tuples so the dataclass stays hashable.
        object.__setattr__(self, "stages", tuple((int(u), int(b)) for u, b in self.stages))
        if not self.stages:
            raise ConfigError("BatchRamp needs at least one (until_step, batch_size) stage")
        previous = 0
        for until, batch in self.stages:
            if until <= previous:
                raise ConfigError(
                    f"until_step values must be positive and strictly increasing, got {self.stages}"
                )
            if batch < 1:
                raise ConfigError(f"batch sizes must be >= 1, got {self.stages}")
            previous = until

    @classmethod
    def from_config(cls, config: Config) -> BatchRamp:
        """PaLM's ramp (optim.batch_ramp) or one batch size, over train.max_steps."""
        batch, steps = config.data.batch_size, config.train.max_steps
        return (
            cls.paper_shape(batch, steps) if config.optim.batch_ramp else cls.constant(batch, steps)
        )

    @classmethod
    def constant(cls, batch_size: int, total_steps: int = 1) -> BatchRamp:
        """One batch size throughout."""
        return cls(((max(total_steps, 1), batch_size),))

    @classmethod
    def paper_shape(cls, final_batch: int, total_steps: int) -> BatchRamp:
        """PaLM 540B's ramp scaled to a run: final/4 for the first 50/255 of the steps, final/2
        until 115/255, then final (each at least 1). Stages that round to no steps are dropped.
        """
        if final_batch < 1 or total_steps < 1:
            raise ConfigError(
                f"final_batch and total_steps must be >= 1, got {final_batch}, {total_steps}"
            )
        shape = [
            (total_steps * 50 // 255, max(final_batch // 4, 1)),
            (total_steps * 115 // 255, max(final_batch // 2, 1)),
            (total_steps, final_batch),
        ]
        stages, previous = [], 0
        for until, batch in shape:
            if until > previous:
                stages.append((until, batch))
                previous = until
        return cls(tuple(stages))


def kept_ramp(stored: list[list[int]], planned: BatchRamp, where: object) -> BatchRamp:
    """The ramp a resumed run keeps: the one fixed when it started (`stored`, from its
    checkpoint), so another train.max_steps does not move the boundaries and replay data; the
    configured (`planned`) one for a new run. A change the stored ramp cannot honour (another
    batch size, or the ramp switched on or off) is refused, naming the run (`where`)."""
    if not stored:
        return planned
    kept = BatchRamp(tuple((int(u), int(b)) for u, b in stored))
    same_kind = (len(kept.stages) > 1) == (len(planned.stages) > 1)
    if kept.stages[-1][1] != planned.stages[-1][1] or not same_kind:
        raise ConfigError(
            f"{where}: the run's batch sizes by step are {list(kept.stages)}, but data.batch_size /"
            f" optim.batch_ramp now give {list(planned.stages)}; resume with the run's settings "
            f"or start a new run (train.name=...)"
        )
    return kept


def batch_size_at(step: int, ramp: BatchRamp) -> int:
    """Global batch size (sequences) of update `step` (0-based) under `ramp` (PaLM §5)."""
    _check_step(step)
    for until, batch in ramp.stages:
        if step < until:
            return batch
    return ramp.stages[-1][1]


def samples_before(step: int, ramp: BatchRamp) -> int:
    """Sequences consumed by updates 0 .. step-1, in O(len(stages)) (PaLM §5: each batch depends
    only on the step number). Update `step` consumes global samples
    [samples_before(step), samples_before(step) + batch_size_at(step)).
    """
    _check_step(step)
    total, start = 0, 0
    for i, (until, batch) in enumerate(ramp.stages):
        end = step if i == len(ramp.stages) - 1 else min(step, until)
        if end <= start:
            break
        total += (end - start) * batch
        start = until
    return total


def micro_batches(batch_size: int, micro_batch_size: int) -> int:
    """Gradient-accumulation steps per update (PaLM §5 batch sizes): batch / micro batch, exactly.

    Both in sequences and in the same scope (e.g. both global, the micro batch times the number
    of data-parallel ranks). A remainder would silently change the batch, so it is an error.
    """
    if batch_size < 1 or micro_batch_size < 1:
        raise ConfigError(
            f"batch sizes must be >= 1, got batch_size={batch_size}, "
            f"micro_batch_size={micro_batch_size}"
        )
    if batch_size % micro_batch_size:
        raise ConfigError(
            f"batch_size {batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size}; choose a micro batch that divides every batch "
            f"size of the ramp"
        )
    return batch_size // micro_batch_size
