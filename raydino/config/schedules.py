"""Training schedules as pure functions of (step, total_steps).

Warm-ups and freezes are given in epochs but applied as fractions of the run
(``warmup_epochs / epochs``), so that resuming with another worker count keeps every
value right as long as the global step and total steps describe the same progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps``."""
    _check(step, total_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total_steps))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` at step 0 to ``end`` at ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``peak``, then half-cosine down to ``final``: DINO's ``cosine_scheduler``
    value for value (its warm-up is ``np.linspace(0, peak, warmup_steps)``, so it reaches the peak on
    its last warm-up step, and the cosine covers the remaining steps)."""
    _check(step, total_steps)
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return peak * step / max(warmup_steps - 1, 1)
    if warmup_steps == total_steps:
        return peak
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def epochs_to_steps(epochs: float, total_epochs: int, total_steps: int) -> int:
    """Steps covering the first ``epochs`` of a run of ``total_epochs`` over ``total_steps``."""
    return round(total_steps * epochs / total_epochs)


@dataclass(frozen=True)
class ScheduleValues:
    """Every scheduled quantity at one step."""

    lr: float
    last_layer_lr: float
    last_layer_frozen: bool
    """DINO's ``freeze_last_layer``: the step drops the prototypes' gradients (lr 0 as well)."""
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    teacher_patch_temp: float


@dataclass(frozen=True)
class Schedules:
    """The DINO schedules (lr already scaled by the global batch size)."""

    epochs: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: float
    freeze_last_layer_epochs: float
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    """iBOT's patch temperature, warmed up over the same epochs as the [CLS] one."""

    def at(self, step: int, total_steps: int) -> ScheduleValues:
        _check(step, total_steps)
        lr = warmup_cosine(
            step, total_steps, self.lr, self.min_lr, epochs_to_steps(self.warmup_epochs, self.epochs, total_steps)
        )
        frozen = step < epochs_to_steps(self.freeze_last_layer_epochs, self.epochs, total_steps)
        temp_steps = epochs_to_steps(self.warmup_teacher_temp_epochs, self.epochs, total_steps)
        return ScheduleValues(
            lr=lr,
            last_layer_lr=0.0 if frozen else lr,
            last_layer_frozen=frozen,
            weight_decay=cosine(step, total_steps, self.weight_decay, self.weight_decay_end),
            teacher_momentum=cosine(step, total_steps, self.momentum_teacher, 1.0),
            teacher_temp=linear_warmup(step, temp_steps, self.warmup_teacher_temp, self.teacher_temp),
            teacher_patch_temp=linear_warmup(step, temp_steps, self.warmup_teacher_patch_temp, self.teacher_patch_temp),
        )
