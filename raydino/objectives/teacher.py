"""The teacher side of a term: temperature scaling, the vMF correction, centering, and the
deferred center update. DINO's [CLS] term and iBOT's patch term each own one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydino.objectives.base import LossTerm
from raydino.objectives.centering import make_centering
from raydino.objectives.vmf import vmf_correction


def scaled_logits(scores: Tensor, temperature: float, correction: Tensor | None = None) -> Tensor:
    """z / tau in float32 at least, plus the per-prototype vMF correction when given."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if correction is None:
        return scores / temperature
    return torch.add(correction, scores, alpha=1.0 / temperature)  # one fused pass, as cheap as the division


class VMFCorrection:
    """log C_p(||w_k|| / tau) per prototype when ``vmf`` is on (docs/objective.md section 3), else None."""

    def __init__(self, vmf: bool, bottleneck_dim: int, what: str) -> None:
        self.vmf, self.bottleneck_dim, self.what = vmf, bottleneck_dim, what

    def __call__(self, norms: Tensor | None, temperature: float) -> Tensor | None:
        if not self.vmf:
            return None
        if norms is None:
            raise ValueError(f"the vMF correction needs the {self.what} prototype norms of each network")
        return vmf_correction(norms, temperature, self.bottleneck_dim)


def student_log_probs(scores: Tensor, temperature: float, correction: Tensor | None) -> Tensor:
    """The student's log-softmax over prototypes (with its own vMF correction)."""
    return torch.log_softmax(scaled_logits(scores, temperature, correction), dim=-1)


class TeacherTargets(nn.Module):
    """Teacher scores (N, K) -> target probabilities: scaled (and vMF-corrected) logits, then the
    centering mode. The batch's logits wait in ``pending`` until ``commit``, so a step whose loss
    turns out non-finite leaves the center as it was."""

    def __init__(
        self,
        num_prototypes: int,
        bottleneck_dim: int,
        vmf: bool = False,
        centering: str = "logit",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        what: str = "[CLS]",
    ) -> None:
        super().__init__()
        self.correction = VMFCorrection(vmf, bottleneck_dim, what)
        self.centering = make_centering(centering, num_prototypes, center_momentum, sinkhorn_iterations)
        self.pending: tuple[Tensor, float] | None = None

    @torch.no_grad()
    def forward(self, scores: Tensor, temperature: float, norms: Tensor | None = None) -> Tensor:
        logits = scaled_logits(scores, temperature, self.correction(norms, temperature))
        self.pending = (logits, temperature)
        return self.centering.targets(logits, temperature)

    def commit(self) -> None:
        """Absorb the last batch into the center (all-reduced over workers)."""
        if self.pending is not None:
            self.centering.update(*self.pending)
            self.pending = None

    def center_norm(self) -> Tensor | None:
        return self.centering.center_norm()


class CentredTerm(LossTerm):
    """A term that scores the student against centred teacher targets: it owns one ``TeacherTargets``
    and the student's own vMF correction, and commits the teacher's center after a finite loss."""

    what: str = "[CLS]"
    """Which prototypes the norms belong to, for error messages."""

    def __init__(
        self,
        num_prototypes: int,
        bottleneck_dim: int,
        vmf: bool = False,
        centering: str = "logit",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.teacher = TeacherTargets(num_prototypes, bottleneck_dim, vmf, centering, center_momentum,
                                      sinkhorn_iterations, what=self.what)
        self.student_correction = VMFCorrection(vmf, bottleneck_dim, self.what)

    def commit(self) -> None:
        self.teacher.commit()
