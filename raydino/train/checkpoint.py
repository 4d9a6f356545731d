"""Checkpoint files: everything a run needs to continue exactly where it stopped.

Plain torch, no Ray: the training loop hands the directory to ``ray.train.report``.
Each file is written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, state: dict[str, Any], config_yaml: str) -> Path:
    """Write ``state.pt`` and ``config.yaml`` atomically into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / STATE_FILE) as f:
        torch.save(state, f)
    with atomic_file(directory / CONFIG_FILE) as f:
        f.write(config_yaml.encode())
    return directory


def read_checkpoint(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt``; a clear error if the directory is not a raydino checkpoint."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a raydino checkpoint (no {STATE_FILE}); pass a checkpoint_* directory of a run"
        )
    return torch.load(path, map_location=map_location, weights_only=False)
