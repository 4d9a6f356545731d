"""Within-epoch progress: step rate, images/s, the share of time spent waiting on data, ETAs.

An ImageNet epoch is about 1,250 steps and an hour; one line per epoch leaves a user blind. Rank 0
feeds every step's data wait and compute time here and prints a line every
``tracking.progress_seconds``; the same figures go to MLflow. A data stage that keeps the trainers
waiting is named once per run, with the knobs that feed it (not in the first window: start-up).
Pure Python (no Ray, no torch).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SLOW_DATA_FRACTION = 0.2
"""Data wait above this share of a window's time is a data stage too slow for the trainers."""


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass
class ProgressMeter:
    """Steps of one window: data wait and compute per step; ``report`` when ``due``."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int
    every_seconds: float
    clock: Callable[[], float] = time.perf_counter
    _waits: list[float] = field(default_factory=list)
    _computes: list[float] = field(default_factory=list)
    _window_start: float | None = None
    warned_slow_data: bool = False
    windows: int = 0
    """Windows reported so far; the first holds the start-up (crop actors importing torch, first blocks)
    and never warns."""

    def record(self, data_wait: float, compute: float) -> None:
        if self._window_start is None:
            self._window_start = self.clock() - data_wait - compute
        self._waits.append(data_wait)
        self._computes.append(compute)

    def figures(self) -> dict[str, float]:
        """images/s (global), median step seconds, data wait share over the window so far."""
        elapsed = max(self.clock() - (self._window_start or self.clock()), 1e-9)
        steps = len(self._waits)
        busy = sum(self._waits) + sum(self._computes)
        return {
            "images_per_second": steps * self.global_batch / elapsed,
            "step_seconds": statistics.median(w + c for w, c in zip(self._waits, self._computes)) if steps else 0.0,
            "data_wait_fraction": sum(self._waits) / busy if busy > 0 else 0.0,
        }

    def due(self) -> bool:
        return self._window_start is not None and self.clock() - self._window_start >= self.every_seconds

    def report(self, step: int, epoch: int, batch_in_epoch: int) -> tuple[dict[str, float], str, str | None]:
        """This window's figures, its progress line, and once per run (never in the first window) a
        slow-data warning, else None; starts the next window."""
        figures = self.figures()
        rate = figures["images_per_second"] / self.global_batch  # steps/s
        epoch_left = (self.steps_per_epoch - batch_in_epoch) / rate if rate > 0 else float("inf")
        run_left = (self.total_steps - step) / rate if rate > 0 else float("inf")
        line = (
            f"epoch {epoch + 1} step {batch_in_epoch}/{self.steps_per_epoch} ({step}/{self.total_steps} in all)  "
            f"{figures['images_per_second']:.1f} images/s  {figures['step_seconds']:.2f} s/step  "
            f"data wait {100 * figures['data_wait_fraction']:.0f}%  "
            f"epoch ends in {_duration(epoch_left)}, run in {_duration(run_left)}"
        )
        warning = None
        self.windows += 1
        if figures["data_wait_fraction"] > SLOW_DATA_FRACTION and not self.warned_slow_data and self.windows > 1:
            self.warned_slow_data = True
            warning = (
                f"warning: the trainers waited on data {100 * figures['data_wait_fraction']:.0f}% of the last "
                f"{len(self._waits)} steps: give the multi-crop stage more actors (data.num_crop_actors, or "
                "data.crop_actors_per_worker=[min, max] for an autoscaling pool, and CPU nodes for it to grow "
                "into) or more CPUs per actor (data.cpus_per_crop_actor)"
            )
        self._waits.clear()
        self._computes.clear()
        self._window_start = self.clock()
        return figures, line, warning
