"""One optimisation step, in plain torch (no Ray, no MLflow), as DINO's ``train_one_epoch`` does it.

The loss is whatever ``raydino.objectives.build_objective`` assembles (DINO or DINO-vMF's [CLS]
term, iBOT's patch term, KoLeo); the step asks the networks for what those terms need, sums
nothing itself and logs each part. The Ray Train loop, the single-process run and the benchmarks
all build it with ``DINOStep.build``, so the numerics of a step and what belongs to a checkpoint
live in one place. tests/test_reference_run.py runs it beside transcriptions of DINO's and iBOT's
loops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydino.config import Config
from raydino.config.schedules import ScheduleValues
from raydino.models import MultiCropNetwork, build_student_teacher, ema_update, param_groups
from raydino.models.grad_clip import clip_gradients
from raydino.models.masking import sample_masks
from raydino.models.param_groups import is_last_layer
from raydino.objectives import Objective, ObjectiveOutput, Temperatures, build_objective
from raydino.objectives.distributed import global_mean


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


def build_models(cfg: Config, masked: bool | None = None) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student and teacher (an exact copy) for ``cfg``, with iBOT's mask token when a loss term asks
    for masks (``masked``, default: what ``cfg``'s objective needs). Seed torch first for
    reproducible weights."""
    if masked is None:
        masked = "masks" in build_objective(cfg).needs
    return build_student_teacher(
        cfg.model.name,
        cfg.model.img_size,
        dict(cfg.model.kwargs),
        cfg.head.model_dump(),
        cfg.model.drop_path_rate,
        masked=masked,
    )


def build_optimizer(cfg: Config, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameter groups; lr and weight decay are set every step. The fused kernel where
    the student is on CUDA, the multi-tensor (foreach) one elsewhere: the same update, fewer launches."""
    on_cuda = next(student.parameters()).is_cuda
    kernel = {"fused": True} if on_cuda else {"foreach": True}
    groups = param_groups(student, cfg.optim.decay_prototype_norms, cfg.optim.layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, **kernel)


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """This step's lr and weight decay; a frozen last layer gets lr 0 (and the step drops its gradients)."""
    for group in optimizer.param_groups:
        lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay; groups of older checkpoints have no scale
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
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.student = student
        self.student_module = student_module
        self.teacher = teacher
        self.objective = objective
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
        objective = build_objective(cfg).to(device)
        student, teacher = build_models(cfg, masked="masks" in objective.needs)
        teacher.to(device)
        if cfg.optim.compile:  # in place (Module.compile): parameter names and checkpoints stay as in eager
            student.compile()
            teacher.compile()
        wrapped = wrap_student(student) if wrap_student is not None else student.to(device)
        module = wrapped.module if hasattr(wrapped, "module") else wrapped
        return cls(cfg, wrapped, module, teacher, objective, build_optimizer(cfg, module), device)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the step: both networks, the optimiser, the centering state."""
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's ``state_dict``; a checkpoint of another architecture is named as such."""
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit this configuration ({str(exc).strip()[:600]}). It was written by a run "
                "with another model, head or centering: resume with that run's config, or start a new run "
                "(another tracking.run_name)"
            ) from None

    def masks(self, crops: Sequence[Tensor], step: int) -> list[Tensor] | None:
        """iBOT's block masks for the global crops of this step, seeded by (seed, step, rank):
        reproducible, different on every worker, independent of the data order. None when no
        term asks for masks."""
        if "masks" not in self.objective.needs:
            return None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.cfg.seed, step, rank])
        grid = self.student_module.patch_grid(crops[0].shape[-1])
        m = self.cfg.mask
        return [
            torch.from_numpy(sample_masks(len(crop), grid, rng, m.ratio, m.unmasked_share, m.aspect)).to(self.device)
            for crop in crops[: self.num_global]
        ]

    def _loss(self, crops: Sequence[Tensor], masks: list[Tensor] | None, values: ScheduleValues) -> ObjectiveOutput:
        """Forward both networks on what the objective's terms need and score them."""
        needs = self.objective.needs
        with self._autocast():
            with torch.no_grad():
                teacher = self.teacher(crops[: self.num_global], return_patches="patches" in needs)
            student = self.student(
                crops, masks=masks, return_features="features" in needs, return_patches="patches" in needs
            )
        temps = Temperatures(self.cfg.loss.student_temp, values.teacher_temp, values.teacher_patch_temp)
        return self.objective(student=student, teacher=teacher, temps=temps, masks=masks)

    def __call__(self, crops: Sequence[Tensor], step: int, total_steps: int) -> dict[str, float]:
        """One optimisation step on normalised float crops (global crops first)."""
        values = self.schedules.at(step, total_steps)
        apply_schedule(self.optimizer, values)
        masks = self.masks(crops, step)
        out = self._loss(crops, masks, values)
        parts = {"loss": out.loss.detach(), **{f"{name}_loss": part.detach() for name, part in out.parts.items()}}
        # one all-reduce; every worker sees a NaN anywhere
        means = dict(zip(parts, global_mean(torch.stack(list(parts.values()))).tolist()))
        if not math.isfinite(means["loss"]):  # nothing changed yet: weights, optimiser and center as before the step
            raise NonFiniteLossError(step, means["loss"])
        self.objective.commit_center()
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = clip_gradients(self.student_module.parameters(), self.cfg.optim.clip_grad, self.cfg.optim.clip_mode)
        if values.last_layer_frozen:  # after clipping, as DINO's cancel_gradients_last_layer
            for name, param in self.student_module.named_parameters():
                if is_last_layer(name):
                    param.grad = None
        self.optimizer.step()
        ema_update(self.teacher, self.student_module, values.teacher_momentum)
        metrics = {
            **means,
            "lr": values.lr,
            "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum,
            "teacher_temp": values.teacher_temp,
            "grad_norm": clip.grad_norm,  # before clipping
            "grads_clipped": clip.clipped,
            **{name: float(value) for name, value in out.metrics.items()},
        }
        return metrics
