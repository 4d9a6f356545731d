"""Where runs keep their checkpoints: a local directory or a remote URI (``s3://``, ``gs://`` ...).

Ray Train writes to either through pyarrow; a remote URI must stay a URI (``Path`` would
turn ``s3://bucket/x`` into ``s3:/bucket/x`` relative to the working directory). Both are checked
writable before anything starts (``raydino.stores.objectstore``: AWS_ENDPOINT_URL and the AWS_* variables).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from raydino.stores.objectstore import check_writable, filesystem_of, is_uri

if TYPE_CHECKING:
    import pyarrow.fs

DEFAULT_STORAGE = "raydino_runs"


class StorageError(ValueError):
    """The storage path cannot be used; the message says which and what to do."""


def is_remote(path: str) -> bool:
    """``scheme://...`` other than ``file://``."""
    return is_uri(path)


def resolve_storage(path: str | os.PathLike[str] | None) -> str:
    """An absolute local directory (created and checked writable) or a remote URI (checked writable
    with one small object, raising ObjectStoreError), unchanged.

    Absolute, because Ray Tune runs each trial in its own working directory.
    """
    text = str(path) if path is not None else DEFAULT_STORAGE
    if is_remote(text):
        check_writable(text.rstrip("/"))
        return text.rstrip("/")
    local = Path(text.removeprefix("file://")).expanduser().resolve()
    try:
        local.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".raydino-write-check-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"checkpoint storage {str(local)!r} is not writable ({exc.strerror or exc}); set "
            "checkpoint.storage_path (or --storage) to a writable directory or an s3:// URI"
        ) from None
    return str(local)


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a local directory or a URI alike."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def ray_storage(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's and Tune's RunConfig: a remote URI as its
    filesystem resolved here, on the driver, with the endpoint in it (AWS_ENDPOINT_URL), so Ray's
    controller and workers need no endpoint setting of their own; a local directory as itself."""
    if not is_remote(storage):
        return storage, None
    filesystem, path = filesystem_of(storage)
    return path, filesystem
