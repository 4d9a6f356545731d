"""Where a dataset lives: a local directory or a URI of any pyarrow filesystem (``s3://``, ``gs://`` ...).

Listing happens on the driver, here; reading happens in Ray tasks, which get ``filesystem`` (None for
the local disk, where Ray's default and ``open`` do). See ``raydino.stores.objectstore`` for how an
S3-compatible endpoint and credentials are found. No Ray here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raydino.stores.objectstore import file_info, filesystem_of, is_uri, list_entries

# torchvision's ImageFolder extensions (matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "ppm", "pgm", "bmp", "tif", "tiff", "webp")


def is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


@dataclass(frozen=True)
class DataLocation:
    """A directory to list and read: ``path`` inside ``filesystem`` (None: the local disk)."""

    uri: str
    """As the user would write it: an absolute local path, or the URI (for messages and configs)."""
    path: str
    filesystem: pafs.FileSystem | None = None

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> DataLocation:
        return DataLocation(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.filesystem)

    def sibling(self, name: str) -> DataLocation:
        """``<parent>/<name>``: ImageNet's ``val`` beside its ``train``."""
        return DataLocation(
            f"{self.uri.rstrip('/').rsplit('/', 1)[0]}/{name}", f"{self.path.rstrip('/').rsplit('/', 1)[0]}/{name}",
            self.filesystem,
        )

    def kind(self) -> str:
        """"dir", "file" or "missing" (an object store has a directory where objects share the prefix)."""
        if not self.remote:
            local = Path(self.path)
            return "dir" if local.is_dir() else "file" if local.exists() else "missing"
        info = file_info(self.filesystem, self.path, self.uri)
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(info.type, "missing")

    def size(self) -> int | None:
        """The file's size in bytes; None if it is not a file."""
        if not self.remote:
            local = Path(self.path)
            return local.stat().st_size if local.is_file() else None
        info = file_info(self.filesystem, self.path, self.uri)
        return info.size if info.type == pafs.FileType.File else None

    def subdirectories(self) -> list[str]:
        """Sorted names of the directories directly under this one, hidden ones excluded."""
        if not self.remote:
            return sorted(e.name for e in os.scandir(self.path) if e.is_dir() and not e.name.startswith("."))
        entries = list_entries(self.filesystem, self.path, self.uri, recursive=False)
        names = (e.base_name for e in entries if e.type == pafs.FileType.Directory)
        return sorted(n for n in names if not n.startswith("."))

    def image_files(self) -> Iterator[str]:
        """Paths (inside the filesystem) of the image files under this directory, sorted, recursively;
        lazy on a local disk, so an existence check stops at the first one."""
        for path, _ in self._images(sizes=False):
            yield path

    def image_files_with_sizes(self) -> Iterator[tuple[str, int]]:
        """``image_files`` with each file's size in bytes (a stat per file on a local disk; an object store's
        listing has them)."""
        for path, size in self._images(sizes=True):
            assert size is not None
            yield path, size

    def _images(self, sizes: bool) -> Iterator[tuple[str, int | None]]:
        if not self.remote:
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames.sort()
                for name in sorted(filenames):
                    if is_image(name):
                        path = os.path.join(dirpath, name)
                        yield path, os.stat(path).st_size if sizes else None
            return
        for entry in list_entries(self.filesystem, self.path, self.uri, recursive=True):
            if entry.type == pafs.FileType.File and is_image(entry.base_name):
                yield entry.path, entry.size

    def has_image(self) -> bool:
        """Whether an image file lies under this directory (recursively): a local walk stops at the first;
        an object store's own level is looked at before it is listed recursively."""
        if self.remote:
            entries = list_entries(self.filesystem, self.path, self.uri, recursive=False)
            if any(e.type == pafs.FileType.File and is_image(e.base_name) for e in entries):
                return True
        return next(self.image_files(), None) is not None


def locate(path: str | os.PathLike[str]) -> DataLocation:
    """The location of a local directory (made absolute) or a URI (its filesystem resolved)."""
    text = str(path)
    if is_uri(text):
        fs, inner = filesystem_of(text)
        return DataLocation(text.rstrip("/"), inner, fs)
    local = str(Path(text.removeprefix("file://")).expanduser().resolve())
    return DataLocation(local, local)


def read_file(path: str, filesystem: pafs.FileSystem | None) -> bytes:
    """The bytes of one file, from the local disk or through ``filesystem`` (in a Ray task)."""
    if filesystem is None:
        with open(path, "rb") as f:
            return f.read()
    with filesystem.open_input_stream(path) as f:
        return f.read()
