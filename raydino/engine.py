"""One DINO / DINO-vMF optimisation step, in plain torch (no Ray, no MLflow).

The Ray Train loop and the single-process smoke run both drive this class, so the
numerics of a step live in one place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from raydino.config import Config
from raydino.models import MultiCropNetwork, build_student_teacher, ema_update, param_groups
from raydino.objectives import DINOLoss, koleo_loss
from raydino.objectives.centering import all_reduce_sum
from raydino.schedules import ScheduleValues

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; nothing was applied to the weights for that step."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at step {step}; the step was not applied. Lower optim.base_lr, raise "
            "optim.warmup_epochs or loss.student_temp, or set optim.clip_grad, then resume from the last checkpoint."
        )
        self.step = step


def global_mean(x: Tensor) -> Tensor:
    """Mean of a scalar over all workers (itself without a process group)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return all_reduce_sum(x.float()) / world


def normalize_crops(crops: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """uint8 (B, C, H, W) crops -> float32 ImageNet-normalised, on the training device.

    Grayscale crops are repeated to three channels.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for crop in crops:
        x = crop.to(device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append((x - mean) / std)
    return out


def build_models(cfg: Config) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    return build_student_teacher(
        cfg.model.name,
        cfg.model.img_size,
        dict(cfg.model.kwargs),
        cfg.head.model_dump(),
        cfg.model.drop_path_rate,
    )


def build_loss(cfg: Config) -> DINOLoss:
    return DINOLoss(
        cfg.head.num_prototypes,
        cfg.head.bottleneck_dim,
        vmf=cfg.loss.vmf,
        centering=cfg.loss.centering,
        center_momentum=cfg.loss.center_momentum,
        sinkhorn_iterations=cfg.loss.sinkhorn_iterations,
    )


def build_optimizer(cfg: Config, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameter groups; lr and weight decay are set every step."""
    return torch.optim.AdamW(param_groups(student, cfg.optim.decay_prototype_norms), lr=0.0, weight_decay=0.0)


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    for group in optimizer.param_groups:
        group["lr"] = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["weight_decay"] = values.weight_decay if group["apply_weight_decay"] else 0.0


class DINOStep:
    """Forward both networks on the crops, step the student, then move the teacher by EMA.

    ``student`` may be a DDP wrapper; ``student_module`` is the module it wraps.
    """

    def __init__(
        self,
        cfg: Config,
        student: nn.Module,
        student_module: MultiCropNetwork,
        teacher: MultiCropNetwork,
        loss_fn: DINOLoss,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.student = student
        self.student_module = student_module
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = device
        self.schedules = cfg.schedules()
        self.num_global = 2
        use_bf16 = cfg.optim.amp and device.type == "cuda"
        self._autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )

    def __call__(self, crops: Sequence[Tensor], step: int, total_steps: int) -> dict[str, float]:
        """One optimisation step on normalised float crops (global crops first)."""
        values = self.schedules.at(step, total_steps)
        apply_schedule(self.optimizer, values)
        with self._autocast():
            with torch.no_grad():
                teacher_scores, teacher_norms = self.teacher(crops[: self.num_global])
            koleo_weight = self.cfg.loss.koleo_weight
            if koleo_weight > 0:
                student_scores, student_norms, features = self.student(crops, return_features=True)
            else:
                student_scores, student_norms = self.student(crops)
        out = self.loss_fn(
            student_scores,
            teacher_scores,
            self.cfg.loss.student_temp,
            values.teacher_temp,
            student_norms,
            teacher_norms,
        )
        loss = out.loss
        koleo = None
        if koleo_weight > 0:  # DINOv2: on the student's global-crop features, summed over crops
            koleo = sum(koleo_loss(f) for f in features[: self.num_global])
            loss = loss + koleo_weight * koleo
        parts = [loss.detach()] if koleo is None else [loss.detach(), out.loss.detach(), koleo.detach()]
        means = global_mean(torch.stack(parts)).tolist()  # one all-reduce; every worker sees a NaN anywhere
        loss_value = means[0]
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(step, loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float("nan")
        if self.cfg.optim.clip_grad > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(self.student_module.parameters(), self.cfg.optim.clip_grad))
        self.optimizer.step()
        ema_update(self.teacher, self.student_module, values.teacher_momentum)
        metrics = {
            "loss": loss_value,
            "lr": values.lr,
            "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum,
            "teacher_temp": values.teacher_temp,
            "teacher_entropy": out.teacher_entropy.item(),
            "mean_target_entropy": out.mean_target_entropy.item(),
            "grad_norm": grad_norm,
        }
        if out.center_norm is not None:
            metrics["center_norm"] = out.center_norm.item()
        if koleo is not None:
            metrics["dino_loss"], metrics["koleo"] = means[1], means[2]
        return metrics
