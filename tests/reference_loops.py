"""DINO's and iBOT's training steps, transcribed from their ``train_one_epoch`` for the wiring test.

Torch only, one process (``dist.all_reduce`` over one process is the identity, so the center
updates divide by the local batch). Followed line by line: the schedules
(``utils.cosine_scheduler``), the parameter groups (``utils.get_params_groups``), which crops
reach the teacher, the loss and its center update, clipping (``utils.clip_gradients``),
``utils.cancel_gradients_last_layer``, the optimiser step and the EMA of the teacher. The
networks are passed in (raydino's, on the same weights): the test is about the wiring
around them. Sources: github.com/facebookresearch/dino (main_dino.py, utils.py) and
github.com/bytedance/ibot (main_ibot.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import dino_clip_gradients


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """DINO's ``utils.cosine_scheduler``, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)

    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))

    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model):
    """DINO's ``utils.get_params_groups``, verbatim."""
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """DINO's ``utils.cancel_gradients_last_layer``, verbatim."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class DINOLoss(nn.Module):
    """DINO's ``main_dino.DINOLoss`` on one process."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # we apply a warm up for the teacher temperature because
        # a too high temperature makes the training instable at the beginning
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp,
                        teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))

    def forward(self, student_output, teacher_output, epoch):
        """
        Cross-entropy between softmax outputs of the teacher and student networks.
        """
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    # we skip cases where student and teacher operate on the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """
        Update center used for teacher output.
        """
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)  # all_reduce and world size 1

        # ema update
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class iBOTLoss(nn.Module):
    """iBOT's ``main_ibot.iBOTLoss`` on one process (its defaults: mim_start_epoch 0, lambda3 0)."""

    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, warmup_teacher_temp,
                 teacher_temp, warmup_teacher_temp2, teacher_temp2,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9, center_momentum2=0.9,
                 lambda1=1.0, lambda2=1.0):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.lambda1 = lambda1
        self.lambda2 = lambda2

        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp,
                        teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))
        self.teacher_temp2_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp2,
                        teacher_temp2, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp2
        ))

    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch):
        """
        Cross-entropy between softmax outputs of the teacher and student networks.
        """
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output

        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])

        # [CLS] and patch for global patches
        student_cls = student_cls / self.student_temp
        student_cls_c = student_cls.chunk(self.ncrops)
        student_patch = student_patch / self.student_temp
        student_patch_c = student_patch.chunk(self.ngcrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        temp2 = self.teacher_temp2_schedule[epoch]
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1)
        teacher_cls_c = teacher_cls_c.detach().chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2, dim=-1)
        teacher_patch_c = teacher_patch_c.detach().chunk(self.ngcrops)

        total_loss1, n_loss_terms1 = 0, 0
        total_loss2, n_loss_terms2 = 0, 0
        for q in range(len(teacher_cls_c)):
            for v in range(len(student_cls_c)):
                if v == q:
                    loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                    mask = student_mask[v].flatten(-2, -1)
                    loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                    total_loss2 += loss2.mean()
                    n_loss_terms2 += 1
                else:
                    loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                    total_loss1 += loss1.mean()
                    n_loss_terms1 += 1

        total_loss1 = total_loss1 / n_loss_terms1 * self.lambda1
        total_loss2 = total_loss2 / n_loss_terms2 * self.lambda2
        total_loss = dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)  # noqa: C408 - verbatim
        self.update_center(teacher_cls, teacher_patch)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        """
        Update center used for teacher output.
        """
        cls_center = torch.sum(teacher_cls, dim=0, keepdim=True)
        cls_center = cls_center / len(teacher_cls)  # all_reduce and world size 1
        self.center = self.center * self.center_momentum + cls_center * (1 - self.center_momentum)

        patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True)
        patch_center = patch_center / len(teacher_patch)
        self.center2 = self.center2 * self.center_momentum2 + patch_center * (1 - self.center_momentum2)


def _ema(student, teacher, m):
    """The teacher update of both loops (DINO's zip over parameters; iBOT's over common names)."""
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def dino_train_step(student, teacher, dino_loss, optimizer, images, it, epoch, schedules, clip_grad,
                    freeze_last_layer):
    """One iteration of DINO's ``train_one_epoch`` (fp32, no fp16 scaler); returns the loss."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    # update weight decay and learning rate according to their schedule
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr_schedule[it]
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = wd_schedule[it]

    # teacher and student forward passes + compute dino loss
    teacher_output = torch.cat(teacher(images[:2]).scores)  # only the 2 global views pass through the teacher
    student_output = torch.cat(student(images).scores)
    loss = dino_loss(student_output, teacher_output, epoch)

    # student update
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        dino_clip_gradients(student, clip_grad)
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()

    # EMA update for the teacher
    _ema(student, teacher, momentum_schedule[it])
    return loss.item()


def ibot_train_step(student, teacher, ibot_loss, optimizer, images, masks, it, epoch, schedules, clip_grad,
                    freeze_last_layer, global_crops_number=2):
    """One iteration of iBOT's ``train_one_epoch`` (fp32); returns the loss parts."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr_schedule[it]
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = wd_schedule[it]

    # get global views
    t = teacher(images[:global_crops_number], return_patches=True)
    teacher_output = (torch.cat(t.scores), torch.cat(t.patch_scores))
    # the student's global views (masked) and its local views in one call of raydino's network
    s = student(images, masks=masks[:global_crops_number], return_patches=True)
    student_output = (torch.cat(s.scores[:global_crops_number]), torch.cat(s.patch_scores))
    student_local_cls = torch.cat(s.scores[global_crops_number:]) if len(images) > global_crops_number else None
    all_loss = ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch)
    loss = all_loss.pop('loss')

    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        dino_clip_gradients(student, clip_grad)
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()

    _ema(student, teacher, momentum_schedule[it])
    return {"loss": loss.item(), "cls": all_loss["cls"].item(), "patch": all_loss["patch"].item()}
