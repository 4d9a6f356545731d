"""Gradient clipping as the recipes do it, with the pre-clip norm for logging.

DINO and iBOT (``utils.clip_gradients``) clip each parameter's gradient to norm ``max_norm``
on its own, with the coefficient ``max_norm / (norm + 1e-6)`` applied only below 1; that
is far softer than clipping the whole student's norm to the same value. ``global`` is
``torch.nn.utils.clip_grad_norm_`` (DINOv2 clips global norms per sub-module).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClipResult:
    grad_norm: float
    """The global L2 norm of all gradients before clipping."""
    clipped: int
    """How many gradients were scaled down (per_param: parameters; global: 0 or 1)."""


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, mode: str = "per_param") -> ClipResult:
    """Clip in place (``per_param`` or ``global``); ``max_norm <= 0`` only measures the norm."""
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if not grads:
        return ClipResult(0.0, 0)
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]  # each in its gradient's dtype, as DINO
    total = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]), 2.0)
    if max_norm <= 0:
        return ClipResult(float(total), 0)
    if mode == "per_param":
        clipped = []
        for g, norm in zip(grads, norms):
            coef = max_norm / (norm + 1e-6)
            clipped.append(coef < 1.0)
            g.detach().mul_(coef.clamp(max=1.0))  # 1.0 exactly where DINO leaves a gradient alone
        return ClipResult(float(total), int(torch.stack(clipped).sum()))
    if mode == "global":
        nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
        return ClipResult(float(total), int(float(total) > max_norm))
    raise ValueError(f"optim.clip_mode must be 'per_param' or 'global', got {mode!r}")
