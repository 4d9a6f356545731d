"""The teacher as an exponential moving average of the student."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s over matching parameters; buffers are copied.

    ``student`` must be the unwrapped module (not its DDP wrapper), so names match.
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student parameters differ; build them with build_student_teacher")
    names = list(t_params)
    teacher_tensors = [t_params[n].data for n in names]
    student_tensors = [s_params[n].data.to(t_params[n].dtype) for n in names]
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        buffer.copy_(s_buffers[name])
