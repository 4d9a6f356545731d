"""Making a real file or directory read-only for the test's user, root included."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` read-only while the block runs: its mode bits, and for root (whom they do not bind) the
    immutable attribute (``chattr +i``); skips the test where neither works."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if os.access(path, os.W_OK):
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True, check=False).returncode != 0:
                pytest.skip("cannot make a path read-only for this user (root without chattr +i)")
            immutable = True
        yield path
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr") or "chattr", "-i", str(path)], check=True)
        path.chmod(mode)
