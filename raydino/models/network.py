"""A timm ViT backbone with a DINO head, run over lists of crops of mixed sizes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn

from raydino.models.head import DINOHead


def create_backbone(name: str, img_size: int, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model returning pooled ([CLS]) features.

    ``dynamic_img_size`` lets the same ViT weights take global and local crops; extra
    keyword arguments (patch_size, embed_dim, depth, num_heads ...) override the
    timm architecture, which is how the tiny CPU models are made. A convolutional model
    (which takes any image size and has no such arguments) is built without the two
    ViT arguments; iBOT and attention maps need a ViT. Never downloads.
    """
    vit_args = {"img_size": img_size, "dynamic_img_size": True}
    try:
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **vit_args, **kwargs
            )
        except TypeError as exc:
            if not any(f"'{arg}'" in str(exc) for arg in vit_args):
                raise
            return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"model.name={name!r} is not a timm model ({exc}); see timm.list_models('vit*')") from exc


@dataclass
class NetworkOutput:
    """Raw prototype scores per crop and the prototype norms, plus what iBOT and KoLeo ask for."""

    scores: list[Tensor]
    """[CLS] scores w . y per crop, (B, K) each."""
    norms: Tensor
    """||w_k||, (K,): the vMF precisions times tau."""
    features: list[Tensor] | None = None
    """Backbone [CLS] features per crop (``return_features``)."""
    patch_scores: list[Tensor] | None = None
    """Patch-token scores per global crop, (B, N, K') each (``return_patches``)."""
    patch_norms: Tensor | None = None
    """Norms of the prototypes the patch scores use (the [CLS] ones when shared)."""


def forward_tokens(
    backbone: nn.Module, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A timm ViT's pooled [CLS] features and its patch tokens; ``mask`` (B, h, w) bool replaces
    the masked patch embeddings by ``mask_token`` before the position embedding (iBOT).

    The same steps as timm's ``forward_features`` / ``forward_head(pre_logits=True)``, opened
    up to put the mask in; without a mask the features equal ``backbone(images)``.
    """
    x = backbone.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, h * w, D)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs the mask token")
        grid_mask = mask if x.ndim == 4 else mask.flatten(1)
        if grid_mask.shape != x.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[1:-1])}")
        x = torch.where(grid_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    x = backbone.blocks(x)
    x = backbone.norm(x)
    return backbone.forward_head(x, pre_logits=True), x[:, backbone.num_prefix_tokens :]


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops; consecutive crops of one size share a batch.

    Returns raw prototype scores and prototype norms from inside ``forward`` so that DDP
    sees every use of the prototype gain. With ``masked=True`` (iBOT) it owns a learned mask
    token and can return patch-token scores of the global crops, masked or not.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, masked: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # only iBOT has one: under DDP every parameter must get a gradient each step
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.num_features)) if masked else None

    def patch_grid(self, size: int) -> tuple[int, int]:
        """The patch grid (h, w) of a square crop of ``size`` pixels."""
        ph, pw = self.backbone.patch_embed.patch_size
        return size // ph, size // pw

    def forward(
        self,
        crops: Sequence[Tensor],
        masks: Sequence[Tensor] | None = None,
        return_features: bool = False,
        return_patches: bool = False,
    ) -> NetworkOutput:
        """Scores per crop and prototype norms. ``masks``: one (B, h, w) bool mask per leading
        (global) crop; ``return_patches``: also the patch scores of those leading crops
        (of all crops of the first size when no masks are given)."""
        if masks is not None and self.mask_token is None:
            raise ValueError("this network has no mask token: build it with masked=True (loss.method=ibot)")
        features: list[Tensor] = []
        patch_tokens: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batch = torch.cat(list(crops[start:end]))
            group_masks = masks[start:end] if masks is not None and start < len(masks) else None
            if group_masks is not None and len(group_masks) != end - start:
                raise ValueError("masks must cover whole groups of same-size crops (the global crops)")
            if group_masks is not None or (return_patches and start == 0):
                mask = torch.cat(list(group_masks)) if group_masks is not None else None
                cls, patches = forward_tokens(self.backbone, batch, mask, self.mask_token)
                features.append(cls)
                patch_tokens.append(patches)
            else:
                features.append(self.backbone(batch))
            start = end
        all_features = torch.cat(features)
        out = NetworkOutput(list(self.head(all_features).chunk(len(crops))), self.head.prototype_norms())
        if return_features:
            out.features = list(all_features.chunk(len(crops)))
        if return_patches:
            n_global = len(masks) if masks is not None else len(patch_tokens[0]) // len(crops[0])
            patch_scores = self.head.patch_scores(torch.cat(patch_tokens))
            out.patch_scores = list(patch_scores.chunk(n_global))
            out.patch_norms = self.head.patch_prototype_norms()
        return out


def build_student_teacher(
    backbone_name: str,
    img_size: int,
    backbone_kwargs: dict[str, Any],
    head_kwargs: dict[str, Any],
    drop_path_rate: float = 0.1,
    masked: bool = False,
) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student (with stochastic depth) and a teacher that starts as its exact copy.

    The teacher never receives gradients: it runs in eval mode (no drop path) and is
    updated only by ``ema_update``.
    """
    backbone = create_backbone(backbone_name, img_size, drop_path_rate, **backbone_kwargs)
    student = MultiCropNetwork(backbone, DINOHead(backbone.num_features, **head_kwargs), masked=masked)
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):  # timm DropPath
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher
