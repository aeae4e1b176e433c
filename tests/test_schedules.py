"""PaLM §5 learning-rate and batch-size schedules, value by value."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm.schedules import (
    BatchRamp,
    LRSchedule,
    batch_size_at,
    constant_lr,
    cosine_lr,
    lr_at,
    micro_batches,
    palm_lr,
    samples_before,
)

PAPER_RAMP = BatchRamp(((50_000, 512), (115_000, 1024), (255_000, 2048)))


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-2),
        (1, 1e-2),
        (9_999, 1e-2),
        (10_000, 1e-2),
        (10_001, 1 / math.sqrt(10_001)),
        (40_000, 5e-3),
        (62_500, 4e-3),
        (250_000, 2e-3),
        (1_000_000, 1e-3),
    ],
)
def test_palm_lr_paper_values(step, expected):
    """1e-2 for the first 10k steps, then 1/sqrt(k) (PaLM §5)."""
    assert palm_lr(step) == pytest.approx(expected, rel=1e-12)
    assert lr_at(step, LRSchedule()) == palm_lr(step)


def test_palm_lr_is_continuous_and_non_increasing_when_scaled():
    for peak, constant_steps in [(1e-2, 10_000), (3e-3, 100), (1.0, 1)]:
        values = [palm_lr(k, peak=peak, constant_steps=constant_steps) for k in range(3 * 10_000)]
        assert values[constant_steps] == pytest.approx(peak)
        assert all(b <= a for a, b in pairwise(values))
        assert max(a - b for a, b in pairwise(values)) < 0.5 * peak / constant_steps + 1e-15


def test_cosine_lr_values():
    kw = {"peak": 1.0, "warmup_steps": 10, "total_steps": 110, "min_ratio": 0.1}
    assert cosine_lr(0, **kw) == pytest.approx(0.1)
    assert cosine_lr(4, **kw) == pytest.approx(0.5)
    assert cosine_lr(9, **kw) == pytest.approx(1.0)  # warm-up ends at peak ...
    assert cosine_lr(10, **kw) == pytest.approx(1.0)  # ... and decay starts there
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # halfway: mean of peak and floor
    assert cosine_lr(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(10_000, **kw) == pytest.approx(0.1)
    values = [cosine_lr(k, **kw) for k in range(200)]
    assert all(b <= a + 1e-15 for a, b in pairwise(values[9:]))
    assert cosine_lr(0, peak=2.0, warmup_steps=0, total_steps=5) == 2.0


def test_constant_lr_and_dispatch():
    assert constant_lr(0, peak=3e-4) == 3e-4 and constant_lr(10**9, peak=3e-4) == 3e-4
    assert constant_lr(1, peak=1.0, warmup_steps=4) == 0.5
    sched = LRSchedule(name="constant", peak=0.5, warmup_steps=2)
    assert [lr_at(k, sched) for k in range(4)] == [0.25, 0.5, 0.5, 0.5]
    sched = LRSchedule(name="cosine", peak=1.0, warmup_steps=10, total_steps=110)
    assert lr_at(60, sched) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "rsqrt"}, "palm, cosine, constant"),
        ({"peak": 0.0}, "peak"),
        ({"constant_steps": 0}, "constant_steps"),
        ({"name": "cosine", "total_steps": 0}, "total_steps"),
        ({"name": "cosine", "warmup_steps": 10, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_ratio": 1.5}, "min_ratio"),
    ],
)
def test_lr_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        palm_lr(-1)
    with pytest.raises(ValueError, match="step"):
        samples_before(-1, PAPER_RAMP)


def test_paper_batch_ramp():
    """540B: 512 until step 50k, 1024 until 115k, 2048 until the end at 255k (PaLM §5)."""
    assert BatchRamp.paper_shape(2048, 255_000) == PAPER_RAMP
    expected = {
        0: 512,
        49_999: 512,
        50_000: 1024,
        114_999: 1024,
        115_000: 2048,
        254_999: 2048,
        255_000: 2048,
        400_000: 2048,
    }
    for step, batch in expected.items():
        assert batch_size_at(step, PAPER_RAMP) == batch
    assert samples_before(0, PAPER_RAMP) == 0
    assert samples_before(1, PAPER_RAMP) == 512
    assert samples_before(50_000, PAPER_RAMP) == 50_000 * 512
    assert samples_before(50_001, PAPER_RAMP) == 50_000 * 512 + 1024
    total = 50_000 * 512 + 65_000 * 1024 + 140_000 * 2048
    assert samples_before(255_000, PAPER_RAMP) == total
    # 255k steps x 2048 tokens each: PaLM's ~780B tokens (§3, "780 billion tokens").
    assert total * 2048 == pytest.approx(780e9, rel=0.01)
    assert samples_before(255_010, PAPER_RAMP) == total + 10 * 2048


def test_paper_shape_scales_and_clamps():
    ramp = BatchRamp.paper_shape(64, 1_000)
    assert ramp.stages == ((196, 16), (450, 32), (1_000, 64))
    assert BatchRamp.paper_shape(2, 10).stages == ((1, 1), (4, 1), (10, 2))
    assert BatchRamp.paper_shape(8, 1).stages == ((1, 8),)  # early stages round to nothing
    assert BatchRamp.paper_shape(8, 3).stages == ((1, 4), (3, 8))
    assert BatchRamp.constant(32).stages == ((1, 32),)
    assert batch_size_at(10**6, BatchRamp.constant(32)) == 32


@pytest.mark.parametrize(
    "stages",
    [(), ((0, 8),), ((10, 8), (10, 16)), ((10, 8), (5, 16)), ((10, 0),)],
)
def test_batch_ramp_validation(stages):
    with pytest.raises(ValueError):
        BatchRamp(stages)


def test_batch_ramp_accepts_lists():
    ramp = BatchRamp([[5, 2], [9, 4]])  # e.g. from YAML
    assert ramp.stages == ((5, 2), (9, 4)) and hash(ramp) == hash(BatchRamp(((5, 2), (9, 4))))


ramps = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 64)), min_size=1, max_size=5).map(
    lambda s: BatchRamp(tuple((sum(d for d, _ in s[: i + 1]), b) for i, (_, b) in enumerate(s)))
)


@settings(max_examples=200, deadline=None)
@given(ramp=ramps, step=st.integers(0, 250))
def test_samples_before_equals_brute_force_sum(ramp, step):
    assert samples_before(step, ramp) == sum(batch_size_at(k, ramp) for k in range(step))
    assert samples_before(step + 1, ramp) - samples_before(step, ramp) == batch_size_at(step, ramp)


def test_micro_batches():
    assert micro_batches(512, 8) == 64
    assert micro_batches(8, 8) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        micro_batches(12, 8)
    with pytest.raises(ValueError, match=">= 1"):
        micro_batches(8, 0)
