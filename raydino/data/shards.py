"""Shard sets: many images per Parquet file, listed once in a manifest (``raydino.stores.shard_manifest``).

Why: a run over files lists the source on the driver and reads one object per image (millions of LIST,
HEAD and GET requests on an object store, hours before the first batch at 100M images). A shard set is
read as a few hundred Parquet files named in one manifest.

Writing (``write_shards``): the driver lists the source once, shuffles the listing with a fixed seed (so
every shard mixes classes) and cuts it into shards of about ``target_bytes``; each shard is one Ray task
that reads its files, checks each decodes exactly as training decodes it (undecodable files are skipped
and counted, as a run over the files would), and writes the encoded bytes untouched. Shard names carry
the listing digest: a re-run over the same source keeps the shards that exist and writes the rest; the
manifest comes last.

Reading (``shard_source``): the manifest records each shard's row groups, so a pass is planned on the driver
without a listing or a footer read: read units (runs of consecutive row groups of one shard, ~32 MB) in a
seeded order of the pass's own, each read with column projection in one request and its rows in a seeded
order of their own, then decoded in the same Ray Data task. Rows get the same ``key`` and ``label`` as the
files would, so crops are identical to training from the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from raydino.data.sources import (
    UNKNOWN_LABEL,
    ImageSource,
    SkippedImages,
    _SkipLog,
    _stable_key,
    decode_image,
    decode_rows,
    sample_listing,
)
from raydino.stores.locations import DataLocation, locate, read_file
from raydino.stores.shard_manifest import (
    ShardInfo,
    ShardManifest,
    ShardSetError,
    read_manifest,
    write_atomically,
    write_manifest,
)

DEFAULT_SHARD_MB = 256
ROW_GROUP_BYTES = 4 * 2**20
"""About 4 MB of images per row group (16 to 4,096 rows): the evaluation sample reads only the row groups that
hold the rows it keeps, and a shard's footer stays small (64-row groups of 1.5 KB images made 4 MB footers)."""
_LISTING_SEED = 0


class ShardWriteError(RuntimeError):
    """A shard failed after Ray's retries: the set stays unfinished (no manifest) and a re-run resumes it."""


@dataclass(frozen=True)
class SourceFile:
    relative: str
    size: int
    label: int
    class_name: str


def list_source(path: str) -> tuple[DataLocation, tuple[str, ...], bool, list[SourceFile]]:
    """(root, class names, labelled, files sorted by relative path), as training lists the folder: an
    ImageFolder (class directories, no image at the top) is labelled and holds the images under its class
    directories; any other directory of images is not (label -1) and holds every image under it."""
    root = locate(path)
    kind = root.kind()
    if kind != "dir":
        raise FileNotFoundError(f"source {root.uri!r} {'does not exist' if kind == 'missing' else 'is not a directory'}; "
                                "expected an ImageFolder (<path>/<class>/<images>) or a directory of images")
    prefix = root.path.rstrip("/") + "/"
    entries = [(p.removeprefix(prefix), size) for p, size in root.image_files_with_sizes()]
    classes = tuple(root.subdirectories())
    labelled = bool(classes) and not any("/" not in rel for rel, _ in entries)
    index = {name: i for i, name in enumerate(classes)}
    files = []
    for rel, size in entries:
        name = rel.split("/", 1)[0] if labelled else ""
        if labelled and name not in index:
            continue  # a hidden directory beside the classes: training does not read it either
        files.append(SourceFile(rel, size, index[name] if labelled else UNKNOWN_LABEL, name))
    if not files:
        raise FileNotFoundError(f"source {root.uri!r} holds no image files")
    return root, classes if labelled else (), labelled, files


def listing_digest(files: list[SourceFile], target_bytes: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{target_bytes}\n".encode())
    for f in files:
        h.update(f"{f.relative}\t{f.size}\n".encode())
    return h.hexdigest()


def plan_shards(files: list[SourceFile], target_bytes: int) -> list[list[SourceFile]]:
    """The listing in a fixed shuffled order (classes mixed in every shard), cut into consecutive shards of
    at least one file and at most ``target_bytes`` (a file larger than that is a shard of its own)."""
    order = np.random.default_rng(_LISTING_SEED).permutation(len(files))
    shards: list[list[SourceFile]] = [[]]
    size = 0
    for i in order:
        f = files[int(i)]
        if shards[-1] and size + f.size > target_bytes:
            shards.append([])
            size = 0
        shards[-1].append(f)
        size += f.size
    return shards


def shard_name(digest: str, index: int, count: int) -> str:
    return f"shard-{digest[:10]}-{index:05d}-of-{count:05d}.parquet"


_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class", pa.string()), ("path", pa.string()),
                     ("key", pa.int64())])


def _shard_table(root: DataLocation, files: list[SourceFile]) -> tuple[pa.Table, dict[str, str]]:
    images, kept, skipped = [], [], {}
    for f in files:
        data = read_file(f"{root.path.rstrip('/')}/{f.relative}", root.filesystem)  # OSError: Ray retries the task
        try:
            decode_image(data)  # what training does with it: a file it would skip is skipped here
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            skipped[f.relative] = f"{type(exc).__name__}: {exc}"
            continue
        images.append(data)
        kept.append(f)
    table = pa.table({
        "image": pa.array(images, pa.binary()), "label": pa.array([f.label for f in kept], pa.int64()),
        "class": pa.array([f.class_name for f in kept], pa.string()),
        "path": pa.array([f.relative for f in kept], pa.string()),
        "key": pa.array([_stable_key(f.relative) for f in kept], pa.int64()),
    }, schema=_SCHEMA)
    return table, skipped


@ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
def _write_shard(root: DataLocation, files: list[SourceFile], out: DataLocation) -> dict[str, Any]:
    """One shard, whole or not at all; what it holds and skipped (also in its footer, for a later re-run)."""
    table, skipped = _shard_table(root, files)
    table = table.replace_schema_metadata({"raydino.skipped": json.dumps(skipped)})
    buffer = io.BytesIO()
    average = max(1, (pc.sum(pc.binary_length(table.column("image"))).as_py() or 0) // max(table.num_rows, 1))
    pq.write_table(table, buffer, row_group_size=rows_per_group(average), compression="none")
    data = buffer.getvalue()
    write_atomically(out, data)
    return {"file": out.name, "images": table.num_rows, "bytes": len(data), "skipped": skipped,
            "row_groups": _row_groups(pq.read_metadata(pa.BufferReader(data)))}


def _row_groups(meta: pq.FileMetaData) -> list[int]:
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def rows_per_group(average_image_bytes: int) -> int:
    return int(min(4096, max(16, ROW_GROUP_BYTES // max(average_image_bytes, 1))))


def _finished(out: DataLocation) -> dict[str, Any] | None:
    """A shard a previous run finished (its footer reads back), as ``_write_shard`` returns it; else None."""
    fs = out.filesystem or pafs.LocalFileSystem()
    info = fs.get_file_info(out.path)
    if info.type != pafs.FileType.File:
        return None
    try:
        meta = pq.read_metadata(out.path, filesystem=fs)
    except (OSError, pa.ArrowInvalid):
        return None  # not a whole Parquet file: written again
    skipped = json.loads((meta.metadata or {}).get(b"raydino.skipped", b"{}"))
    return {"file": out.name, "images": meta.num_rows, "bytes": info.size, "skipped": skipped,
            "row_groups": _row_groups(meta)}


def write_shards(
    src: str, dst: str, target_mb: float = DEFAULT_SHARD_MB, log: Callable[[str], None] = print,
    progress_seconds: float = 10.0,
) -> ShardManifest:
    """Pack ``src`` (an ImageFolder or a directory of images, local or URI) into a shard set at ``dst``."""
    root, classes, labelled, files = list_source(src)
    target = int(target_mb * 2**20)
    digest = listing_digest(files, target)
    plan = plan_shards(files, target)
    out_root = locate(dst)
    try:
        _, existing = read_manifest(out_root)
    except ShardSetError:
        existing = None
    names = [shard_name(digest, i, len(plan)) for i in range(len(plan))]
    # every shard's footer is read back, even under a finished manifest: one lost or damaged since is written again
    done = {name: r for name in names if (r := _finished(out_root.child(name))) is not None}
    if existing is not None and existing.listing_digest == digest and len(done) == len(names):
        log(f"raydino shard: {out_root.uri} already holds this source's {existing.images:,} images in "
            f"{len(existing.shards)} shards; nothing to do")
        return existing
    log(f"raydino shard: {len(files):,} images from {root.uri} ({'labelled, ' + str(len(classes)) + ' classes' if labelled else 'unlabelled'}) "
        f"into {len(plan)} shards of about {target_mb:g} MB at {out_root.uri}"
        + (f"; {len(done)} finished by an earlier run are kept" if done else ""))
    pending = {_write_shard.remote(root, plan[i], out_root.child(name)): name for i, name in enumerate(names)
               if name not in done}
    started = last = time.monotonic()
    images = sum(r["images"] for r in done.values())
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress_seconds)
        for ref in ready:
            name = pending.pop(ref)
            try:
                done[name] = result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise ShardWriteError(
                    f"shard {name} could not be written ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}); "
                    f"{len(done)} finished shards are kept and no manifest was written: fix the cause and run "
                    "the same command again to write the rest"
                ) from None
            images += result["images"]
        now = time.monotonic()
        if now - last >= progress_seconds or not pending:
            last = now
            log(f"raydino shard: {len(done)}/{len(plan)} shards, {images:,} images "
                f"({images / max(now - started, 1e-9):.0f} images/s)")
    skipped = {rel: reason for name in names for rel, reason in done[name]["skipped"].items()}
    manifest = ShardManifest(
        source=root.uri, labelled=labelled, classes=classes,
        shards=tuple(ShardInfo(name, done[name]["images"], done[name]["bytes"], tuple(done[name]["row_groups"]))
                     for name in names),
        listing_digest=digest, target_shard_bytes=target, skipped=skipped,
    )
    write_manifest(out_root, manifest)  # last: its presence means every shard it names is whole
    log(f"raydino shard: done: {manifest.images:,} images in {len(names)} shards ({manifest.bytes / 2**20:,.1f} MB), "
        f"{len(skipped)} undecodable file(s) skipped; train with --data {out_root.uri}")
    return manifest


# --- reading -------------------------------------------------------------------------------


def _pass_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"shards:{seed}:{epoch}".encode(), digest_size=4).digest(), "little")


def _permute_block(seed: int, epoch: int) -> Callable[[pa.Table], pa.Table]:
    """The rows of each read unit in a seeded order of their own (the units' order is ``_pass_units``')."""

    def permute(table: pa.Table) -> pa.Table:
        if table.num_rows < 2:
            return table
        first = int(table.column("key")[0].as_py())
        rng = np.random.default_rng([_pass_seed(seed, epoch), first & 0xFFFFFFFF, (first >> 32) & 0xFFFFFFFF])
        return table.take(pa.array(rng.permutation(table.num_rows)))

    return permute


READ_UNIT_BYTES = 32 * 2**20
"""Encoded bytes read together (consecutive row groups of one shard): ~300 ImageNet JPEGs for about three
requests on an object store (the open's HEAD, the footer, the coalesced data), ~0.01 per image; a unit's
rows are what ``_permute_block`` reorders."""
MIN_READ_UNITS = 64
"""About this many units for a small set, so it still spreads over the CPUs (as its row groups allow)."""
DECODED_BLOCK_BYTES = 16 * 2**20
"""Ray Data's target block size while shards are read (decoded rows leave a task in blocks of this size)."""
READ_TASKS = 1024
"""At most this many read tasks per pass (each reads its units in turn): the pass's plan stays small on the
driver whatever the set's size."""


@dataclass(frozen=True)
class ReadUnit:
    shard: str
    """Path of the shard inside its filesystem."""
    first_group: int
    groups: int
    bytes: int
    """Estimated encoded bytes (the shard's bytes shared out by rows)."""


def plan_reads(location: DataLocation, manifest: ShardManifest, unit_bytes: int = READ_UNIT_BYTES,
               min_units: int = MIN_READ_UNITS) -> list[ReadUnit]:
    """Every row group of the set, once, in runs of consecutive groups of one shard of at least ``unit_bytes``
    (for a set under ``min_units`` such runs, of its bytes / ``min_units``: about ``min_units`` runs, as its
    row groups allow), planned from the manifest alone; a set written before the manifest recorded row
    groups has its footers read here instead."""
    target = max(1, min(unit_bytes, manifest.bytes // min_units))
    units = []
    for shard in manifest.shards:
        path = location.child(shard.file).path
        rows = shard.row_groups or tuple(
            _row_groups(pq.read_metadata(path, filesystem=location.filesystem or pafs.LocalFileSystem())))
        per_row = shard.bytes / max(shard.images, 1)
        first, size = 0, 0.0
        for g, n in enumerate(rows):
            size += n * per_row
            if size >= target or g == len(rows) - 1:
                units.append(ReadUnit(path, first, g + 1 - first, int(size)))
                first, size = g + 1, 0.0
    return units


def _pass_units(units: list[ReadUnit], seed: int, epoch: int) -> list[ReadUnit]:
    """Pass ``epoch``'s seeded order of the read units: across and within shards."""
    order = np.random.default_rng(_pass_seed(seed, epoch)).permutation(len(units))
    return [units[i] for i in order]


SHARD_READ_RETRIES = 3


class ShardReadError(OSError):
    """A shard whose store failed mid-run: Ray Data retries the read task (``SHARD_READ_RETRIES``) first."""


def read_unit(unit: ReadUnit, filesystem: Any) -> pa.Table:
    """The unit's rows (columns ``image, label, key, path``): one open of its shard, its footer, and its row
    groups read together (``pre_buffer`` coalesces them into one request on an object store)."""
    fs = filesystem or pafs.LocalFileSystem()
    try:
        with fs.open_input_file(unit.shard) as f:
            parquet = pq.ParquetFile(f, pre_buffer=True)
            return parquet.read_row_groups(range(unit.first_group, unit.first_group + unit.groups),
                                           columns=["image", "label", "key", "path"])
    except (OSError, pa.ArrowException) as exc:
        name = unit.shard.rstrip("/").rsplit("/", 1)[-1]
        reason = f"shard {name} could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        if isinstance(exc, OSError):  # retried by Ray first: the store may come back
            raise ShardReadError(f"{reason}; check that the store is reachable") from exc
        raise ShardSetError(f"{reason}: the shard is damaged; write the set again (raydino shard SRC DST "
                            "rewrites it)") from exc


def _read_and_decode(units: dict[str, np.ndarray], *, seed: int, epoch: int, filesystem: Any,
                     skip_log: Any) -> Iterator[dict[str, np.ndarray]]:
    """A read task: its units in turn, each in its own seeded row order, decoded ``DECODE_ROWS`` at a time."""
    permute = _permute_block(seed, epoch)
    for fields in zip(*(units[name] for name in _UNIT_FIELDS)):
        unit = ReadUnit(*(str(v) if name == "shard" else int(v) for name, v in zip(_UNIT_FIELDS, fields)))
        table = permute(read_unit(unit, filesystem))
        for start in range(0, table.num_rows, DECODE_ROWS):
            part = table.slice(start, DECODE_ROWS)
            yield decode_rows(zip(part.column("image").to_pylist(), part.column("path").to_pylist(),
                                  part.column("label").to_pylist(), part.column("key").to_pylist()), skip_log)


_UNIT_FIELDS = tuple(ReadUnit.__dataclass_fields__)
DECODE_ROWS = 64


def _retry_shard_reads(context: ray.data.DataContext) -> None:
    """Retry a map task that raised ``ShardReadError``, up to ``SHARD_READ_RETRIES`` times, on top of what the
    user's context already retries: ``True`` (every error) and a higher retry count are kept."""
    retried = context.retried_map_errors
    if retried is not True:
        patterns = list(retried or [])
        context.retried_map_errors = patterns if ShardReadError.__name__ in patterns else [*patterns, ShardReadError.__name__]
    context.max_map_retries = max(context.max_map_retries or 0, SHARD_READ_RETRIES)


def shard_source(path: str | DataLocation, seed: int = 0, max_files: int | None = None) -> ImageSource:
    """A shard set as an ImageSource. ``ImageSource.pass_dataset(e)`` reads pass ``e`` in its own seeded
    order; ``skipped`` counts the files skipped when the set was written plus any row that fails now.
    ``max_files`` is not supported for shards (sample with ``eval`` or write a smaller set).

    One Ray Data stage reads and decodes: the pass's read units (planned from the manifest, no listing and no
    footer read on the driver) become the blocks of ``from_items``, each task reads its units and decodes them.
    Ray Data's ``read_parquet`` first runs a listing task and a read stage before any decoding: the first
    batch from a million small images took 4.4 s with it, 1.1 s this way (``benchmarks/data_scale.py``)."""
    if max_files is not None:
        raise ShardSetError(f"{path}: data.max_files samples files of a folder; a shard set is read whole "
                            "(write a shard set of the sample instead)")
    location, manifest = read_manifest(path)
    units = plan_reads(location, manifest)
    # Ray Data flushes a task's output at its target block size (128 MB): ~40,000 small decoded images before
    # the first left a task (10 s to the first batch at 1M images). Blocks of DECODED_BLOCK_BYTES leave as
    # they are decoded; the crops' blocks are far larger per image.
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = min(context.target_max_block_size or DECODED_BLOCK_BYTES, DECODED_BLOCK_BYTES)
    skip_log = _SkipLog.remote()
    filesystem = location.filesystem

    def pass_dataset(epoch: int) -> ray.data.Dataset:
        items = [{name: getattr(u, name) for name in _UNIT_FIELDS} for u in _pass_units(units, seed, epoch)]
        blocks = ray.data.from_items(items, override_num_blocks=min(len(items), READ_TASKS))
        decoded = blocks.map_batches(
            _read_and_decode, batch_size=None, batch_format="numpy",
            fn_kwargs={"seed": seed, "epoch": epoch, "filesystem": filesystem, "skip_log": skip_log})
        # a store that failed mid-read: Ray Data runs the task again (with backoff), skipping what it yielded
        _retry_shard_reads(decoded.context)
        return decoded

    return ImageSource(pass_dataset(0), manifest.classes, SkippedImages(skip_log, dict(manifest.skipped)),
                       manifest.images, pass_dataset=pass_dataset)


def sample_shards(path: str, limit: int, seed: int) -> tuple[list[tuple[str, list[int], list[int]]], int, Any]:
    """A seeded, class-stratified sample of at most ``limit`` rows of a labelled shard set, chosen from the
    label columns alone: [(shard path, sorted row indices, their labels)], the number of classes and the
    filesystem. Only the ``label`` column of each shard is read here (column projection)."""
    location, manifest = read_manifest(path)
    if not manifest.labelled:
        raise ShardSetError(f"{location.uri}: an unlabelled shard set (written from a directory without class "
                            "folders) cannot be an evaluation set; use a labelled one or an ImageFolder")
    fs = location.filesystem or pafs.LocalFileSystem()
    groups: list[list[tuple[str, int]]] = [[] for _ in manifest.classes]
    for shard in manifest.shards:
        shard_path = location.child(shard.file).path
        labels = pq.read_table(shard_path, columns=["label"], filesystem=fs).column("label").to_numpy()
        for row, label in enumerate(labels):
            groups[int(label)].append((shard_path, row))
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for label, (shard_path, row) in sample_listing(groups, limit, seed):
        by_shard.setdefault(shard_path, []).append((row, label))
    picks = [(p, [r for r, _ in sorted(rows)], [lab for _, lab in sorted(rows)]) for p, rows in sorted(by_shard.items())]
    return picks, len(manifest.classes), location.filesystem


def read_rows(shard_path: str, rows: list[int], filesystem: Any) -> list[bytes]:
    """The encoded images of ``rows`` (sorted) of one shard, reading only the row groups that hold them."""
    fs = filesystem or pafs.LocalFileSystem()
    with fs.open_input_file(shard_path) as f:
        parquet = pq.ParquetFile(f)
        starts = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = sorted(set(group_of.tolist()))
        column = parquet.read_row_groups(groups, columns=["image"]).column("image")
    # where each group's rows begin in what was read (only ``groups``, in order)
    begins = dict(zip(groups, np.cumsum([0] + [int(starts[g + 1] - starts[g]) for g in groups[:-1]]).tolist()))
    return [column[begins[g] + r - int(starts[g])].as_py() for r, g in zip(rows, group_of.tolist())]
