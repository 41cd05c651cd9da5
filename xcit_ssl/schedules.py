"""Pure hyper-parameter schedules: linear warm-up then cosine, and the DINO teacher temperature.

Schedules are precomputed arrays (one value per optimiser step, or per epoch) so that they can be
inspected, plotted, logged and applied as data to parameter groups (a frozen layer is a zero-lr
schedule, not gradient surgery). ``Schedule`` wraps an array for lookup and holds the last value
past the end, so a resumed run with more steps than planned keeps the final value instead of
raising ``IndexError``.

Convention (used by both builders; see ``cosine_schedule`` for the exact formula): warm-up step
``i`` of ``W`` is ``warmup_start + (start - warmup_start) * i / W``, so step 0 is ``warmup_start``
and the first step *after* warm-up (step ``W``) is exactly ``start``. The cosine part then runs from
``start`` to exactly ``end`` at the last step. This differs from the DINO code in two small ways,
both deliberate: DINO's ``np.linspace`` warm-up already reaches the peak at its last step (so the
peak is used twice) and its cosine uses ``j / n`` so it never quite reaches the final value (e.g.
the EMA momentum never reaches 1.0). Neither difference matters for accuracy; ours makes the
endpoints exact and testable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xcit_ssl.errors import UserError

__all__ = ["Schedule", "ScheduleError", "cosine_schedule", "teacher_temp_schedule"]


class ScheduleError(UserError, ValueError):
    """An impossible schedule (e.g. more warm-up than training).

    A ``UserError`` (the CLI reports it without a traceback) and a ``ValueError`` (what callers of a
    pure function expect for a bad argument).
    """


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ScheduleError(f"schedule value {name}={value!r} is not finite; pass a number")


def _check_steps(total_name: str, total: int, warmup_name: str, warmup: int) -> None:
    for name, value in ((total_name, total), (warmup_name, warmup)):
        # bool is an int subclass; True as a step count is always a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ScheduleError(f"{name} must be an integer, got {value!r}")
    if total <= 0:
        raise ScheduleError(
            f"{total_name}={total}: a schedule needs at least one step; "
            "check the number of epochs and that the dataset is not empty"
        )
    if warmup < 0:
        raise ScheduleError(f"{warmup_name}={warmup} is negative; use 0 for no warm-up")
    if warmup > total:
        raise ScheduleError(
            f"{warmup_name}={warmup} is longer than the whole schedule ({total_name}={total}); "
            f"lower the warm-up or train longer"
        )


def cosine_schedule(
    start: float,
    end: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start``, then a half cosine down/up to ``end``.

    For step ``s`` in ``[0, total_steps)``, with ``W = warmup_steps`` and ``n = total_steps - W``:

    - ``s < W``:  ``warmup_start + (start - warmup_start) * s / W``
    - ``s >= W``: ``end + (start - end) * (1 + cos(pi * j / (n - 1))) / 2`` with ``j = s - W``;
      so step ``W`` is exactly ``start`` and step ``total_steps - 1`` exactly ``end``. When
      ``n == 1`` the single post-warm-up step is ``start``.

    ``warmup_steps == total_steps`` is allowed (warm-up only; ``start`` is never reached).
    Used per iteration for the learning rate (``start`` = peak lr), weight decay (0.04 -> 0.4) and
    the teacher EMA momentum (0.996 -> 1.0).

    Returns:
        float64 array of shape ``[total_steps]``.

    Raises:
        ScheduleError: ``total_steps <= 0``, ``warmup_steps < 0``, ``warmup_steps > total_steps``,
            non-integer step counts or non-finite values.
    """
    _check_steps("total_steps", total_steps, "warmup_steps", warmup_steps)
    _check_finite(start=start, end=end, warmup_start=warmup_start)
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)

    warmup = warmup_start + (start - warmup_start) * np.arange(warmup_steps) / max(warmup_steps, 1)
    n = total_steps - warmup_steps
    if n == 1:
        decay = np.array([start], dtype=np.float64)
    else:
        phase = np.arange(n) / max(n - 1, 1)
        decay = end + (start - end) * 0.5 * (1.0 + np.cos(np.pi * phase))
        if n:
            # exact endpoints despite floating-point cos(pi) and the (1 + cos) / 2 rounding
            decay[0], decay[-1] = start, end
    return np.concatenate([warmup.astype(np.float64), decay.astype(np.float64)])


def teacher_temp_schedule(
    warmup_temp: float,
    final_temp: float,
    warmup_epochs: int,
    total_epochs: int,
) -> np.ndarray:
    """DINO teacher temperature per epoch: linear ``warmup_temp`` -> ``final_temp``, then constant.

    Epoch ``e < warmup_epochs``: ``warmup_temp + (final_temp - warmup_temp) * e / warmup_epochs``;
    epoch ``e >= warmup_epochs``: ``final_temp``. (Same warm-up convention as ``cosine_schedule``;
    DINO's linspace reaches ``final_temp`` one epoch earlier.) Typical: 0.04 -> 0.07 over 30 epochs.

    Returns:
        float64 array of shape ``[total_epochs]``.

    Raises:
        ScheduleError: ``total_epochs <= 0``, ``warmup_epochs`` negative or ``> total_epochs``,
            a non-positive or non-finite temperature.
    """
    _check_steps("total_epochs", total_epochs, "warmup_epochs", warmup_epochs)
    _check_finite(warmup_temp=warmup_temp, final_temp=final_temp)
    if warmup_temp <= 0 or final_temp <= 0:
        raise ScheduleError(
            f"teacher temperatures must be > 0, got warmup_temp={warmup_temp}, "
            f"final_temp={final_temp}; DINO uses 0.04 -> 0.04..0.07"
        )
    warmup_epochs, total_epochs = int(warmup_epochs), int(total_epochs)
    values = np.full(total_epochs, float(final_temp), dtype=np.float64)
    e = np.arange(warmup_epochs)
    values[:warmup_epochs] = warmup_temp + (final_temp - warmup_temp) * e / max(warmup_epochs, 1)
    return values


@dataclass(frozen=True)
class Schedule:
    """A precomputed schedule looked up by step (or epoch), holding its last value past the end.

    ``values``: shape ``[T]``. ``schedule(t)`` returns ``values[min(t, T - 1)]`` as a Python float;
    a negative index is an error (it would silently read from the end with plain indexing).
    """

    values: np.ndarray

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ScheduleError(
                f"a Schedule needs a non-empty 1-D array of values, got shape {values.shape}"
            )
        # frozen dataclass: bypass __setattr__ once to store the normalised, read-only copy
        values = values.copy()
        values.flags.writeable = False
        object.__setattr__(self, "values", values)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        return float(self.values[min(int(step), self.values.size - 1)])

    def __len__(self) -> int:
        return int(self.values.size)

    @property
    def final(self) -> float:
        """The value held after the end of the schedule."""
        return float(self.values[-1])
