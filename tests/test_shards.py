"""Shard sets (``raydino shard``): written on Ray, whole or not at all, resumable, and read back as exactly
the rows, labels, skipped files and crops that training from the files gets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from raydino.config import load_config
from raydino.data.pipeline import EPOCH_COLUMN, MultiCropStage, epoch_stream
from raydino.data.shards import (
    MIN_READ_UNITS,
    SourceFile,
    _pass_seed,
    _permute_block,
    list_source,
    listing_digest,
    plan_reads,
    plan_shards,
    read_rows,
    sample_shards,
    shard_name,
    shard_source,
    write_shards,
)
from raydino.data.sources import imagefolder_dataset
from raydino.stores.shard_manifest import MANIFEST_FILE, ShardInfo, ShardManifest, ShardSetError, read_manifest
from tests.images import small_imagefolder

SMALL_MB = 0.05  # ~50 KB: the 79 PNGs of the small folder (~1.8 KB each) make 3 shards


def _by_key(rows: list[dict]) -> dict[int, dict]:
    return {int(r["key"]): r for r in rows}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return small_imagefolder(tmp_path_factory.mktemp("shards") / "folder")


@pytest.fixture(scope="module")
def shards(ray_session, folder) -> Path:
    out = folder.parent / "set"
    write_shards(str(folder), str(out), SMALL_MB, log=lambda _: None)
    return out


def test_the_plan_mixes_classes_keeps_every_file_once_and_respects_the_size(folder):
    _, classes, labelled, files = list_source(str(folder))
    assert labelled and classes == ("class0", "class1") and len(files) == 80
    plan = plan_shards(files, 20_000)
    assert sorted(f.relative for shard in plan for f in shard) == sorted(f.relative for f in files)
    assert all(sum(f.size for f in shard) <= 20_000 for shard in plan) and len(plan) > 2
    assert all(len({f.label for f in shard}) == 2 for shard in plan)  # shuffled: no shard of one class
    assert plan == plan_shards(files, 20_000)  # the same listing, the same shards (a re-run keeps them)
    huge = [SourceFile("a.jpg", 50, -1, ""), SourceFile("b.jpg", 10, -1, "")]
    assert sorted(len(s) for s in plan_shards(huge, 20)) == [1, 1]  # a file above the target: a shard of its own
    changed = [*files[:-1], SourceFile(files[-1].relative, files[-1].size + 1, files[-1].label, files[-1].class_name)]
    assert listing_digest(changed, 20_000) != listing_digest(files, 20_000) != listing_digest(files, 30_000)


def test_an_unlabelled_directory_is_packed_with_label_minus_one(ray_session, tmp_path):
    for i in range(3):
        small = tmp_path / "raw" / ("a" if i else "b") / f"{i}.png"
        small.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(small)
    (tmp_path / "raw" / "top.png").write_bytes((tmp_path / "raw" / "b" / "0.png").read_bytes())  # an image at the top
    manifest = write_shards(str(tmp_path / "raw"), str(tmp_path / "set"), log=lambda _: None)
    assert not manifest.labelled and manifest.classes == () and manifest.images == 4
    labels = pq.read_table(tmp_path / "set" / manifest.shards[0].file, columns=["label", "class"])
    assert set(labels.column("label").to_pylist()) == {-1} and set(labels.column("class").to_pylist()) == {""}


def test_shards_hold_the_files_bytes_and_read_back_as_the_files_rows(shards, folder):
    location, manifest = read_manifest(str(shards))
    assert manifest.images == 79 and len(manifest.shards) > 2 and manifest.classes == ("class0", "class1")
    assert list(manifest.skipped) == ["class1/broken.jpg"] and "UnidentifiedImageError" in manifest.skipped[
        "class1/broken.jpg"]
    table = pq.read_table(location.child(manifest.shards[0].file).path)
    assert table.column_names == ["image", "label", "class", "path", "key"]
    for data, rel in zip(table.column("image").to_pylist(), table.column("path").to_pylist()):
        assert data == (folder / rel).read_bytes()  # untouched, never re-encoded
    groups = pq.ParquetFile(location.child(manifest.shards[0].file).path).metadata
    assert groups.num_row_groups == 1 and groups.num_rows == manifest.shards[0].images  # 4 MB groups: one here

    source = shard_source(str(shards), seed=0)
    assert source.num_files == 79 and source.classes == ("class0", "class1")
    files = imagefolder_dataset(str(folder))
    from_shards, from_files = _by_key(source.dataset.take_all()), _by_key(files.dataset.take_all())
    assert set(from_shards) == set(from_files) and len(from_shards) == 79
    for key, row in from_shards.items():
        assert np.array_equal(row["image"], from_files[key]["image"]) and row["label"] == from_files[key]["label"]
    assert source.skipped.count() == files.skipped.count() == 1  # written off once, counted as the files count it

    # the same seed and row keys: bit-identical crops (sorted by key, then cropped in one batch each way)
    crops = load_config(overrides=["data.crops.local_number=2"]).data.crops
    stage = MultiCropStage(crops, seed=7, epoch=3)
    keys = sorted(from_shards)[:16]

    def batch(rows: dict[int, dict]) -> dict:
        column = np.empty(len(keys), dtype=object)
        for i, k in enumerate(keys):
            column[i] = rows[k]["image"]
        return {"image": column, "label": np.array([rows[k]["label"] for k in keys]), "key": np.array(keys)}

    a, b = stage(batch(from_shards)), stage(batch(from_files))
    assert all(np.array_equal(a[name], b[name]) for name in stage.names) and np.array_equal(a["label"], b["label"])


def test_every_pass_reads_every_row_once_in_its_own_seeded_order(shards):
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the order the plan gives, not the tasks' finishing order
    try:
        def passes(seed: int) -> list[list[int]]:
            source = shard_source(str(shards), seed=seed)
            rows = epoch_stream(source.dataset, 2, pass_dataset=source.pass_dataset).take_all()  # as training streams
            return [[int(r["key"]) for r in rows if r[EPOCH_COLUMN] == e] for e in (0, 1)]

        orders = passes(0)
    finally:
        ctx.execution_options.preserve_order = saved
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == 79 and orders[0] != orders[1]
    # seeded: the order of the read units and the order within each unit come from (seed, pass)
    table = pa.table({"key": [5, 1, 9, 3, 7], "x": list("abcde")})
    assert _permute_block(0, 1)(table).equals(_permute_block(0, 1)(table))
    assert not _permute_block(0, 1)(table).equals(_permute_block(0, 2)(table))
    assert _pass_seed(0, 1) == _pass_seed(0, 1) != _pass_seed(1, 1)
    first_shard = pq.read_table(read_manifest(str(shards))[0].child(read_manifest(str(shards))[1].shards[0].file).path)
    in_file = set(first_shard.column("key").to_pylist())
    seen = [k for k in orders[0] if k in in_file]  # the rows of one shard come in an order of their own
    assert sorted(seen) == sorted(in_file) and seen != first_shard.column("key").to_pylist()


def test_a_rerun_keeps_finished_shards_and_a_failed_one_leaves_no_manifest(ray_session, folder, tmp_path):
    out = tmp_path / "set"
    first = write_shards(str(folder), str(out), SMALL_MB, log=lambda _: None)
    names = [s.file for s in first.shards]
    kept = {n: os.stat(out / n).st_mtime_ns for n in names[1:]}
    # as an interrupted run leaves it: no manifest, one shard missing, one cut short
    (out / MANIFEST_FILE).unlink()
    (out / names[0]).unlink()
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:100])
    with pytest.raises(ShardSetError, match=r"no manifest.json, so not a finished shard set.*raydino shard"):
        shard_source(str(out))
    (out / names[0]).mkdir()  # a shard that cannot be written: the run fails and writes no manifest
    with pytest.raises(RuntimeError, match=rf"shard {names[0]} could not be written.*IsADirectoryError"):
        write_shards(str(folder), str(out), SMALL_MB, log=lambda _: None)
    assert not (out / MANIFEST_FILE).exists()
    (out / names[0]).rmdir()

    lines: list[str] = []
    again = write_shards(str(folder), str(out), SMALL_MB, log=lines.append)
    assert f"{len(names) - 1} finished by an earlier run are kept" in lines[0]  # the cut-short one is written again
    assert again.shards == first.shards and again.skipped == first.skipped
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in kept.items() if n != names[1])
    assert (out / MANIFEST_FILE).exists()
    lines.clear()
    write_shards(str(folder), str(out), SMALL_MB, log=lines.append)
    assert lines == [f"raydino shard: {out} already holds this source's 79 images in {len(names)} shards; nothing to do"]


def test_a_damaged_or_foreign_manifest_is_named(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ShardSetError, match="a damaged manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "webdataset", "version": 1}))
    with pytest.raises(ShardSetError, match="not a raydino-shards manifest"):
        read_manifest(str(tmp_path))


def test_reads_are_planned_from_the_manifest_in_runs_of_row_groups(shards, tmp_path):
    """Every row group once, consecutive groups of one shard per read unit, sized by bytes; a manifest written
    before row groups were recorded is planned from the shards' footers, the same way."""
    location, manifest = read_manifest(str(shards))
    assert all(s.row_groups == (s.images,) for s in manifest.shards)  # one 4 MB group per small shard
    units = plan_reads(location, manifest)
    assert [(u.shard, u.first_group, u.groups) for u in units] == [
        (location.child(s.file).path, 0, 1) for s in manifest.shards]
    assert sum(u.bytes for u in units) == pytest.approx(manifest.bytes, abs=len(units))

    # a shard of 10 groups of 100 rows (1,000 bytes each): units of at least the target, never across shards
    many = ShardManifest(source="x", labelled=True, classes=("a",), listing_digest="d", target_shard_bytes=1,
                         shards=(ShardInfo("a.parquet", 1000, 10_000, (100,) * 10), ShardInfo("b.parquet", 150, 1_500, (100, 50))))
    planned = plan_reads(location, many, unit_bytes=2_500, min_units=1)
    assert [(u.shard.rsplit("/", 1)[-1], u.first_group, u.groups) for u in planned] == [
        ("a.parquet", 0, 3), ("a.parquet", 3, 3), ("a.parquet", 6, 3), ("a.parquet", 9, 1), ("b.parquet", 0, 2)]
    assert plan_reads(location, many, unit_bytes=1, min_units=1)[0].groups == 1
    # a small set (1,000 groups, 10 KB): about MIN_READ_UNITS units, not one of READ_UNIT_BYTES
    small = ShardManifest(**{**many.__dict__, "shards": (ShardInfo("a.parquet", 10_000, 10_000, (10,) * 1000),)})
    assert MIN_READ_UNITS // 2 <= len(plan_reads(location, small)) <= MIN_READ_UNITS

    doc = json.loads((shards / MANIFEST_FILE).read_text())
    for shard in doc["shards"]:
        del shard["row_groups"]
    old = tmp_path / "old"
    old.mkdir()
    for f in shards.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / MANIFEST_FILE).write_text(json.dumps(doc))
    old_location, old_manifest = read_manifest(str(old))
    assert all(s.row_groups == () for s in old_manifest.shards)
    assert [(u.first_group, u.groups, u.bytes) for u in plan_reads(old_location, old_manifest)] == [
        (u.first_group, u.groups, u.bytes) for u in units]


def _rows(source) -> list[int]:
    return sorted(int(k) for b in source.dataset.iter_batches(batch_size=None, batch_format="numpy") for k in b["key"])


def test_a_shard_damaged_after_the_manifest_is_named_when_read_and_a_rerun_rewrites_it(shards, folder, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    _, manifest = read_manifest(str(copy))
    damaged = copy / manifest.shards[1].file
    data = bytearray(damaged.read_bytes())
    data[-4:] = b"XXXX"  # the footer's magic: same size, so the pre-run size check passes
    damaged.write_bytes(bytes(data))
    with pytest.raises(Exception, match=rf"shard {damaged.name} could not be read .*damaged; write the set again"):
        _rows(shard_source(str(copy)))
    lines: list[str] = []  # what the message says to do: the same command rewrites the damaged shard alone
    kept = {s.file: os.stat(copy / s.file).st_mtime_ns for s in manifest.shards if s.file != damaged.name}
    assert write_shards(str(folder), str(copy), SMALL_MB, log=lines.append).shards == manifest.shards
    assert f"{len(manifest.shards) - 1} finished by an earlier run are kept" in lines[0]
    assert {n: os.stat(copy / n).st_mtime_ns for n in kept} == kept
    assert len(_rows(shard_source(str(copy)))) == 79


class _FirstOpenFails(pafs.FileSystemHandler):
    """The local disk, except that each handler's first file open raises OSError, as a store that drops a
    connection does (each read task unpickles its own handler, so each task fails once)."""

    def __init__(self) -> None:
        self.local, self.failed = pafs.LocalFileSystem(), False

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def open_input_file(self, path):
        if not self.failed:
            self.failed = True
            raise OSError(f"connection reset while opening {path}")
        return self.local.open_input_file(path)

    def get_type_name(self): return "first-open-fails"  # noqa: E704
    def equals(self, other): return self is other  # noqa: E704
    def normalize_path(self, path): return path  # noqa: E704
    def get_file_info(self, paths): return self.local.get_file_info(paths)  # noqa: E704
    def get_file_info_selector(self, selector): return self.local.get_file_info(selector)  # noqa: E704
    def open_input_stream(self, path): return self.local.open_input_stream(path)  # noqa: E704
    def create_dir(self, path, recursive): raise NotImplementedError  # noqa: E704
    def delete_dir(self, path): raise NotImplementedError  # noqa: E704
    def delete_dir_contents(self, path, missing_dir_ok=False): raise NotImplementedError  # noqa: E704
    def delete_root_dir_contents(self): raise NotImplementedError  # noqa: E704
    def delete_file(self, path): raise NotImplementedError  # noqa: E704
    def move(self, src, dest): raise NotImplementedError  # noqa: E704
    def copy_file(self, src, dest): raise NotImplementedError  # noqa: E704
    def open_output_stream(self, path, metadata): raise NotImplementedError  # noqa: E704
    def open_append_stream(self, path, metadata): raise NotImplementedError  # noqa: E704


def test_a_store_that_fails_a_read_is_retried_and_every_row_arrives(shards):
    """A read task whose store fails (ShardReadError, an OSError) runs again from Ray Data's retry and the
    pass still holds every row once; with the retries off, the failure reaches the run and names the shard."""
    from raydino.stores.locations import DataLocation

    flaky = DataLocation(str(shards), str(shards), pafs.PyFileSystem(_FirstOpenFails()))
    source = shard_source(flaky)
    rows = _rows(source)  # each read task fails once: one Ray Data retry each, with its backoff (up to 2 s)
    assert rows == _rows(shard_source(str(shards))) and len(rows) == 79
    source.dataset.context.max_map_retries = 0
    with pytest.raises(Exception, match=r"shard shard-\S+ could not be read \(OSError: connection reset.*reachable"):
        _rows(source)


def test_shard_read_retries_add_to_the_users_data_context():
    """The shard reader's retry joins what a user set on Ray Data's context; it never narrows it."""
    import copy

    from raydino.data.shards import SHARD_READ_RETRIES, ShardReadError, _retry_shard_reads

    base = copy.copy(ray.data.DataContext.get_current())
    base.retried_map_errors, base.max_map_retries = False, 0  # Ray Data's defaults: no retries
    _retry_shard_reads(ctx := copy.copy(base))
    assert ctx.retried_map_errors == [ShardReadError.__name__] and ctx.max_map_retries == SHARD_READ_RETRIES
    base.retried_map_errors, base.max_map_retries = ["Throttled"], SHARD_READ_RETRIES + 5  # a user's own
    _retry_shard_reads(ctx := copy.copy(base))
    assert ctx.retried_map_errors == ["Throttled", ShardReadError.__name__]
    assert ctx.max_map_retries == SHARD_READ_RETRIES + 5
    _retry_shard_reads(ctx)  # twice: not listed twice
    assert ctx.retried_map_errors == ["Throttled", ShardReadError.__name__]
    base.retried_map_errors = True  # every error retried
    _retry_shard_reads(ctx := copy.copy(base))
    assert ctx.retried_map_errors is True


def test_the_evaluation_sample_reads_only_the_rows_it_keeps(shards, folder):
    picks, n_classes, fs = sample_shards(str(shards), 20, seed=0)
    assert n_classes == 2 and sum(len(rows) for _, rows, _ in picks) == 20
    labels = [lab for _, _, labs in picks for lab in labs]
    assert sorted(labels) == [0] * 10 + [1] * 10  # stratified: 40 and 39 rows, 10 of each
    for shard, rows, _ in picks:
        table = pq.read_table(shard, columns=["image", "path"])
        assert read_rows(shard, rows, fs) == [table.column("image")[r].as_py() for r in rows]
    assert sample_shards(str(shards), 20, seed=0) == (picks, n_classes, fs)  # seeded


def test_cli_pretrain_detects_a_shard_set(shards, tmp_path, capsys):
    from raydino.cli import main

    assert main(["pretrain", "--data", str(shards), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "source: shards" in out and f"path: {shards}" in out
    assert main(["pretrain", "data.source=shards", f"data.path={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raydino: error")]
    assert "no manifest.json, so not a finished shard set" in error and "Traceback" not in error
    assert main(["shard", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shard_names_carry_the_listing():
    assert shard_name("0123456789abcdef", 3, 12) == "shard-0123456789-00003-of-00012.parquet"


def test_shard_sets_of_train_and_val_side_by_side_evaluate_by_default(ray_session, folder, tmp_path):
    from raydino.launch.plan import plan_run

    for split in ("train", "val"):
        write_shards(str(folder), str(tmp_path / "sets" / split), log=lambda _: None)
    cfg = load_config(overrides=["data.source=shards", f"data.path={tmp_path / 'sets' / 'train'}",
                                 f"checkpoint.storage_path={tmp_path / 'runs'}"])
    planned = plan_run(cfg).cfg
    assert (planned.eval.train_path, planned.eval.test_path) == (str(tmp_path / "sets" / "train"),
                                                                 str(tmp_path / "sets" / "val"))
    (tmp_path / "sets" / "val" / MANIFEST_FILE).unlink()  # an unfinished val set is not used
    assert plan_run(cfg).cfg.eval.test_path is None


def test_a_missing_or_changed_shard_is_named_before_the_run_starts(shards, tmp_path, capsys):
    import shutil

    from raydino.cli import main

    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    _, manifest = read_manifest(str(copy))
    first, second = (copy / s.file for s in manifest.shards[:2])
    args = ["pretrain", "--data", str(copy), f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    second.write_bytes(second.read_bytes() + b"x")
    assert main(args) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raydino: error")]
    assert f"shard {second.name} is" in error and "changed after the set was written" in error
    first.unlink()
    assert main(args) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raydino: error")]
    assert f"shard {first.name} named in manifest.json is missing" in error

