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

from raydino.objectives.centering import entropy, global_batch_mean, make_centering
from raydino.objectives.vmf import vmf_logits


@dataclass
class LossOutput:
    """The loss and what is worth logging about the teacher targets."""

    loss: Tensor
    teacher_entropy: Tensor
    """Mean entropy of the per-sample teacher targets (-> 0 or log K at collapse)."""
    mean_target_entropy: Tensor
    """Entropy of the batch-mean teacher target (-> 0 when one prototype takes all)."""
    center_norm: Tensor | None


def scaled_logits(scores: Tensor, temperature: float, norms: Tensor | None = None, dim: int | None = None) -> Tensor:
    """z / tau, plus log C_p(||w|| / tau) when prototype norms are given (DINO-vMF)."""
    if norms is None:
        return scores.float() / temperature
    if dim is None:
        raise ValueError("the vMF correction needs the bottleneck dimension p")
    return vmf_logits(scores, norms, temperature, dim)


def cross_view_cross_entropy(teacher_probs: Sequence[Tensor], student_log_probs: Sequence[Tensor]) -> Tensor:
    """Mean over pairs (teacher crop i, student crop j != i) of the batch-mean H(P_t^i, P_s^j).

    Student crops 0..len(teacher_probs)-1 are the teacher's crops, in the same order.
    """
    total_log_probs = torch.stack(list(student_log_probs)).sum(dim=0)
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

    def _logits(self, scores: Tensor, temperature: float, norms: Tensor | None) -> Tensor:
        if self.vmf and norms is None:
            raise ValueError("DINO-vMF needs the prototype norms of each network (head.prototype_norms())")
        return scaled_logits(scores, temperature, norms if self.vmf else None, self.bottleneck_dim)

    def forward(
        self,
        student_scores: Sequence[Tensor],
        teacher_scores: Sequence[Tensor],
        student_temp: float,
        teacher_temp: float,
        student_norms: Tensor | None = None,
        teacher_norms: Tensor | None = None,
    ) -> LossOutput:
        """``student_scores``: one (B, K) tensor per crop, global crops first;
        ``teacher_scores``: one per global crop. Updates the center after the loss."""
        if len(student_scores) <= len(teacher_scores):
            raise ValueError("the student must see more crops than the teacher (global + local crops)")
        student_log_probs = [
            torch.log_softmax(self._logits(s, student_temp, student_norms), dim=-1) for s in student_scores
        ]
        with torch.no_grad():
            teacher_logits = self._logits(torch.cat(list(teacher_scores)).detach(), teacher_temp, teacher_norms)
            teacher_logits = teacher_logits.detach()
            targets = self.centering.targets(teacher_logits, teacher_temp)
        loss = cross_view_cross_entropy(targets.chunk(len(teacher_scores)), student_log_probs)
        with torch.no_grad():
            teacher_entropy = entropy(targets).mean()
            mean_target_entropy = entropy(global_batch_mean(targets))
            self.centering.update(teacher_logits, teacher_temp)
        return LossOutput(loss, teacher_entropy, mean_target_entropy, self.centering.center_norm())
