"""KoLeo regulariser (Sablayrolles et al. 2019; used by DINOv2): an anti-collapse option.

It is the Kozachenko-Leonenko estimate of differential entropy, up to constants:
-mean_i log ||x_i - x_nn(i)|| over L2-normalised features. Minimising it spreads the
batch over the sphere, which counters the representation collapse that DINO's
centering turns into uniform targets on small, low-diversity data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from raydino.objectives.base import LossTerm, Outputs, Temperatures, TermOutput


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """-mean log distance of each L2-normalised row of ``features`` (N, D) to its nearest
    other row. Needs N >= 2. Computed in float32 (distances of near-duplicates underflow
    in bf16)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs a (N >= 2, D) batch, got shape {tuple(features.shape)}")
    x = torch.nn.functional.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour is chosen, not differentiated through
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)
        neighbour = similarity.argmax(dim=1)
    # eps inside the norm (as torch's PairwiseDistance): exact duplicates keep a finite gradient
    distance = (x - x[neighbour] + eps).norm(dim=-1)
    return -torch.log(distance + eps).mean()


class KoLeoTerm(LossTerm):
    """DINOv2's use: KoLeo of the student's backbone features of each global crop, summed over crops."""

    needs: ClassVar[frozenset[str]] = frozenset({"features"})

    def forward(
        self, *, student: Outputs, teacher: Outputs, temps: Temperatures, masks: Sequence[Tensor] | None = None
    ) -> TermOutput:
        if student.features is None:
            raise ValueError("the KoLeo term needs the student's features (return_features=True)")
        n_global = len(teacher.scores)  # the crops the teacher sees
        return TermOutput(sum(koleo_loss(f) for f in student.features[:n_global]))
