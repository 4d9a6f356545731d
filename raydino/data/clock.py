"""The epoch clock: a tiny actor in a module that does not import torch.

Its process imports only this module (and Ray), not torch and torchvision (seconds of
CPU and hundreds of MB per process on a small machine).
"""

from __future__ import annotations

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
