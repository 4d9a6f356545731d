"""Checkpoint files: everything a run needs to continue exactly where it stopped.

Plain torch, no Ray: the training loop hands the directory to ``ray.train.report``.
Each file is written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint that looks complete. Files are read back with
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects, so opening a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from raydino.launch.plan import CHECKPOINT_MANIFEST

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "raydino-checkpoint/2"


class CheckpointError(ValueError):
    """A file or directory that is not a readable raydino checkpoint."""


@dataclass
class TrainState:
    """A run's progress and every state it resumes from (the step's ``state_dict`` plus bookkeeping)."""

    student: dict[str, Any]
    teacher: dict[str, Any]
    optimizer: dict[str, Any]
    loss: dict[str, Any]
    step: int
    epoch: int
    batch_in_epoch: int
    steps_per_epoch: int
    rng: list[dict[str, Any]] = field(default_factory=list)
    """One RNG state per worker rank."""
    latest_eval: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    """Steps skipped for a non-finite loss so far (``optim.nonfinite_loss=skip``)."""

    def models(self) -> dict[str, Any]:
        """The part ``DINOStep.load_state_dict`` takes."""
        return {"student": self.student, "teacher": self.teacher, "optimizer": self.optimizer, "loss": self.loss}

    def position(self, steps_per_epoch: int) -> tuple[int, int, int]:
        """(step, epoch, batch in epoch) for a run with ``steps_per_epoch``: a run resumed with another
        worker count or batch size keeps the same fraction of its epoch, so the schedules continue."""
        if steps_per_epoch == self.steps_per_epoch:
            return self.step, self.epoch, self.batch_in_epoch
        batch = min(round(self.batch_in_epoch * steps_per_epoch / self.steps_per_epoch), steps_per_epoch - 1)
        return self.epoch * steps_per_epoch + batch, self.epoch, batch

    def rng_for(self, rank: int) -> dict[str, Any] | None:
        if not self.rng:
            return None
        return self.rng[rank] if rank < len(self.rng) else self.rng[0]


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once fully written and synced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, state: TrainState, config_yaml: str) -> Path:
    """Write ``state.pt`` and ``config.yaml`` atomically into ``directory``, then ``manifest.json`` with their
    sizes: in storage, a checkpoint is complete only when every file it lists is there at its full size
    (``raydino.launch.plan.checkpoint_complete``)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **{f.name: getattr(state, f.name) for f in fields(state)}}
    with atomic_file(directory / STATE_FILE) as f:
        torch.save(payload, f)
    with atomic_file(directory / CONFIG_FILE) as f:
        f.write(config_yaml.encode())
    sizes = {name: (directory / name).stat().st_size for name in (STATE_FILE, CONFIG_FILE)}
    with atomic_file(directory / CHECKPOINT_MANIFEST) as f:
        f.write(json.dumps({"files": sizes}).encode())
    return directory


def read_checkpoint(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> TrainState:
    """Load ``state.pt`` of a checkpoint directory, tensors and plain values only.

    A clear ``CheckpointError`` for a directory without one, a file that is not a torch
    checkpoint, one holding anything but tensors and plain containers, or one of another format.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a raydino checkpoint (no {STATE_FILE}); pass a checkpoint_* directory of a run"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is not a raydino checkpoint, or was written by an older raydino: it does not load as tensors "
            f"and plain values ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a raydino checkpoint of format {FORMAT} (found {found!r})")
    names = {f.name for f in fields(TrainState)}
    missing = sorted(n for n in names if n not in payload and n not in ("rng", "latest_eval", "nonfinite_skipped"))
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a complete raydino checkpoint")
    return TrainState(**{k: v for k, v in payload.items() if k in names})
