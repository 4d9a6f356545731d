"""The manifest of a shard set (``raydino shard``): what training reads instead of listing millions of files.

A shard set is a directory (local or any pyarrow URI) of Parquet files, each holding many images as their
encoded bytes, plus ``manifest.json``. The manifest is written last and atomically: a directory without one
is an unfinished set, never read as a finished one. It names every shard with its image count and size,
the class names, the images skipped as undecodable when the set was written, and a digest of the source
listing (a re-run over a changed source writes a new set of names instead of mixing the two). No Ray here.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raydino.stores.locations import DataLocation, locate
from raydino.stores.objectstore import explain, list_entries

MANIFEST_FILE = "manifest.json"
FORMAT = "raydino-shards"
VERSION = 1
COLUMNS = ("image", "label", "class", "path", "key")
"""Each shard's columns: encoded bytes as in the source file (never re-encoded), the class index (-1:
unlabelled), the class name, the path relative to the source root, and the row key crops are seeded from
(``raydino.data.sources``: the same key the file itself gets)."""


class ShardSetError(ValueError):
    """A shard set that cannot be read: no manifest, another format, or a manifest that does not parse."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    """Name inside the shard set's directory."""
    images: int
    bytes: int
    row_groups: tuple[int, ...] = ()
    """Rows of each Parquet row group, in order: readers plan their reads from the manifest alone (no footer
    read per shard before the first batch). Empty in sets written before it was recorded."""


@dataclass(frozen=True)
class ShardManifest:
    source: str
    """The directory the images came from, as the user named it."""
    labelled: bool
    classes: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    listing_digest: str
    """blake2b of the sorted source listing (relative path and size of every image file) and the target size."""
    target_shard_bytes: int
    skipped: dict[str, str] = field(default_factory=dict)
    """Relative path -> reason, for every source file that did not decode (as training skips it)."""
    created: str = ""

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, **asdict(self), "images": self.images,
                               "bytes": self.bytes}
        doc["classes"], doc["shards"] = list(self.classes), [asdict(s) for s in self.shards]
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardManifest:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ShardSetError(f"{where}: not a {FORMAT} manifest of version {VERSION} "
                                    f"(format {doc.get('format')!r}, version {doc.get('version')!r})")
            return cls(
                source=doc["source"], labelled=bool(doc["labelled"]), classes=tuple(doc["classes"]),
                shards=tuple(ShardInfo(s["file"], int(s["images"]), int(s["bytes"]),
                                       tuple(int(n) for n in s.get("row_groups", ()))) for s in doc["shards"]),
                listing_digest=doc["listing_digest"], target_shard_bytes=int(doc["target_shard_bytes"]),
                skipped=dict(doc.get("skipped", {})), created=doc.get("created", ""),
            )
        except ShardSetError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardSetError(f"{where}: a damaged manifest ({type(exc).__name__}: {exc}); write the shard set "
                                "again with raydino shard") from None


def is_shard_set(path: str) -> bool:
    """Whether ``path`` is a directory holding a shard manifest (one HEAD on an object store)."""
    location = locate(path)
    return _manifest(location).kind() == "file"


def _manifest(location: DataLocation) -> DataLocation:
    return location.child(MANIFEST_FILE)


def read_manifest(path: str | DataLocation) -> tuple[DataLocation, ShardManifest]:
    """The shard set's location and manifest; ShardSetError names a missing or unreadable one."""
    location = path if isinstance(path, DataLocation) else locate(path)
    manifest = _manifest(location)
    if manifest.kind() != "file":
        raise ShardSetError(
            f"{location.uri}: no {MANIFEST_FILE}, so not a finished shard set (a `raydino shard` that did not "
            "finish leaves none); run `raydino shard SRC " + location.uri + "` (again: it keeps finished shards)"
        )
    try:
        text = read_text(manifest)
    except OSError as exc:
        raise explain(manifest.uri, exc) from None
    return location, ShardManifest.from_json(text, manifest.uri)


def read_text(location: DataLocation) -> str:
    if location.filesystem is None:
        with open(location.path, encoding="utf-8") as f:
            return f.read()
    with location.filesystem.open_input_stream(location.path) as f:
        return f.read().decode()


def write_atomically(location: DataLocation, data: bytes) -> None:
    """Whole or not at all: a local file is written under a temporary name and renamed; an object store's
    object appears only when its upload completes."""
    fs = location.filesystem or pafs.LocalFileSystem()
    parent = location.path.rstrip("/").rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if location.filesystem is not None:
        with fs.open_output_stream(location.path) as out:
            out.write(data)
        return
    temporary = f"{parent}/.{location.name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(temporary) as out:
            out.write(data)
        fs.move(temporary, location.path)
    finally:
        if fs.get_file_info(temporary).type != pafs.FileType.NotFound:
            fs.delete_file(temporary)


def write_manifest(location: DataLocation, manifest: ShardManifest) -> None:
    stamped = ShardManifest(**{**manifest.__dict__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_atomically(_manifest(location), stamped.to_json().encode())


def check_shards(location: DataLocation, manifest: ShardManifest) -> None:
    """Every shard the manifest names is there at its recorded size (one listing of the directory, not a
    request per shard); ShardSetError names the first that is missing or was changed since it was written."""
    if location.filesystem is None:
        sizes = {e.name: e.stat().st_size for e in os.scandir(location.path) if e.is_file()}
    else:
        entries = list_entries(location.filesystem, location.path, location.uri, recursive=False)
        sizes = {e.base_name: e.size for e in entries if e.type == pafs.FileType.File}
    for shard in manifest.shards:
        size = sizes.get(shard.file)
        if size is None:
            raise ShardSetError(f"{location.uri}: shard {shard.file} named in {MANIFEST_FILE} is missing; write the "
                                "set again (raydino shard SRC DST rewrites what is missing)")
        if size != shard.bytes:
            raise ShardSetError(f"{location.uri}: shard {shard.file} is {size:,} bytes, {MANIFEST_FILE} says "
                                f"{shard.bytes:,}: it changed after the set was written; write the set again")

