"""iBOT's masked patch term, and with ``vmf`` iBOT-vMF's (docs/objective.md section 5).

For each global view, the student's patch distributions (the view seen with mask tokens)
against the teacher's (the same view unmasked), at the masked positions only. Patches have
their own teacher temperature and their own center; with ``vmf`` the log-normaliser of each
prototype is added to the patch logits too, with the temperature of each network. DINO's
[CLS] term (``raydino.objectives.dino``) is the other half of iBOT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from raydino.objectives.base import Outputs, Temperatures, TermOutput
from raydino.objectives.centering import entropy
from raydino.objectives.teacher import CentredTerm, student_log_probs


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


class IBOTPatchTerm(CentredTerm):
    """The masked patch loss. Metrics: ``patch_teacher_entropy``, ``masked_share``, ``teacher_patch_temp``."""

    needs: ClassVar[frozenset[str]] = frozenset({"patches", "masks"})
    what = "patch"

    def forward(
        self, *, student: Outputs, teacher: Outputs, temps: Temperatures, masks: Sequence[Tensor] | None = None
    ) -> TermOutput:
        """Patch scores (B, N, K') and a mask per global view: the student's from the masked views,
        the teacher's from the same views unmasked."""
        if masks is None or student.patch_scores is None or teacher.patch_scores is None:
            raise ValueError("the iBOT patch term needs masks and the patch scores of both networks")
        if not len(student.patch_scores) == len(teacher.patch_scores) == len(masks):
            raise ValueError("one student patch score, teacher patch score and mask per global view")
        correction = self.student_correction(student.patch_norms, temps.student)
        log_probs = [student_log_probs(s, temps.student, correction) for s in student.patch_scores]
        shape = teacher.patch_scores[0].shape
        flat = torch.cat([t.reshape(-1, shape[-1]) for t in teacher.patch_scores])  # every position is a row
        targets = self.teacher(flat, temps.teacher_patch, teacher.patch_norms)
        loss = masked_patch_cross_entropy([t.view(shape) for t in targets.chunk(len(masks))], log_probs, masks)
        with torch.no_grad():
            metrics = {"patch_teacher_entropy": entropy(targets).mean(),
                       "masked_share": torch.cat([m.flatten() for m in masks]).float().mean(),
                       "teacher_patch_temp": torch.tensor(temps.teacher_patch)}
        return TermOutput(loss, metrics)
