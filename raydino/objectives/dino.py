"""DINO's [CLS] term across views, and with ``vmf`` DINO-vMF's (docs/objective.md sections 1 and 3).

The term takes raw prototype scores z = w . y per crop and, for DINO-vMF, the prototype norms
||w_k||, so that the log-normaliser log C_p(||w_k|| / tau) is added with each network's own
temperature and gradients reach the student's norms. All arithmetic after the head runs in
float32 at least.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raydino.objectives.base import Outputs, Temperatures, TermOutput
from raydino.objectives.centering import entropy
from raydino.objectives.distributed import global_batch_mean
from raydino.objectives.teacher import CentredTerm, student_log_probs


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


class DINOTerm(CentredTerm):
    """Cross-entropy between the teacher's centred targets on the global crops and the student's
    predictions on every other crop. Metrics: ``teacher_entropy`` (mean entropy of the per-sample
    targets: -> log K or 0 at collapse), ``mean_target_entropy`` (of the batch-mean target: -> 0 when
    one prototype takes all) and ``center_norm``."""

    what = "[CLS]"

    def forward(
        self, *, student: Outputs, teacher: Outputs, temps: Temperatures, masks: Sequence[Tensor] | None = None
    ) -> TermOutput:
        """``student.scores``: one (B, K) tensor per crop, global crops first; ``teacher.scores``:
        one per global crop."""
        n_global = len(teacher.scores)
        if len(student.scores) < n_global or len(student.scores) < 2:
            raise ValueError("the student must see every teacher crop and at least two crops in all")
        correction = self.student_correction(student.norms, temps.student)
        log_probs = [student_log_probs(s, temps.student, correction) for s in student.scores]
        targets = self.teacher(torch.cat(list(teacher.scores)), temps.teacher, teacher.norms)
        loss = cross_view_cross_entropy(targets.chunk(n_global), log_probs)
        with torch.no_grad():
            metrics = {"teacher_entropy": entropy(targets).mean(),
                       "mean_target_entropy": entropy(global_batch_mean(targets))}
            center_norm = self.teacher.center_norm()
            if center_norm is not None:
                metrics["center_norm"] = center_norm
        return TermOutput(loss, metrics)
