"""A timm ViT backbone with a DINO head, run over lists of crops of mixed sizes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import Tensor, nn

from raydino.models.head import DINOHead


def create_backbone(name: str, img_size: int, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model returning pooled ([CLS]) features.

    ``dynamic_img_size`` lets the same weights take global and local crops; extra
    keyword arguments (patch_size, embed_dim, depth, num_heads ...) override the
    timm architecture, which is how the tiny CPU models are made. Never downloads.
    """
    try:
        return timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"model.name={name!r} is not a timm model ({exc}); see timm.list_models('vit*')") from exc


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops; consecutive crops of one size share a batch.

    Returns the raw prototype scores of each crop and the prototype norms, both from
    inside forward so that DDP sees every use of the prototype gain.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: Sequence[Tensor], return_features: bool = False
    ) -> tuple[list[Tensor], Tensor] | tuple[list[Tensor], Tensor, list[Tensor]]:
        """Scores per crop and prototype norms; with ``return_features`` also the backbone
        features per crop (for a regulariser on them, e.g. KoLeo)."""
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        all_features = torch.cat(features)
        scores = self.head(all_features)
        if return_features:
            return list(scores.chunk(len(crops))), self.head.prototype_norms(), list(all_features.chunk(len(crops)))
        return list(scores.chunk(len(crops))), self.head.prototype_norms()


def build_student_teacher(
    backbone_name: str,
    img_size: int,
    backbone_kwargs: dict[str, Any],
    head_kwargs: dict[str, Any],
    drop_path_rate: float = 0.1,
) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student (with stochastic depth) and a teacher that starts as its exact copy.

    The teacher never receives gradients: it runs in eval mode (no drop path) and is
    updated only by ``ema_update``.
    """
    backbone = create_backbone(backbone_name, img_size, drop_path_rate, **backbone_kwargs)
    student = MultiCropNetwork(backbone, DINOHead(backbone.num_features, **head_kwargs))
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):  # timm DropPath
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher
