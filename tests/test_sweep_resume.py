"""A sweep whose driver dies resumes with Tune's own restore (``--resume``): finished trials stay
finished and are not trained again, unfinished ones continue from their checkpoints, the same MLflow
parent run continues and no child run is duplicated. Before that, the same sweep (two trials at once)
loses one trial's Train worker: Tune retries the trial from its checkpoint, into the same MLflow history,
and the driver is killed during that retry, once the other trial has finished."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from raydino.sweep.bookkeeping import TrialBookkeeping, serving
from raydino.sweep.spec import TrialOutcome
from tests.test_sweep import TINY

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
STEPS = 1347 // 64  # one epoch of digits, one worker, 64 images a step
EXPERIMENT = "resume"


def test_a_restored_tuner_reports_to_the_live_bookkeeping():
    """Tune pickles the callback into tuner.pkl; Tuner.restore must hand outcomes to the resuming driver's
    instance, and Tune's snapshot of its state must bring back the outcomes recorded before the death."""
    from ray import cloudpickle

    pickled = cloudpickle.dumps(TrialBookkeeping("sqlite:///x.db", "e", "s", print))
    lines: list[str] = []
    live = TrialBookkeeping("sqlite:///x.db", "e", "s", lines.append)
    with serving(live):
        assert pickle.loads(pickled) is live
    elsewhere = pickle.loads(pickled)  # outside a running sweep: a fresh instance, not the last live one
    assert elsewhere is not live and elsewhere.sweep == "s" and elsewhere.outcomes == {}

    live.outcomes["t1"] = TrialOutcome("t1", {"seed": 0}, "FAILED", 2, {}, "loss is nan")
    state = pickle.loads(cloudpickle.dumps(live.get_state()))
    restored = TrialBookkeeping("sqlite:///x.db", "e", "s", lines.append)
    restored.set_state(state)
    assert restored.outcomes == live.outcomes


def _in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The sweep script run in this process (``args`` without the script path): its exit code, stdout, stderr."""
    from tests.test_sweep import _script

    ablation = _script("kappa_ablation")
    sys.path.insert(0, str(SWEEPS))
    try:
        from _common import run_cli
    finally:
        sys.path.remove(str(SWEEPS))
    capsys.readouterr()
    code = run_cli(lambda: ablation.main(args[1:]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    """1 arm x N seeds of a tiny DINO, one epoch each, two trials at a time, a checkpoint every 5 steps."""
    return [
        str(SWEEPS / "kappa_ablation.py"), "--methods", "dino", "--prototypes", "normalised", "--centerings", "logit",
        "--max-concurrent", "2", "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--experiment", EXPERIMENT, "--out", str(tmp_path / "report"),
        *TINY, "optim.epochs=1", "checkpoint.every_steps=5", *extra,  # last: `--resume` takes no override as NAME
    ]


def _ours(ray_tmp: str) -> list[psutil.Process]:
    """Processes of the sweep drivers' private Rays (they all inherit RAY_TMPDIR)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _kill_all(driver: subprocess.Popen[bytes] | None, ray_tmp: str) -> None:
    """SIGKILL a driver's process group, then any process of its Ray that left the group; wait until gone."""
    if driver is not None:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.wait(timeout=30)
    deadline = time.monotonic() + 60
    while (left := _ours(ray_tmp)) and time.monotonic() < deadline:
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
    assert not _ours(ray_tmp), "processes of the killed sweep's Ray are still alive"


def _kill_a_train_worker_after_a_checkpoint(storage: Path, ray_tmp: str, killed: dict[str, object]) -> None:
    """SIGKILL one Ray Train worker whose Train run (a trial's) has a committed checkpoint before its last step.
    A worker's working directory is named after its Train run (Ray Train's ``chdir_to_working_dir``)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        committed = {snapshot.parent.name: names for snapshot in storage.glob("*/train/*/checkpoint_manager_snapshot.json")
                     if (names := _committed(snapshot)) and int(names[-1].split("_")[1]) < STEPS}
        for proc in _ours(ray_tmp) if committed else []:
            try:
                # Ray's title, cut to 15 characters by the kernel
                if proc.name().startswith("ray::RayTrainWo") and (run := Path(proc.cwd()).name) in committed:
                    proc.kill()
                    killed.update(run=run, after=committed[run][-1])
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)


def _committed(snapshot: Path) -> list[str]:
    """Ray Train's committed checkpoints of one Train run (its own record in storage)."""
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):  # not there yet, or being written
        return []


def _runs(client: MlflowClient) -> tuple[Any, list[Any]]:
    """(the parent run or None, its children) of the one sweep in the experiment."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None, []
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raydino.role") == "parent"]
    assert len(parents) <= 1, "a second parent run"
    if not parents:
        return None, []
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def _ready_to_kill(client: MlflowClient, storage: Path, killed: dict[str, object]) -> dict[str, Any] | None:
    """What the sweep looks like once one trial has FINISHED in MLflow and the other, whose worker was killed, is
    in its second attempt (Tune's retry) with a committed Train checkpoint that Tune's experiment snapshot in
    storage knows of; None before that."""
    if "run" not in killed:
        return None
    try:
        parent, children = _runs(client)
    except MlflowException:  # the store is being written
        return None
    finished = [c for c in children if c.info.status == "FINISHED"]
    retried = [c for c in children if c.info.status == "RUNNING" and str(killed["run"]).endswith(
        c.data.tags["raydino.trial_id"]) and c.data.tags.get("raydino.attempts") == "2"]
    if parent is None or not finished or not retried:
        return None
    name = parent.data.tags["raydino.sweep"]
    child = retried[0]
    committed = _committed(storage / name / "train" / child.info.run_name / "checkpoint_manager_snapshot.json")
    snapshots = "".join(p.read_text(errors="replace") for p in (storage / name).glob("experiment_state-*.json"))
    if not committed or child.data.tags["raydino.trial_id"] not in snapshots:
        return None
    done = finished[0]
    return {
        "name": name,
        "parent": parent.info.run_id,
        "done": done.info.run_id,
        "done_times": (done.info.start_time, done.info.end_time),
        "done_loss": [(m.step, m.timestamp) for m in client.get_metric_history(done.info.run_id, "loss")],
        "resumed": child.info.run_id,
        "checkpoint_step": int(committed[-1].split("_")[1]),
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_sweep_driver_resumes_where_it_was(ray_session, tmp_path, capsys):
    ray_tmp = tempfile.mkdtemp(prefix="rdr-", dir="/tmp")  # short: Ray's socket paths live under it
    # the sweep script as a user starts it, without RAY_ADDRESS, beside this session's Ray: it must not join that
    # Ray (another run's, marked private) but start its own, sized for two trials at once (raydino.train.driver.
    # ensure_ray); the Train workers the killer below finds by their Ray's RAY_TMPDIR are that Ray's
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    storage = tmp_path / "runs"
    first = None
    try:
        killed: dict[str, object] = {}
        killer = threading.Thread(target=_kill_a_train_worker_after_a_checkpoint, args=(storage, ray_tmp, killed),
                                  daemon=True)
        with (tmp_path / "first.log").open("w") as log:
            first = subprocess.Popen([sys.executable, *_sweep_args(tmp_path, "--seeds", "2")], env=env,
                                     cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killer.start()
        before = None
        deadline = time.monotonic() + 600
        while before is None and time.monotonic() < deadline and first.poll() is None:
            before = _ready_to_kill(client, storage, killed)
            time.sleep(0.5)
    finally:
        _kill_all(first, ray_tmp)  # the driver and its Ray, as a head restart would
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert before is not None, (tmp_path / "first.log").read_text()[-4000:]
    assert "run" in killed, killed
    name = before["name"]

    # a name that is not there, or other settings, are refused in one line before Ray starts
    code, _, err = _in_process(_sweep_args(tmp_path, "--seeds", "2", "--resume", "nope"), capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "cannot resume sweep 'nope'" in err and f"can be resumed there: {name}" in err
    code, _, err = _in_process(_sweep_args(tmp_path, "--seeds", "1", "--resume"), capsys)
    assert code == 2 and "was started with other settings (seed: 'grid [0, 1]' then, 'grid [0]' now" in err, err

    # --resume alone: the newest resumable sweep, from its storage, on another Ray than the one killed (this
    # session's, as a restarted head's would be): what it needs is in storage and in the MLflow store
    code, out, err = _in_process(_sweep_args(tmp_path, "--seeds", "2", "--resume"), capsys)
    assert code == 0, (out + err)[-4000:]

    assert f"sweep {name!r}: 2 trial(s), up to 2 at a time; resumed (attempt 2) in MLflow parent run " \
        f"{before['parent']}" in out
    assert "2 finished, 0 stopped early, 0 failed" in out
    # the unfinished trial's Train run continued from its latest checkpoint, not from step 0
    steps = [int(s) for s in re.findall(r"resumed from step (\d+)", out + err)]
    assert len(steps) == 1 and before["checkpoint_step"] <= steps[0] < STEPS, out[-4000:]

    parent, children = _runs(client)
    assert parent.info.run_id == before["parent"] and parent.info.status == "FINISHED"
    assert parent.data.tags["raydino.attempts"] == "2" and parent.data.metrics["trials_finished"] == 2
    assert len(children) == 2 and len({c.data.tags["raydino.trial_id"] for c in children}) == 2  # no duplicate
    assert {c.info.status for c in children} == {"FINISHED"}
    runs = {c.info.run_id: c for c in children}
    done = runs[before["done"]]  # finished before the driver's kill: untouched since, one attempt
    assert (done.info.start_time, done.info.end_time) == before["done_times"]
    assert [(m.step, m.timestamp) for m in client.get_metric_history(done.info.run_id, "loss")] == before["done_loss"]
    assert done.data.tags["raydino.attempts"] == "1"
    assert sorted(step for step, _ in before["done_loss"]) == list(range(3, STEPS + 1, 3))
    # the other trial: its worker killed after a checkpoint, Tune's retry went on from that checkpoint (attempt 2),
    # the driver killed during it, the resumed sweep continued it (attempt 3): the same child run, one history
    again = runs[before["resumed"]]
    assert str(killed["run"]).endswith(again.data.tags["raydino.trial_id"]), killed
    assert again.data.tags["raydino.attempts"] == "3"
    assert "final_knn_top1" in again.data.metrics
    assert sorted(m.step for m in client.get_metric_history(again.info.run_id, "loss")) == list(range(3, STEPS + 1, 3))


def test_resume_names_the_sweep_it_continues():
    from raydino.config import ConfigError, load_config
    from tests.test_sweep import _script

    ablation, common = _script("kappa_ablation"), _script("_common")
    base = load_config()
    assert common.sweep_name(ablation.build_parser().parse_args(["--resume", "s1"]), base, "k") == "s1"
    assert common.sweep_name(ablation.build_parser().parse_args(["--name", "s2", "--resume"]), base, "k") == "s2"
    assert common.sweep_name(ablation.build_parser().parse_args([]), base, "k").startswith("k-")
    with pytest.raises(ConfigError, match="name different sweeps"):
        common.sweep_name(ablation.build_parser().parse_args(["--name", "a", "--resume", "b"]), base, "k")
    with pytest.raises(ConfigError, match="after the overrides"):  # argparse's optional NAME took an override
        common.sweep_name(ablation.build_parser().parse_args(["--resume", "optim.epochs=2"]), base, "k")
