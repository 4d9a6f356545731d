"""Collapse detected while a run trains, not discovered in its metrics afterwards (docs/objective.md, 7).

DINO's two collapses: uniform targets (the teacher's entropy at log K, the loss at log K, the
network learns nothing whatever its kNN says) and one prototype for every sample (the entropy of
the batch-mean target near 0). A third sign, from the per-epoch evaluation: the teacher's argmax
falls on a handful of prototypes. Pure Python: the training loop feeds it the step metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KNOBS = (
    "usual knobs: a sharper teacher (loss.teacher_temp, loss.warmup_teacher_temp), fewer prototypes "
    "(head.num_prototypes), slower centering (loss.center_momentum), a lower lr (optim.base_lr), a slower "
    "teacher (optim.momentum_teacher)"
)


@dataclass
class CollapseWatch:
    """Per-epoch means of ``teacher_entropy`` and ``mean_target_entropy``; ``end_epoch`` names a collapse.

    ``uniform_share``: an epoch whose mean teacher entropy is at least this share of log K has uniform
    targets. ``handful``: this many prototypes in use or fewer is collapse. ``grace_epochs``: the first
    epochs are not judged (a fresh head's targets are near uniform until the teacher sharpens them).
    """

    num_prototypes: int
    uniform_share: float = 0.97
    one_prototype_nats: float = 0.1
    handful: int = 3
    grace_epochs: int = 1
    _entropy: list[float] = field(default_factory=list)
    _mean_target: list[float] = field(default_factory=list)
    epoch_means: dict[str, float] = field(default_factory=dict)
    """The last judged epoch's means, as metrics: ``epoch_teacher_entropy`` and ``epoch_mean_target_entropy``
    in nats, and each as a share of log K (``..._share``): what README's demo figures quote."""

    def record(self, teacher_entropy: float, mean_target_entropy: float) -> None:
        if math.isfinite(teacher_entropy) and math.isfinite(mean_target_entropy):
            self._entropy.append(teacher_entropy)
            self._mean_target.append(mean_target_entropy)

    def end_epoch(self, epoch: int, prototypes_in_use: float | None = None) -> str | None:
        """The collapse seen over epoch ``epoch`` (0-based), in words, or None; starts the next epoch."""
        entropy = sum(self._entropy) / len(self._entropy) if self._entropy else math.nan
        mean_target = sum(self._mean_target) / len(self._mean_target) if self._mean_target else math.nan
        self._entropy, self._mean_target = [], []
        log_k = math.log(self.num_prototypes)
        self.epoch_means = {} if math.isnan(entropy) else {
            "epoch_teacher_entropy": entropy, "epoch_mean_target_entropy": mean_target,
            "epoch_teacher_entropy_share": entropy / log_k, "epoch_mean_target_entropy_share": mean_target / log_k,
        }
        if epoch < self.grace_epochs:
            return None
        if entropy >= self.uniform_share * log_k:
            return (
                f"the teacher's targets were uniform over epoch {epoch + 1} (mean entropy {entropy:.3f} nats, "
                f"{100 * entropy / log_k:.1f}% of log K = {log_k:.3f}; the loss sits at log K)"
            )
        if mean_target < self.one_prototype_nats:
            return (
                f"one prototype took every sample over epoch {epoch + 1} (entropy of the mean target "
                f"{mean_target:.3f} nats)"
            )
        if prototypes_in_use is not None and prototypes_in_use <= self.handful:
            return f"the teacher used {prototypes_in_use:.0f} of {self.num_prototypes} prototypes after epoch {epoch + 1}"
        return None
