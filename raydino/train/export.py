"""Export the teacher backbone of a checkpoint as a timm-loadable safetensors file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from raydino.config import Config
from raydino.models import MultiCropNetwork
from raydino.step import build_models
from raydino.train.checkpoint import CONFIG_FILE, CheckpointError, TrainState, read_checkpoint

BACKBONE_PREFIX = "backbone."
# safetensors metadata of an export: the timm name and kwargs that rebuild it, and the image size
# (data.crops.global_size) its run evaluated at, which `raydino attention` preprocesses to
MODEL_KEY, TIMM_KWARGS_KEY, IMAGE_SIZE_KEY = "raydino_model", "raydino_timm_kwargs", "raydino_image_size"
BACKBONE_FILE = "teacher_backbone.safetensors"
"""The file name ``export_backbone`` writes into an output path that is a directory."""


class ExportError(ValueError):
    """The output path cannot be written; the message says why and what to do."""


def output_file(out_path: str | os.PathLike[str]) -> Path:
    """Where an export goes: ``out_path``, or ``out_path/teacher_backbone.safetensors`` for an existing
    directory; ExportError when the nearest existing ancestor is a file or is not writable."""
    out = Path(out_path)
    if out.is_dir():
        out = out / BACKBONE_FILE
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"cannot write {out}: {parent} is a file, not a directory; choose another output path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExportError(f"cannot write {out}: {parent} is not writable; choose a path in a writable directory")
            break
    return out


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
    """Write the teacher backbone's weights to ``out_path`` (.safetensors; into an existing directory
    as ``teacher_backbone.safetensors``), atomically: no temporary file is left behind, even on failure.

    Load with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=out_path),
    **kwargs)``; name and kwargs are stored in the file's metadata (``raydino_model``,
    ``raydino_timm_kwargs``) and printed by ``raydino export``; ``raydino_image_size`` is the evaluation size.
    """
    out = output_file(out_path)
    teacher, cfg, _ = load_teacher(checkpoint_dir)
    weights = {
        k.removeprefix(BACKBONE_PREFIX): v.detach().contiguous().cpu()
        for k, v in teacher.state_dict().items()
        if k.startswith(BACKBONE_PREFIX)
    }
    metadata = {MODEL_KEY: cfg.model.name, TIMM_KWARGS_KEY: json.dumps(timm_kwargs(cfg)),
                IMAGE_SIZE_KEY: str(cfg.data.crops.global_size)}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"cannot write {out} ({exc}); choose a path in a writable directory") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out


