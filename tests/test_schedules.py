"""Schedules against a reference written from the formula, endpoints, shape and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xcit_ssl.errors import UserError
from xcit_ssl.schedules import Schedule, cosine_schedule, teacher_temp_schedule


def reference_cosine(start, end, total, warmup, warmup_start):
    """Step-by-step from the documented formula, in plain Python."""
    out = []
    n = total - warmup
    for s in range(total):
        if s < warmup:
            out.append(warmup_start + (start - warmup_start) * s / warmup)
        else:
            j = s - warmup
            phase = j / (n - 1) if n > 1 else 0.0
            out.append(end + (start - end) * (1 + math.cos(math.pi * phase)) / 2)
    return out


@pytest.mark.parametrize(
    "start, end, total, warmup, warmup_start",
    [
        (1e-3, 1e-5, 100, 10, 0.0),  # lr: warm-up then decay
        (0.04, 0.4, 37, 0, 0.0),  # weight decay: increasing cosine, no warm-up
        (0.996, 1.0, 50, 0, 0.0),  # teacher momentum
        (2e-3, 1e-6, 12, 11, 1e-6),  # single post-warm-up step
        (5.0, 1.0, 8, 8, 0.0),  # warm-up only
        (3.0, 3.0, 5, 2, 1.0),  # constant cosine
        (1.0, 0.0, 1, 0, 0.0),  # one step
    ],
)
def test_cosine_matches_formula(start, end, total, warmup, warmup_start):
    got = cosine_schedule(start, end, total, warmup, warmup_start)
    assert got.shape == (total,) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference_cosine(start, end, total, warmup, warmup_start),
                               rtol=1e-12, atol=1e-15)


def test_cosine_endpoints_and_warmup_boundaries():
    s = cosine_schedule(1e-3, 1e-5, total_steps=1000, warmup_steps=100, warmup_start=1e-6)
    assert s[0] == 1e-6  # warm-up starts at warmup_start
    assert s[99] < 1e-3  # last warm-up step is below the peak ...
    assert s[99] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 99 / 100)
    assert s[100] == 1e-3  # ... and the first post-warm-up step is exactly the peak
    assert s[-1] == 1e-5  # exactly the final value at the last step
    assert s.max() == 1e-3 and s.min() == 1e-6
    # monotone: non-decreasing warm-up, non-increasing cosine
    assert np.all(np.diff(s[:101]) > 0)
    assert np.all(np.diff(s[100:]) <= 0)
    # the cosine half-way point is the mean of start and end
    n = 900
    assert cosine_schedule(1.0, 0.0, n + 1)[n // 2] == pytest.approx(0.5)


def test_momentum_schedule_reaches_one_and_increases():
    m = cosine_schedule(0.996, 1.0, 250)
    assert m[0] == 0.996 and m[-1] == 1.0
    assert np.all(np.diff(m) >= 0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=-3), "total_steps=-3"),
        (dict(total_steps=10, warmup_steps=11), "warmup_steps=11"),
        (dict(total_steps=10, warmup_steps=-1), "negative"),
        (dict(total_steps=10.0), "integer"),
        (dict(total_steps=10, start=float("nan")), "not finite"),
    ],
)
def test_cosine_rejects_bad_arguments(kwargs, fragment):
    args = dict(start=1.0, end=0.0) | kwargs
    with pytest.raises(ValueError, match=fragment) as info:
        cosine_schedule(**args)
    assert isinstance(info.value, UserError)  # the CLI reports it without a traceback


def test_teacher_temp_schedule():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, total_epochs=100)
    assert t.shape == (100,)
    expected = [0.04 + 0.03 * e / 30 if e < 30 else 0.07 for e in range(100)]
    np.testing.assert_allclose(t, expected, rtol=1e-12)
    assert t[0] == 0.04 and t[30] == 0.07 and t[-1] == 0.07 and t[29] < 0.07
    assert np.all(np.diff(t) >= 0)
    # no warm-up: constant; warm-up as long as training: final never reached
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    assert teacher_temp_schedule(0.04, 0.07, 5, 5)[-1] < 0.07


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((0.04, 0.07, 31, 30), "warmup_epochs=31"),
        ((0.04, 0.07, 0, 0), "total_epochs=0"),
        ((0.0, 0.07, 1, 3), "> 0"),
    ],
)
def test_teacher_temp_rejects_bad_arguments(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        teacher_temp_schedule(*args)


def test_schedule_lookup_clamps_at_the_end():
    sched = Schedule(cosine_schedule(1.0, 0.1, 10, 2))
    assert len(sched) == 10
    assert sched(0) == 0.0 and sched(2) == 1.0 and sched(9) == pytest.approx(0.1)
    assert sched(10) == sched(10_000) == sched.final == pytest.approx(0.1)  # resumed/extended run
    assert isinstance(sched(3), float)
    with pytest.raises(ValueError, match=">= 0"):
        sched(-1)
    with pytest.raises(ValueError, match="non-empty"):
        Schedule(np.array([]))
    # read-only: a caller cannot corrupt the schedule in place
    with pytest.raises(ValueError):
        sched.values[0] = 5.0
