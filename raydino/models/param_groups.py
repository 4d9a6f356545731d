"""Optimizer parameter groups: weight decay on matrices only, last layer separate.

Groups carry two flags that the schedules read each step: ``apply_weight_decay``
and ``is_last_layer`` (whose learning rate is 0 while the last layer is frozen). While
frozen the step also drops the last layer's gradients, as DINO's
``cancel_gradients_last_layer`` does, so AdamW keeps no moments for the prototypes until
they train (with lr 0 alone the moments and the step count would run on).
"""

from __future__ import annotations

from typing import Any

from torch import nn

LAST_LAYER_PREFIX = "head.last_layer."
PATCH_LAST_LAYER_PREFIX = "head.patch_last_layer."  # iBOT's separate patch prototypes, frozen alike
PROTOTYPE_GAIN_SUFFIX = "parametrizations.weight.original0"


def is_last_layer(name: str) -> bool:
    """The prototypes ([CLS] and iBOT's separate patch ones): what ``freeze_last_layer`` freezes."""
    return name.startswith((LAST_LAYER_PREFIX, PATCH_LAST_LAYER_PREFIX))


def layer_id(name: str, num_blocks: int) -> int:
    """BEiT's, iBOT's and DINOv2's layer numbering of a ViT parameter: the embeddings (patch, [CLS],
    position, register tokens) 0, block i i + 1, everything after the blocks (norm, head) num_blocks + 1."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if parts[0] == "backbone" and parts[1] in ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token"):
        return 0
    return num_blocks + 1


def param_groups(
    model: nn.Module, decay_prototype_norms: bool = True, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Split trainable parameters of the (unwrapped) student into groups.

    No weight decay on biases and 1-D parameters. The prototype gains g (K, 1) are
    decayed only if ``decay_prototype_norms`` (DINO's code decays them), because
    decay pulls the vMF precisions kappa_k = g_k / tau toward zero. ``layer_decay`` < 1
    scales the lr of layer l by ``layer_decay ** (L + 1 - l)`` (``lr_scale``; ``layer_id``):
    the embeddings learn slowest, the head at the full rate.
    """
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    num_blocks = len(blocks) if blocks is not None else 0
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_gain = name.endswith(PROTOTYPE_GAIN_SUFFIX)
        decay = decay_prototype_norms if is_gain else not (name.endswith(".bias") or param.ndim <= 1)
        last = is_last_layer(name)
        scale = layer_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
        groups.setdefault((decay, last, scale), []).append(param)
    return [
        {"params": params, "apply_weight_decay": decay, "is_last_layer": last, "lr_scale": scale}
        for (decay, last, scale), params in sorted(groups.items())
    ]
