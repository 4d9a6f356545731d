"""Export the teacher backbone of a checkpoint as a timm-loadable safetensors file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from raydino.config import Config
from raydino.models import MultiCropNetwork
from raydino.step import build_models
from raydino.train.checkpoint import CONFIG_FILE, CheckpointError, TrainState, read_checkpoint

BACKBONE_PREFIX = "backbone."


def load_checkpoint_config(checkpoint_dir: str | os.PathLike[str]) -> Config:
    import yaml

    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a raydino checkpoint (no {CONFIG_FILE})")
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a raydino config ({str(exc).splitlines()[0][:300]})") from None


def load_teacher(checkpoint_dir: str | os.PathLike[str]) -> tuple[MultiCropNetwork, Config, TrainState]:
    """The teacher network of a checkpoint (CPU, eval mode), its config and the whole state."""
    state = read_checkpoint(checkpoint_dir)
    cfg = load_checkpoint_config(checkpoint_dir)
    _, teacher = build_models(cfg)
    try:
        teacher.load_state_dict(state.teacher)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint_dir}: the teacher does not match its own config.yaml ({str(exc)[:400]})") from None
    return teacher.eval(), cfg, state


def timm_kwargs(cfg: Config) -> dict:
    """Keyword arguments for ``timm.create_model`` that rebuild the exported architecture."""
    return {"img_size": cfg.model.img_size, "dynamic_img_size": True, "num_classes": 0, **cfg.model.kwargs}


def export_backbone(checkpoint_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the teacher backbone's weights to ``out_path`` (.safetensors), atomically.

    Load with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=out_path),
    **kwargs)``; name and kwargs are stored in the file's metadata (``raydino_model``,
    ``raydino_timm_kwargs``) and printed by ``raydino export``.
    """
    teacher, cfg, _ = load_teacher(checkpoint_dir)
    weights = {
        k.removeprefix(BACKBONE_PREFIX): v.detach().contiguous().cpu()
        for k, v in teacher.state_dict().items()
        if k.startswith(BACKBONE_PREFIX)
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"raydino_model": cfg.model.name, "raydino_timm_kwargs": json.dumps(timm_kwargs(cfg))}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(weights, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


