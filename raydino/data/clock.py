"""The epoch clock: a tiny actor in a module that does not import torch.

Its process imports only this module (and Ray), not torch and torchvision (seconds of
CPU and hundreds of MB per process on a small machine).
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
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
