"""The DINO / DINO-vMF cross-view loss (objective.md sections 1 and 3).

The loss takes raw prototype scores z = w . y per crop, and, for DINO-vMF, the
prototype norms ||w_k||, so that the log-normaliser log C_p(||w_k|| / tau) is
added with each network's own temperature and gradients reach the student's norms.
All arithmetic after the head runs in float32 at least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raydino.objectives.centering import entropy, make_centering
from raydino.objectives.distributed import global_batch_mean
from raydino.objectives.vmf import vmf_correction


@dataclass
class LossOutput:
    """The loss and what is worth logging about the teacher targets."""

    loss: Tensor
    teacher_entropy: Tensor
    """Mean entropy of the per-sample teacher targets (-> 0 or log K at collapse)."""
    mean_target_entropy: Tensor
    """Entropy of the batch-mean teacher target (-> 0 when one prototype takes all)."""
    center_norm: Tensor | None


def scaled_logits(scores: Tensor, temperature: float, correction: Tensor | None = None) -> Tensor:
    """z / tau in float32 at least, plus the per-prototype vMF correction when given."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if correction is None:
        return scores / temperature
    return torch.add(correction, scores, alpha=1.0 / temperature)  # one fused pass, as cheap as the division


def cross_view_cross_entropy(teacher_probs: Sequence[Tensor], student_log_probs: Sequence[Tensor]) -> Tensor:
    """Mean over pairs (teacher crop i, student crop j != i) of the batch-mean H(P_t^i, P_s^j).

    Student crops 0..len(teacher_probs)-1 are the teacher's crops, in the same order.
    """
    total_log_probs = student_log_probs[0].clone()
    for log_probs in student_log_probs[1:]:
        total_log_probs = total_log_probs + log_probs
    loss = teacher_probs[0].new_zeros(())
    for i, q in enumerate(teacher_probs):
        loss = loss - (q * (total_log_probs - student_log_probs[i])).sum(dim=-1).mean()
    n_pairs = len(teacher_probs) * len(student_log_probs) - len(teacher_probs)
    return loss / n_pairs


class DINOLoss(nn.Module):
    """Cross-entropy between centred teacher targets and student predictions across views."""

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
        self.vmf = vmf
        self.bottleneck_dim = bottleneck_dim
        self.centering = make_centering(centering, num_prototypes, center_momentum, sinkhorn_iterations)
        self._pending_center: tuple[Tensor, float] | None = None

    def commit_center(self) -> None:
        """Absorb the teacher logits of the last ``forward`` into the center (all-reduced)."""
        if self._pending_center is not None:
            self.centering.update(*self._pending_center)
            self._pending_center = None

    def _correction(self, norms: Tensor | None, temperature: float) -> Tensor | None:
        if not self.vmf:
            return None
        if norms is None:
            raise ValueError("DINO-vMF needs the prototype norms of each network (head.prototype_norms())")
        return vmf_correction(norms, temperature, self.bottleneck_dim)

    def forward(
        self,
        student_scores: Sequence[Tensor],
        teacher_scores: Sequence[Tensor],
        student_temp: float,
        teacher_temp: float,
        student_norms: Tensor | None = None,
        teacher_norms: Tensor | None = None,
        update_center: bool = True,
    ) -> LossOutput:
        """``student_scores``: one (B, K) tensor per crop, global crops first;
        ``teacher_scores``: one per global crop. Updates the center after the loss, or with
        ``update_center=False`` leaves that to ``commit_center()`` (a training step does so only
        once the loss is known finite, so a skipped step leaves no NaN in the center)."""
        if len(student_scores) < len(teacher_scores) or len(student_scores) < 2:
            raise ValueError("the student must see every teacher crop and at least two crops in all")
        student_correction = self._correction(student_norms, student_temp)
        student_log_probs = [
            torch.log_softmax(scaled_logits(s, student_temp, student_correction), dim=-1) for s in student_scores
        ]
        with torch.no_grad():
            teacher_correction = self._correction(teacher_norms, teacher_temp)
            teacher_logits = scaled_logits(torch.cat(list(teacher_scores)), teacher_temp, teacher_correction)
            targets = self.centering.targets(teacher_logits, teacher_temp)
        loss = cross_view_cross_entropy(targets.chunk(len(teacher_scores)), student_log_probs)
        with torch.no_grad():
            teacher_entropy = entropy(targets).mean()
            mean_target_entropy = entropy(global_batch_mean(targets))
            self._pending_center = (teacher_logits, teacher_temp)
        if update_center:
            self.commit_center()
        return LossOutput(loss, teacher_entropy, mean_target_entropy, self.centering.center_norm())
