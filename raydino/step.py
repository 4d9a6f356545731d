"""One DINO / DINO-vMF optimisation step, in plain torch (no Ray, no MLflow).

The Ray Train loop, the single-process run and the benchmarks all build it with
``DINOStep.build``, so the numerics of a step and what belongs to a checkpoint live in
one place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raydino.config import Config
from raydino.models import MultiCropNetwork, build_student_teacher, ema_update, param_groups
from raydino.objectives import DINOLoss, koleo_loss
from raydino.objectives.distributed import global_mean
from raydino.schedules import ScheduleValues


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another architecture or loss than the one being built."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; nothing was applied to the weights for that step."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at step {step}; the step was not applied. Lower optim.base_lr, raise "
            "optim.warmup_epochs or loss.student_temp, or set optim.clip_grad, then resume from the last checkpoint."
        )
        self.step = step


class TrainingDiverged(RuntimeError):
    """A run stopped for non-finite losses, with the step and the checkpoint to go back to."""


class NonFiniteGuard:
    """``optim.nonfinite_loss``: ``stop`` at the first non-finite loss, or ``skip`` the step (nothing
    was applied) and stop only after ``max_in_a_row`` in a row. Every worker sees the same
    all-reduced loss, so all take the same decision."""

    def __init__(self, policy: str, max_in_a_row: int, skipped: int = 0) -> None:
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.in_a_row, self.skipped = 0, skipped

    def finite(self) -> None:
        self.in_a_row = 0

    def nonfinite(self, exc: NonFiniteLossError, last_checkpoint: str) -> None:
        """Count a skipped step, or raise ``TrainingDiverged`` naming the step and the last good checkpoint."""
        self.in_a_row += 1
        self.skipped += 1
        if self.policy == "stop":
            raise TrainingDiverged(f"{exc} Last good checkpoint: {last_checkpoint}.")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{exc} {self.in_a_row} non-finite losses in a row (optim.max_nonfinite_in_a_row={self.max_in_a_row}); "
                f"{self.skipped} skipped in all. Last good checkpoint: {last_checkpoint}."
            )


def build_models(cfg: Config) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student and teacher (an exact copy) for ``cfg``; seed torch first for reproducible weights."""
    return build_student_teacher(
        cfg.model.name,
        cfg.model.img_size,
        dict(cfg.model.kwargs),
        cfg.head.model_dump(),
        cfg.model.drop_path_rate,
    )


def build_loss(cfg: Config) -> DINOLoss:
    """The loss with its centering state (checkpointed with the models)."""
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
    """This step's lr and weight decay; the last layer is frozen by its lr (0 while frozen)."""
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

    @classmethod
    def build(
        cls, cfg: Config, device: torch.device, wrap_student: Callable[[nn.Module], nn.Module] | None = None
    ) -> DINOStep:
        """Models, loss and optimiser for ``cfg`` on ``device``. Seeds torch with ``cfg.seed`` first, so
        every worker starts from the same weights; ``wrap_student`` (e.g. Ray's ``prepare_model``)
        moves the student to the device and wraps it for DDP. The teacher is never wrapped."""
        torch.manual_seed(cfg.seed)
        student, teacher = build_models(cfg)
        teacher.to(device)
        loss_fn = build_loss(cfg).to(device)
        wrapped = wrap_student(student) if wrap_student is not None else student.to(device)
        module = wrapped.module if hasattr(wrapped, "module") else wrapped
        return cls(cfg, wrapped, module, teacher, loss_fn, build_optimizer(cfg, module), device)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the step: both networks, the optimiser, the centering state."""
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss_fn.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's ``state_dict``; a checkpoint of another architecture is named as such."""
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss_fn.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit this configuration ({str(exc).strip()[:600]}). It was written by a run "
                "with another model, head or centering: resume with that run's config, or start a new run "
                "(another tracking.run_name)"
            ) from None

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
            update_center=False,
        )
        loss = out.loss
        koleo = None
        if koleo_weight > 0:  # DINOv2: on the student's global-crop features, summed over crops
            koleo = sum(koleo_loss(f) for f in features[: self.num_global])
            loss = loss + koleo_weight * koleo
        parts = [loss.detach()] if koleo is None else [loss.detach(), out.loss.detach(), koleo.detach()]
        means = global_mean(torch.stack(parts)).tolist()  # one all-reduce; every worker sees a NaN anywhere
        loss_value = means[0]
        if not math.isfinite(loss_value):  # nothing changed yet: weights, optimiser and center as before the step
            raise NonFiniteLossError(step, loss_value)
        self.loss_fn.commit_center()
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
