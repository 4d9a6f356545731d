"""Data and checkpoints in object storage, against a real S3 API on loopback (moto's server): the
standard AWS_ENDPOINT_URL / AWS_* variables, one-line errors before anything starts, an ImageFolder
in a bucket trained on (a corrupt object skipped and counted), checkpoints written to and resumed
from s3://."""

from __future__ import annotations

import shutil
import signal
import time

import pytest
from mlflow import MlflowClient

from raydino.config import load_config
from raydino.data.sources import imagefolder_dataset, list_imagefolder
from raydino.launch.plan import (
    check_data_path,
    checkpoint_complete,
    checkpoint_folders,
    plan_run,
    standard_eval_paths,
)
from raydino.pretrain import pretrain
from raydino.stores.locations import locate, read_file
from raydino.stores.objectstore import ObjectStoreError
from raydino.stores.run_storage import join_storage, resolve_storage
from raydino.train.checkpoint import STATE_FILE, read_checkpoint
from tests.images import small_imagefolder
from tests.object_store import (
    CREDENTIALS,
    create_bucket,
    flaky_s3,
    free_port,
    keys,
    moto_endpoint,
    upload,
)
from tests.tiny import TINY_RUN


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    """s3://data with train/ (80 objects, one corrupt) and val/ beside it, ImageNet's layout."""
    create_bucket("data")
    local = tmp_path_factory.mktemp("bucket")
    small_imagefolder(local / "train")
    shutil.copytree(local / "train", local / "val", ignore=shutil.ignore_patterns("broken.jpg", "3*.png"))
    upload(str(local), "s3://data/imagenet")
    return "s3://data/imagenet"


def test_remote_storage_is_checked_writable_and_stays_a_uri(s3, tmp_path, monkeypatch):
    create_bucket("runs")
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("s3://runs/raydino/") == "s3://runs/raydino"
    assert keys("s3://runs/raydino") == []  # the write probe leaves nothing behind
    assert join_storage("s3://runs/raydino", "sweep", "train") == "s3://runs/raydino/sweep/train"
    plan = plan_run(load_config(overrides=["checkpoint.storage_path=s3://runs/raydino", "tracking.run_name=r"]))
    assert plan.storage == plan.cfg.checkpoint.storage_path == "s3://runs/raydino"
    assert plan.run_dir == "s3://runs/raydino/r"
    assert not (tmp_path / "s3:").exists()


def test_a_bucket_is_listed_like_a_folder(ray_session, bucket):
    root, files = list_imagefolder(f"{bucket}/train")
    assert root.remote and list(files) == ["class0", "class1"]
    assert [len(v) for v in files.values()] == [40, 40]  # broken.jpg is listed: it is skipped when decoded
    assert all(p.startswith("data/imagenet/train/class") for v in files.values() for p in v)
    source = imagefolder_dataset(f"{bucket}/train/")
    assert source.classes == ("class0", "class1") and source.num_files == 80


def test_the_standard_layout_in_a_bucket_gives_a_knn(bucket):
    cfg = load_config(overrides=["data.source=imagefolder", f"data.path={bucket}/train"])
    assert standard_eval_paths(cfg) == {"eval.train_path": f"{bucket}/train", "eval.test_path": f"{bucket}/val"}


def test_missing_prefix_and_missing_bucket_name_the_path(s3, bucket):
    for uri in (f"{bucket}/nope", "s3://no-such-bucket/x"):
        cfg = load_config(overrides=["data.source=imagefolder", f"data.path={uri}"])
        with pytest.raises(FileNotFoundError, match=f"data path '{uri}' does not exist"):
            check_data_path(cfg)


@pytest.mark.timeout(120)
def test_wrong_endpoint_is_one_line_before_anything_starts(s3, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    cfg = load_config(overrides=["data.source=imagefolder", "data.path=s3://data/imagenet/train"])
    shards = load_config(overrides=["data.source=shards", "data.path=s3://data/imagenet-shards/train"])
    for attempt in (lambda: check_data_path(cfg), lambda: check_data_path(shards),
                    lambda: resolve_storage("s3://runs/raydino")):
        with pytest.raises(ObjectStoreError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and "cannot reach the object store" in message
        assert endpoint in message and "AWS_ENDPOINT_URL" in message


@pytest.mark.timeout(120)
def test_refused_credentials_are_one_line(monkeypatch):
    with moto_endpoint(auth=True) as endpoint:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)  # keys that the server does not know
        for attempt in (lambda: locate("s3://data/train").kind(), lambda: resolve_storage("s3://runs/raydino")):
            with pytest.raises(ObjectStoreError) as err:
                attempt()
            message = str(err.value)
            assert "\n" not in message and "refused the credentials" in message and "AWS_ACCESS_KEY_ID" in message


def test_a_uri_pyarrow_cannot_open_is_named():
    with pytest.raises(ObjectStoreError, match="nosuchscheme://x/y: not a location pyarrow can open"):
        locate("nosuchscheme://x/y")


@pytest.fixture
def flaky(s3):
    """A FlakyS3 in front of the module's S3: every 10th new request fails."""
    with flaky_s3(s3, every=10) as proxy:
        yield proxy


def _committed_in_bucket(run: str) -> list[str]:
    """The complete checkpoints of a run in the bucket (read without the proxy's faults)."""
    try:
        return [folder.name for folder in checkpoint_folders(run) if checkpoint_complete(folder)]
    except (OSError, ObjectStoreError):  # not there yet
        return []


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_on_a_flaky_bucket_stopped_by_sigterm_resumes_from_its_s3_checkpoints(
    ray_session, bucket, s3, flaky, tmp_path, monkeypatch
):
    """Data and checkpoints in a bucket, through an S3 that throttles and fails: every 10th new request gets a
    503 SlowDown, a 500 or a dropped connection (tests/object_store.FlakyS3). A `raydino pretrain` stopped by
    SIGTERM after its first checkpoint ends like Ctrl-C (before: rc 134 and a C++ stack dump from Ray's
    handler; now KILLED, checkpoint kept, one line, 143); the same run started again resumes from its
    checkpoint in the bucket into one continuous MLflow history. The clients' retries (pyarrow's S3 retry
    strategy, Ray Data's retried I/O errors, Ray Train's checkpoint upload retries, our download retries)
    carry both through; only the one corrupt object is skipped, and every checkpoint in the bucket is complete
    and reads back. (A driver killed with SIGKILL resumes the same way: tests/test_sweep_resume.py.)"""
    from tests.test_operator_day import _driver_traceback, _finish, _start

    create_bucket("checkpoints")
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint)  # what the driver resolves and hands to Ray
    overrides = [
        *TINY_RUN, "data.batch_size_per_worker=8", "data.crop_batch_size=32", "eval.max_images=60",
        "data.source=imagefolder", f"data.path={bucket}/train", "checkpoint.storage_path=s3://checkpoints/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.run_name=T", "tracking.log_every_steps=1",
        "optim.epochs=4",
    ]
    steps_per_epoch = 80 // 2 // 8
    proc, log = _start(tmp_path, ray_session, *overrides)  # joins the session's Ray, with this environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # this process watches the bucket without the faults
    deadline = time.monotonic() + 300
    while not _committed_in_bucket("s3://checkpoints/runs/T") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # 3 epochs still to go: mid-training
    code = _finish(proc)
    out = log.read_text()
    assert code == 143, out[-3000:]
    assert "raydino: terminated (SIGTERM): run 'T' stopped at step" in out
    assert "tracking.run_name=T to resume" in out and "checkpoint_000000" in out
    assert not _driver_traceback(out) and "SIGTERM received" not in out and "*** " not in out
    # Ray's lines that read as errors in every run stay off the console (before: ~8 of them)
    for noise in ("core_worker.cc", "RayDeprecationWarning", "PYTHON worker processes", "Token authentication"):
        assert noise not in out, noise
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [killed] = client.search_runs([client.get_experiment_by_name(load_config().tracking.experiment).experiment_id])
    assert killed.info.status == "KILLED"
    assert _committed_in_bucket("s3://checkpoints/runs/T")

    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint)
    lines: list[str] = []
    resumed = pretrain(load_config(overrides=overrides), log=lines.append)
    assert resumed.result.steps == 4 * steps_per_epoch
    assert any("continuing MLflow run" in line for line in lines), lines
    assert resumed.mlflow_run_id == killed.info.run_id
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # every step logged once: the resumed run neither lost the steps before the signal nor logged them twice
    history = sorted(m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss"))
    assert history == list(range(1, 4 * steps_per_epoch + 1)), history
    assert resumed.result.skipped_images == 1  # the corrupt object only, not the objects whose reads failed
    # the standard layout in the bucket gave the kNN its folders
    assert run.data.params["eval.test_path"] == f"{bucket}/val" and "knn_top1" in resumed.final.metrics
    print(f"S3 faults injected: {flaky.injected}, requests passed: {flaky.forwarded}")
    assert all(n > 0 for n in flaky.injected.values()), flaky.injected

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    folders = checkpoint_folders("s3://checkpoints/runs/T")
    assert folders and all(checkpoint_complete(folder) for folder in folders), [f.uri for f in folders]
    for folder in folders:
        local = tmp_path / folder.name
        local.mkdir()
        (local / STATE_FILE).write_bytes(read_file(folder.child(STATE_FILE).path, folder.filesystem))
        assert read_checkpoint(local).step == int(folder.name.rsplit("_", 1)[1])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_shards_written_to_a_bucket_train_and_evaluate(ray_session, bucket, s3, tmp_path):
    """`raydino shard` from the bucket's folders into the bucket, then a run from the shards, with kNN on the
    val shards: the corrupt object is skipped once, when the set is written, and counted by the run."""
    from raydino.commands.shard import shard

    create_bucket("shards")
    lines: list[str] = []
    manifest = shard(f"{bucket}/train", "s3://shards/train", 0.05, log=lines.append)
    shard(f"{bucket}/val", "s3://shards/val", 0.05, log=lambda _: None)
    assert manifest.images == 79 and list(manifest.skipped) == ["class1/broken.jpg"] and len(manifest.shards) > 1
    assert lines[-1].endswith("train with --data s3://shards/train")
    stored = keys("s3://shards/train")
    assert "manifest.json" in stored and len(stored) == len(manifest.shards) + 1  # no temporary object left

    cfg = load_config(overrides=[
        *TINY_RUN, "data.batch_size_per_worker=8", "data.crop_batch_size=32", "eval.max_images=60",
        "data.source=shards", "data.path=s3://shards/train", "eval.train_path=s3://shards/train",
        "eval.test_path=s3://shards/val", f"checkpoint.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.run_name=from-shards", "optim.epochs=1",
    ])
    summary = pretrain(cfg, log=lambda _: None)
    assert summary.result.steps == 79 // 2 // 8 and summary.result.skipped_images == 1
    run = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id)
    assert run.data.params["data.source"] == "shards" and run.data.metrics["skipped_images"] == 1
    assert "knn_top1" in summary.final.metrics and "knn_top1" in run.data.metrics
