"""iBOT and iBOT-vMF (objective.md section 5): DINO's [CLS] loss plus masked patch prediction.

The patch loss compares, for each global view, the student's patch distributions (the
view seen with mask tokens) with the teacher's (the same view unmasked), at the masked
positions only. Patches have their own teacher temperature and their own center; with
``vmf`` the log-normaliser of each prototype is added to the patch logits too, with the
temperature of each network, and both centers are probability centers by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raydino.objectives.centering import entropy, make_centering
from raydino.objectives.dino import DINOLoss, LossOutput, scaled_logits
from raydino.objectives.vmf import vmf_correction


def masked_patch_cross_entropy(
    teacher_probs: Sequence[Tensor], student_log_probs: Sequence[Tensor], masks: Sequence[Tensor]
) -> Tensor:
    """iBOT's patch loss: per view, per image the mean over masked positions of H(P_t, P_s),
    then the mean over images (an unmasked image counts as 0), then the mean over views.

    ``teacher_probs`` / ``student_log_probs``: (B, N, K) per view; ``masks``: (B, N) or (B, h, w) bool.
    """
    total = teacher_probs[0].new_zeros(())
    for q, log_p, mask in zip(teacher_probs, student_log_probs, masks, strict=True):
        weights = mask.flatten(1).to(log_p.dtype)
        per_position = -(q * log_p).sum(dim=-1)  # (B, N)
        per_image = (per_position * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)
        total = total + per_image.mean()
    return total / len(masks)


@dataclass
class IBOTLossOutput(LossOutput):
    cls_loss: Tensor | None = None
    patch_loss: Tensor | None = None
    patch_teacher_entropy: Tensor | None = None


class IBOTLoss(nn.Module):
    """lambda1 * DINO's [CLS] loss + lambda2 * the masked patch loss, each with its own center."""

    def __init__(
        self,
        num_prototypes: int,
        num_patch_prototypes: int,
        bottleneck_dim: int,
        vmf: bool = False,
        centering: str = "logit",
        patch_centering: str | None = None,
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.cls = DINOLoss(num_prototypes, bottleneck_dim, vmf, centering, center_momentum, sinkhorn_iterations)
        self.patch_centering = make_centering(
            patch_centering or centering, num_patch_prototypes, center_momentum, sinkhorn_iterations
        )
        self.vmf, self.bottleneck_dim = vmf, bottleneck_dim
        self.lambda1, self.lambda2 = lambda1, lambda2
        self._pending_patch_center: tuple[Tensor, float] | None = None

    def commit_center(self) -> None:
        """Absorb the last batch into both centers (after the loss is known finite)."""
        self.cls.commit_center()
        if self._pending_patch_center is not None:
            self.patch_centering.update(*self._pending_patch_center)
            self._pending_patch_center = None

    def _correction(self, norms: Tensor | None, temperature: float) -> Tensor | None:
        if not self.vmf:
            return None
        if norms is None:
            raise ValueError("iBOT-vMF needs the patch prototype norms of each network (head.patch_prototype_norms())")
        return vmf_correction(norms, temperature, self.bottleneck_dim)

    def forward(
        self,
        student_scores: Sequence[Tensor],
        teacher_scores: Sequence[Tensor],
        student_patch_scores: Sequence[Tensor],
        teacher_patch_scores: Sequence[Tensor],
        masks: Sequence[Tensor],
        student_temp: float,
        teacher_temp: float,
        teacher_patch_temp: float,
        student_norms: Tensor | None = None,
        teacher_norms: Tensor | None = None,
        student_patch_norms: Tensor | None = None,
        teacher_patch_norms: Tensor | None = None,
        update_center: bool = True,
    ) -> IBOTLossOutput:
        """[CLS] scores as for ``DINOLoss``; patch scores (B, N, K') and masks per global view, the
        student's from the masked views, the teacher's from the same views unmasked."""
        if not len(student_patch_scores) == len(teacher_patch_scores) == len(masks):
            raise ValueError("one student patch score, teacher patch score and mask per global view")
        cls = self.cls(
            student_scores, teacher_scores, student_temp, teacher_temp, student_norms, teacher_norms, update_center=False
        )
        student_correction = self._correction(student_patch_norms, student_temp)
        student_log_probs = [
            torch.log_softmax(scaled_logits(s, student_temp, student_correction), dim=-1) for s in student_patch_scores
        ]
        with torch.no_grad():
            shape = teacher_patch_scores[0].shape
            flat = torch.cat([t.reshape(-1, shape[-1]) for t in teacher_patch_scores])  # every position is a row
            teacher_logits = scaled_logits(flat, teacher_patch_temp, self._correction(teacher_patch_norms, teacher_patch_temp))
            targets = self.patch_centering.targets(teacher_logits, teacher_patch_temp)
            self._pending_patch_center = (teacher_logits, teacher_patch_temp)
        patch = masked_patch_cross_entropy(
            [t.view(shape) for t in targets.chunk(len(teacher_patch_scores))], student_log_probs, masks
        )
        if update_center:
            self.commit_center()
        with torch.no_grad():
            patch_entropy = entropy(targets).mean()
        return IBOTLossOutput(
            loss=self.lambda1 * cls.loss + self.lambda2 * patch,
            teacher_entropy=cls.teacher_entropy,
            mean_target_entropy=cls.mean_target_entropy,
            center_norm=cls.center_norm,
            cls_loss=cls.loss.detach(),
            patch_loss=patch.detach(),
            patch_teacher_entropy=patch_entropy,
        )
