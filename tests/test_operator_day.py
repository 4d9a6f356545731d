"""An operator's bad day: no GPU where a config asks for one, a second run beside a first, a shared
cluster that is full, a resume with another architecture, a finished run started again, and signals.
Each case ends fast with one line, and no MLflow run is left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.util.placement_group import placement_group, remove_placement_group

from raydino.cli import main
from raydino.config import load_config
from raydino.launch.plan import plan_run
from raydino.pretrain import pretrain
from raydino.tracking import RunLogger, create_run
from raydino.train.checkpoint import CONFIG_FILE
from raydino.train.driver import PretrainError, check_cluster_fits, needed_resources
from tests.tiny import TINY_RUN

TINY = [*TINY_RUN, "data.batch_size_per_worker=32", "data.crop_batch_size=32", "eval.max_images=120",
        "tracking.log_every_steps=2"]


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("raydino")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str, float]:
    """``raydino pretrain`` in a process of its own (no RAY_ADDRESS unless given), in ``tmp_path``."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raydino.cli", "pretrain", *args], check=False, cwd=tmp_path, capture_output=True,
        text=True,
        timeout=timeout, env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.mark.slow
def test_gpu_config_without_a_gpu_fails_at_once_and_creates_no_run(ray_session, tmp_path):
    """Before: Ray retried the worker start every 60 s forever, Ctrl-C was ignored, the MLflow run stayed
    RUNNING. The test session's Ray runs on this machine: a run does not join it (it is another run's), so the
    missing GPU is found before a Ray of its own starts. (Before that fix a second run joined the first run's
    private Ray and both deadlocked; a run without RAY_ADDRESS that starts its own Ray beside this session's:
    the first sweep driver of tests/test_sweep_resume.py.)"""
    code, out, seconds = _cli(tmp_path, "scaling.use_gpu=true", "scaling.num_workers=2", "optim.epochs=2")
    assert code == 1, out
    assert "scaling.use_gpu=true asks for 2 GPU(s)" in out and "scaling.use_gpu=false" in out
    assert "Traceback" not in out and seconds < 120
    assert _runs(tmp_path) == []


def test_cluster_fit_never_fails_now_and_waiting_is_said(ray_session):
    cfg = load_config(overrides=["scaling.num_workers=64"])
    with pytest.raises(PretrainError, match=r"needs 66 CPU at once, but the Ray cluster has 8 CPU"):
        check_cluster_fits(cfg, log=lambda _: None)
    cfg = load_config(overrides=["scaling.num_workers=2"])
    needs = needed_resources(cfg)["CPU"]
    hog = placement_group([{"CPU": ray.cluster_resources()["CPU"] - needs + 1}])
    assert hog.wait(timeout_seconds=60)
    try:
        lines: list[str] = []
        check_cluster_fits(cfg, log=lines.append)
        assert len(lines) == 1 and "other jobs hold part of the cluster" in lines[0]
        assert f"needs {needs:g} CPU" in lines[0] and "free now: " in lines[0]
        assert "scaling.start_timeout_s" in lines[0]
    finally:
        remove_placement_group(hog)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_cluster_fails_after_start_timeout_and_the_run_ends_failed(ray_session, tmp_path, monkeypatch):
    """Before: "Cluster resources are not enough ... may hang forever". Ray Train's worker-group start
    (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, which Ray Train hands from the driver to its controller; 3 s
    here) is tried once within start_timeout_s=3."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    cfg = load_config(overrides=[*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "optim.epochs=1",
                                 "tracking.run_name=full", f"checkpoint.storage_path={tmp_path / 'runs'}",
                                 "scaling.start_timeout_s=3"])
    # all but one CPU of the session's Ray, placed once earlier tests' actors are gone (bounded)
    hog = placement_group([{"CPU": ray.cluster_resources()["CPU"] - 1}])
    assert hog.wait(timeout_seconds=120)
    lines: list[str] = []
    try:
        with pytest.raises(PretrainError, match=r"did not give this run its train workers .* within "
                                                r"scaling.start_timeout_s=3 s; it needs 4 CPU \(free: \d"):
            pretrain(cfg, log=lines.append)
    finally:
        remove_placement_group(hog)
    assert any("other jobs hold part of the cluster" in line for line in lines)
    [run] = _runs(tmp_path)
    assert run.info.status == "FAILED"


def _finished_run_with_checkpoint(tmp_path: Path, *overrides: str) -> tuple[list[str], str, str]:
    """A run as a finished `raydino pretrain` leaves it: a FINISHED MLflow run and a checkpoint with its config."""
    args = [*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.run_name=R",
            f"checkpoint.storage_path={tmp_path / 'runs'}", *overrides]
    plan = plan_run(load_config(overrides=args))
    checkpoint = Path(plan.run_dir) / "checkpoint_00000042"
    checkpoint.mkdir(parents=True)
    (checkpoint / CONFIG_FILE).write_text(plan.cfg.to_yaml())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "raydino", "R", plan.cfg.flat())
    RunLogger(uri, run_id).end("FINISHED")
    return args, uri, run_id


def test_resume_with_another_architecture_is_refused_before_ray(tmp_path, capsys):
    """Before: refused after 47 s of Ray start-up and worker tracebacks, and the FINISHED run became FAILED."""
    args, uri, run_id = _finished_run_with_checkpoint(tmp_path)
    before = MlflowClient(uri).get_run(run_id).info
    started = time.monotonic()
    assert main(["pretrain", *args, "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_00000042" in err and "model.kwargs" in err and "'depth': 1" in err and "'depth': 2" in err
    assert "another tracking.run_name" in err and time.monotonic() - started < 30
    after = MlflowClient(uri).get_run(run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)


def test_a_finished_run_started_again_says_it_is_complete(tmp_path, capsys):
    """Before: it re-evaluated the run and stretched its duration."""
    args, uri, run_id = _finished_run_with_checkpoint(tmp_path)
    before = MlflowClient(uri).get_run(run_id).info
    assert main(["pretrain", *args]) == 0
    err = capsys.readouterr().err
    assert "run 'R' is complete" in err and run_id in err
    after = MlflowClient(uri).get_run(run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)


def _start(tmp_path: Path, address: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """A run joining the session's Ray (``ray.init`` sets its SIGTERM handler there too)."""
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydino.cli", "pretrain", *args], cwd=tmp_path, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"},
    )
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if text in log.read_text():
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{text!r} never appeared:\n{log.read_text()[-3000:]}")


def _driver_traceback(out: str) -> bool:
    """A traceback of the run's own process (lines Ray forwards from workers start with "(name pid=...)")."""
    return any(line.startswith("Traceback") for line in out.splitlines())


def _finish(proc: subprocess.Popen, seconds: float = 120) -> int:
    try:
        return proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("local", [False, True], ids=["ray", "local"])
def test_ctrl_c_at_any_moment_prints_one_line(ray_session, tmp_path, local):
    """Before: a KeyboardInterrupt traceback during Ray start-up and on --local. Wherever the signal lands
    (start-up or training), the outcome is the same: exit 130, one line, no traceback, no run RUNNING."""
    extra = ["--local", "--max-steps", "1000"] if local else []
    proc, log = _start(tmp_path, ray_session, *TINY, "optim.epochs=3", *extra)
    _wait_for(log, "raydino: dino-vmf", proc, 120)  # the config is loaded: start-up has begun
    proc.send_signal(signal.SIGINT)
    code = _finish(proc)
    out = log.read_text()
    assert code == 130, out[-3000:]
    assert "raydino: interrupted" in out and not _driver_traceback(out)
    assert all(run.info.status != "RUNNING" for run in _runs(tmp_path))



SEEN_ON_THE_CONSOLE = [  # verbatim from runs on this machine before the filter (2026-12-03)
    ("[2026-12-03 16:24:57,032 E 11029 11084] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'6f52560484db6ef3ef295d4d01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail."),
    ("/work/main/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436: "
    "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027."),
    "  self.exclude_resources = exclude_resources",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    ("WARNING: 8 PYTHON worker processes have been started on node: 5986 with address: 192.0.2.2, which is 4x the "
    "maximum expected startup concurrency (2)."),
]


def test_ray_noise_filter_drops_what_every_run_printed_and_keeps_ours():
    from raydino.train.driver import RAY_NOISE, _without_noise

    printed: list[dict] = []
    ours = ["epoch 1/3  step 10/30  loss 6.9157  kNN top-1 42.0%  prototypes in use 4  (29 s)",
            "raydino: epoch 2 step 1/10 (11/30 in all)  43.9 images/s  1.17 s/step  data wait 56%",
            "Traceback (most recent call last):", "ValueError: a real error in a worker"]
    assert all(RAY_NOISE.search(line) for line in SEEN_ON_THE_CONSOLE)
    _without_noise(printed.append)({"lines": SEEN_ON_THE_CONSOLE + ours, "pid": 1, "is_err": True})
    assert printed == [{"lines": ours, "pid": 1, "is_err": True}]
    _without_noise(printed.append)({"lines": SEEN_ON_THE_CONSOLE, "pid": "raylet", "is_err": False})
    assert len(printed) == 1  # nothing left: nothing printed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_checkpoint_disk_ends_the_run_in_one_line_naming_the_last_good_checkpoint(ray_session, tmp_path):
    """Storage on a 1.2 MB tmpfs: checkpoints 3 and 6 (0.5 MB each) fit, 9 does not. Before: a pyarrow OSError
    and the run directory; the half-copied checkpoint_00000009 would have been resumed from."""
    from raydino.launch.plan import checkpoint_complete
    from raydino.stores.locations import locate
    from raydino.train.checkpoint import read_checkpoint

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here ({mounted.stderr.strip()}): this test needs root")
    try:
        cfg = load_config(overrides=[*TINY_RUN, "optim.epochs=1", "checkpoint.every_steps=3", "checkpoint.max_failures=0",
                                     "tracking.run_name=full", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                     f"checkpoint.storage_path={disk}"])
        with pytest.raises(PretrainError) as failed:
            pretrain(cfg, log=lambda _: None)
        message, run = str(failed.value), disk / "full"
        assert "\n" not in message, message
        assert f"checkpoint storage {run} is full (No space left on device)" in message, message
        assert f"the last good checkpoint is {run / 'checkpoint_00000006'}." in message, message
        assert "run again with tracking.run_name=full to resume" in message
        assert read_checkpoint(run / "checkpoint_00000006").step == 6  # readable
        assert not checkpoint_complete(locate(run / "checkpoint_00000009"))  # cut short: never resumed from
        [mlflow_run] = _runs(tmp_path)
        assert mlflow_run.info.status == "FAILED"
    finally:
        subprocess.run(["umount", str(disk)], check=False)
