"""The total loss: the configured terms, each weighted, summed in one place.

``LOSS_TERMS`` is the registry: a term's builder and its weight, both read from the config.
Adding a term (DINOv3's Gram anchoring, say) is a new file with a ``LossTerm`` and an entry
here; the training step only sees ``Objective``. Every part is logged as ``<name>_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from raydino.config import Config
from raydino.objectives.base import LossTerm, Outputs, Temperatures
from raydino.objectives.dino import DINOTerm
from raydino.objectives.ibot import IBOTPatchTerm
from raydino.objectives.koleo import KoLeoTerm


@dataclass(frozen=True)
class TermSpec:
    build: Callable[[Config], LossTerm]
    weight: Callable[[Config], float]
    always: bool = False
    """Built even at weight 0 (the [CLS] term: its target entropies are the run's collapse signal)."""


def _dino(cfg: Config) -> DINOTerm:
    lo = cfg.loss
    return DINOTerm(cfg.head.num_prototypes, cfg.head.bottleneck_dim, lo.vmf, lo.centering, lo.center_momentum,
                    lo.sinkhorn_iterations)


def _ibot_patch(cfg: Config) -> IBOTPatchTerm:
    lo, head = cfg.loss, cfg.head
    separate = head.patch_prototypes == "separate" and head.num_patch_prototypes
    k = head.num_patch_prototypes if separate else head.num_prototypes
    return IBOTPatchTerm(k, head.bottleneck_dim, lo.vmf, lo.patch_centering, lo.center_momentum, lo.sinkhorn_iterations)


LOSS_TERMS: dict[str, TermSpec] = {
    "cls": TermSpec(_dino, lambda c: c.loss.lambda1 if c.loss.method == "ibot" else 1.0, always=True),
    "patch": TermSpec(_ibot_patch, lambda c: c.loss.lambda2 if c.loss.method == "ibot" else 0.0),
    "koleo": TermSpec(lambda c: KoLeoTerm(), lambda c: c.loss.koleo_weight),
}

# checkpoints written before the terms existed (DINOLoss / IBOTLoss state keys)
_LEGACY_KEYS = {
    "centering.": "terms.cls.teacher.centering.",
    "cls.centering.": "terms.cls.teacher.centering.",
    "patch_centering.": "terms.patch.teacher.centering.",
}


@dataclass
class ObjectiveOutput:
    loss: Tensor
    """The weighted sum: what is differentiated."""
    parts: dict[str, Tensor]
    """Each term's unweighted loss, by term name."""
    metrics: dict[str, Tensor]
    """The terms' own diagnostics (detached)."""


class Objective(nn.Module):
    """Weighted terms; ``commit_center`` after a finite loss updates every teacher center."""

    def __init__(self, terms: Mapping[str, tuple[LossTerm, float]]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, (term, _) in terms.items()})
        self.weights = {name: weight for name, (_, weight) in terms.items()}

    @property
    def needs(self) -> frozenset[str]:
        """What the networks must return for these terms (``patches``, ``features``, ``masks``)."""
        return frozenset().union(*(type(term).needs for term in self.terms.values()))

    def forward(
        self, *, student: Outputs, teacher: Outputs, temps: Temperatures, masks: Sequence[Tensor] | None = None
    ) -> ObjectiveOutput:
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            out = term(student=student, teacher=teacher, temps=temps, masks=masks)
            parts[name] = out.loss
            metrics.update(out.metrics)
            weighted = self.weights[name] * out.loss
            total = weighted if total is None else total + weighted
        assert total is not None, "an objective has at least one term"
        return ObjectiveOutput(total, parts, metrics)

    def commit_center(self) -> None:
        for term in self.terms.values():
            term.commit()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also reads the keys of checkpoints written before the loss terms existed."""
        renamed = {}
        for key, value in state_dict.items():
            old = next((p for p in sorted(_LEGACY_KEYS, key=len, reverse=True) if key.startswith(p)), None)
            renamed[_LEGACY_KEYS[old] + key[len(old):] if old else key] = value
        return super().load_state_dict(renamed, strict=strict, assign=assign)


def build_objective(cfg: Config) -> Objective:
    """The terms ``cfg`` switches on (weight > 0, or always built), with their weights."""
    return Objective({
        name: (spec.build(cfg), spec.weight(cfg))
        for name, spec in LOSS_TERMS.items()
        if spec.always or spec.weight(cfg) > 0
    })
