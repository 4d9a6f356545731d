"""End to end on Ray: 2 gloo workers, Ray Data multi-crop, MLflow in a fresh sqlite store."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient
from safetensors import safe_open

import raydino.pretrain as pretrain_module
from raydino.cli import main
from raydino.config import load_config
from raydino.eval.evaluate import extract
from raydino.pretrain import pretrain, summary_lines
from raydino.tracking import TrackingError
from raydino.train import driver
from raydino.train.export import load_teacher
from tests.images import small_imagefolder
from tests.tiny import TINY_RUN

TINY = [
    *TINY_RUN,
    "data.batch_size_per_worker=16",
    "data.crop_batch_size=32",
    "eval.max_images=120",
    "tracking.log_every_steps=2",
]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(overrides=[*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """One 3-epoch iBOT-vMF run that four tests read (a Ray Train run costs ~20 s here), each about something
    a run must do or report on its own: track and export everything; train from an image folder with a corrupt
    file and count it; with the teacher at temperature 1 (targets uniform from the start), warn of the collapse
    once and tag it; hand the CLI a checkpoint to evaluate and export. DINO-vMF runs end to end in the other
    tests of this module and in test_multinode. Returns the store's folder, the image folder, the summary and
    what the run printed (the workers' lines too)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    root = small_imagefolder(tmp_path / "folder")
    cfg = _cfg(tmp_path, "optim.epochs=3", "data.source=imagefolder", f"data.path={root}",
               "data.batch_size_per_worker=8", f"eval.train_path={root}", f"eval.test_path={root}",
               "tracking.run_name=e2e", "tracking.experiment=e2e", f"checkpoint.storage_path={tmp_path / 'runs'}",
               "loss.method=ibot", "loss.vmf=true", "loss.teacher_temp=1.0", "loss.warmup_teacher_temp=1.0",
               "loss.koleo_weight=0",
               "tracking.progress_seconds=0.001", "tracking.system_metrics=true",  # a progress window every step
               "tracking.log_model=true")  # the one end-to-end run that logs the MLflow model
    loads = []
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):  # Ray prints the workers' lines here
        for module in (driver, pretrain_module):  # count the evaluation-data loads of the whole run
            mp.setattr(module, "load_eval_data", lambda *a, _f=module.load_eval_data, **k: loads.append(1) or _f(*a, **k))
        summary = pretrain(cfg, log=print)
    assert len(loads) == 1, "the evaluation data is loaded once per run (the final evaluation reuses it)"
    return tmp_path, root, summary, printed.getvalue()


STEPS = 3 * (80 // 2 // 8)
"""5 steps x 2 workers x 8 planned from 80 files a pass, 3 epochs; a pass holds 79 rows: the spare pass fills
the last step of each."""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_tracks_params_metrics_artifacts_and_exports(trained):
    tmp_path, _, summary, _ = trained
    assert summary.result.steps == STEPS

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.data.params["loss.vmf"] == "True" and run.data.params["head.num_prototypes"] == "64"
    assert run.data.params["loss.method"] == "ibot" and run.data.tags["raydino.method"] == "ibot-vmf"
    for key in ("loss", "cls_loss", "patch_loss", "teacher_patch_temp", "masked_share", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "teacher_entropy",
                "mean_target_entropy", "kappa_student_q50", "kappa_teacher_q95", "knn_top1", "prototypes_in_use",
                "final_knn_top1", "final_linear_probe_top1", "random_init_knn_top1"):
        assert key in run.data.metrics, key
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) == summary.result.steps // 2 and all(np.isfinite(m.value) for m in losses)
    for term in ("cls_loss", "patch_loss"):  # both iBOT terms at every logged step
        assert [m.step for m in client.get_metric_history(run.info.run_id, term)] == [m.step for m in losses]
    assert len(client.get_metric_history(run.info.run_id, "knn_top1")) == 3  # once per epoch
    # throughput within the epoch (a window per step here): global images/s, step time, data-wait share
    rates = client.get_metric_history(run.info.run_id, "images_per_second")
    assert len(rates) >= summary.result.steps // 2 and all(m.value > 0 for m in rates)
    for m in client.get_metric_history(run.info.run_id, "step_seconds"):
        assert 0 < m.value < 60
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run.info.run_id, "data_wait_fraction"))
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    assert (tmp_path / "mlartifacts").is_dir()  # beside the sqlite store, not in the working directory
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "model", "checkpoint"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"kappa_histogram.png", "prototype_usage.png", "loss_curve.png", "attention_grid.png"} <= plots

    # the teacher backbone is an MLflow model of the run, in the run's experiment (tests/test_mlflow_model.py: it
    # loads back and embeds like the teacher)
    assert summary.model is not None
    logged = client.get_logged_model(summary.model.model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == run.info.experiment_id

    # the exported backbone loads into timm and reproduces the checkpoint teacher's features
    export = summary.export_path
    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    kwargs = json.loads(meta["raydino_timm_kwargs"])
    model = timm.create_model(meta["raydino_model"], pretrained=True, pretrained_cfg_overlay={"file": str(export)}, **kwargs)
    teacher, _, _ = load_teacher(summary.result.checkpoint_dir)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    expected, _ = extract(teacher, images)
    from raydino.models import normalize_crops

    with torch.no_grad():
        got = model.eval()(normalize_crops([torch.from_numpy(images)], "cpu")[0])
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_evaluate_and_export(trained, tmp_path, capsys):
    checkpoint = trained[2].result.checkpoint_dir
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "knn_top1_k20" in out and "linear_probe_top1" in out and "kappa_teacher_q50" in out
    assert main(["export", str(checkpoint), str(tmp_path / "b.safetensors")]) == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out and (tmp_path / "b.safetensors").stat().st_size > 0
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a raydino checkpoint" in capsys.readouterr().err


def test_missing_path_fails_fast_with_its_name(tmp_path, capsys):
    started = time.monotonic()
    code = main(["pretrain", "--data", str(tmp_path / "nope"), f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert code == 2 and time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "does not exist" in err


def test_unreachable_tracking_server_fails_at_start(tmp_path, capsys):
    started = time.monotonic()
    code = main(["pretrain", "tracking.uri=http://127.0.0.1:9"])
    assert code == 1 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "unreachable" in err and "mlflow server" in err


def test_tracking_error_type():
    from raydino.tracking import check_tracking

    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking("sqlite:////nonexistent-dir/mlflow.db")


def test_stream_has_spare_passes_for_skipped_files():
    from raydino.train.driver import stream_passes

    for epochs in (1, 2, 6, 7, 8, 50, 100, 1000):
        assert stream_passes(epochs) > epochs
        assert 0.9 * stream_passes(epochs) >= epochs  # 10% of the files may turn out undecodable


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_imagefolder_with_a_corrupt_file_trains_and_counts_it(trained):
    _, root, summary, _ = trained
    assert summary.result.skipped_images == 1
    assert summary.result.steps == STEPS
    run = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id)
    assert run.data.metrics["skipped_images"] == 1
    # the same folder evaluates a checkpoint (80/20 split into kNN bank and test set)
    from raydino.pretrain import evaluate_checkpoint

    metrics = evaluate_checkpoint(summary.result.checkpoint_dir, str(root))
    assert 0.0 <= metrics["knn_top1"] <= 100.0 and metrics["prototypes_in_use"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_slow_data_stage_shows_in_the_data_wait(ray_session, tmp_path, monkeypatch):
    """A data stage that cannot keep up (one task at a time, 4 ms per image after the crops, ~130 ms a step
    against ~40 ms of training): the trainers wait on data most of the time; the run measures it, logs it and
    warns (printed, and tagged on the run)."""

    def slow(batch):
        time.sleep(0.004 * len(batch["label"]))
        return batch

    crops = driver.multicrop_dataset
    monkeypatch.setattr(driver, "multicrop_dataset",
                        lambda *a, **k: crops(*a, **k).map_batches(slow, batch_size=16, concurrency=1))
    cfg = _cfg(tmp_path, "optim.epochs=1", "tracking.run_name=slow-data", "tracking.progress_seconds=1",
               "eval.every_epochs=0", f"checkpoint.storage_path={tmp_path / 'runs'}")
    summary = pretrain(cfg, log=lambda _: None)
    waits = [m.value for m in MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id,
                                                                                   "data_wait_fraction")]
    assert waits and statistics.median(waits) > 0.2, waits
    warning = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id).data.tags["raydino.slow_data_warning"]
    assert "waited on data" in warning and "data.num_crop_actors" in warning


@pytest.mark.slow
def test_a_run_made_to_collapse_warns_once_and_is_tagged(trained):
    """The collapse watch's rules are unit-tested in tests/test_collapse.py; here a real run trips them."""
    _, _, summary, printed = trained
    warnings = [line for line in printed.splitlines() if "raydino: warning: collapse:" in line]
    assert len(warnings) == 1, printed[-3000:]
    assert "uniform over epoch 2" in warnings[0] and "loss.teacher_temp" in warnings[0]
    client = MlflowClient(summary.tracking_uri)
    assert "uniform over epoch 2" in client.get_run(summary.mlflow_run_id).data.tags["raydino.collapse"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(summary.mlflow_run_id, "collapsed"))
    assert [value for _, value in history] == [0.0, 1.0, 1.0]
    lines = summary_lines(summary)
    assert any(line.startswith("collapse: the last epoch was collapsed") for line in lines)
    assert any(line.startswith("prototype precision kappa, q05..q95: student ") for line in lines)
