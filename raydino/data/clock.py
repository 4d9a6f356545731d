"""Tiny actors of a run's data stage, in a module that does not import torch: the epoch clock
and the crop meter.

Their processes import only this module (and Ray), not torch and torchvision (seconds of
CPU and hundreds of MB per process on a small machine).
"""

from __future__ import annotations

import statistics

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EpochClock:
    """The epoch at which this run (or attempt) starts streaming, set by the training loop
    and read by the crop actors: a resumed run gets the crops of the epochs it resumes at,
    not those of the epochs it already trained on, without rebuilding the pipeline.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = epoch

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


def start_epoch_clock(epoch: int = 0) -> ray.actor.ActorHandle:
    """An EpochClock that asks for the driver's node (softly: Ray places it elsewhere when that node
    cannot host it) and that Ray restarts if its node or process dies; the training loop sets the
    epoch again at the start of every attempt, so a restarted clock loses nothing."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return EpochClock.options(scheduling_strategy=here).remote(epoch)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class CropMeter:
    """What the multi-crop actors did: images cropped and seconds spent, per actor. Each actor
    adds after every call (fire and forget); the driver reads the totals after the run."""

    def __init__(self) -> None:
        self._per_actor: dict[str, list[float]] = {}

    def add(self, actor: str, images: int, seconds: float) -> None:
        totals = self._per_actor.setdefault(actor, [0.0, 0.0])
        totals[0] += images
        totals[1] += seconds

    def summary(self) -> dict[str, float]:
        """``crop_actors_used``, ``cropped_images`` and ``crop_images_per_second_per_actor`` (images over the
        busy seconds of each actor, the median over actors)."""
        rates = [n / s for n, s in self._per_actor.values() if s > 0]
        return {
            "crop_actors_used": float(len(self._per_actor)),
            "cropped_images": float(sum(n for n, _ in self._per_actor.values())),
            "crop_images_per_second_per_actor": float(statistics.median(rates)) if rates else 0.0,
        }


def start_crop_meter() -> ray.actor.ActorHandle:
    """A CropMeter near the driver (softly, as the epoch clock)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return CropMeter.options(scheduling_strategy=here).remote()
