"""The one shape every loss term has: keyword arguments in, a named part out.

A term reads what it needs from the student's and the teacher's outputs (any object with
the fields of ``Views``: the network's ``NetworkOutput`` is one), the step's temperatures
and, for masked prediction, the masks. It returns its unweighted loss and detached
metrics; ``raydino.objectives.objective.Objective`` weights and sums the parts in one place.
A term that centres teacher targets holds a ``TeacherTargets`` and commits its center only
when the step says the loss was finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from torch import Tensor, nn


class Outputs(Protocol):
    """What a network hands the loss (``raydino.models.network.NetworkOutput`` has these fields)."""

    scores: list[Tensor]
    norms: Tensor | None
    features: list[Tensor] | None
    patch_scores: list[Tensor] | None
    patch_norms: Tensor | None


@dataclass
class Views:
    """A plain ``Outputs``, for calling terms on tensors (tests, benchmarks)."""

    scores: list[Tensor]
    norms: Tensor | None = None
    features: list[Tensor] | None = None
    patch_scores: list[Tensor] | None = None
    patch_norms: Tensor | None = None


@dataclass(frozen=True)
class Temperatures:
    """This step's temperatures (the teacher's are scheduled)."""

    student: float
    teacher: float
    teacher_patch: float = 0.07


@dataclass
class TermOutput:
    """A term's unweighted loss and what is worth logging about it (detached)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class LossTerm(nn.Module):
    """One loss term. ``needs`` names what the networks must return: ``patches`` (patch scores
    of the global crops), ``features`` (backbone [CLS] features), ``masks`` (iBOT's masked
    student views)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def forward(
        self, *, student: Outputs, teacher: Outputs, temps: Temperatures, masks: Sequence[Tensor] | None = None
    ) -> TermOutput:
        raise NotImplementedError

    def commit(self) -> None:
        """Absorb the last call's teacher statistics (called once the loss is known finite)."""
