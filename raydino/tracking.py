"""MLflow tracking: the only module that imports MLflow.

The driver resolves the tracking URI, checks that the store answers (before any
training), creates the experiment and the run; rank 0 of the training workers logs
metrics to that run by id through ``RunLogger``; the driver logs artifacts and ends
the run with its final status.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.time import get_current_time_millis

DEFAULT_DB = "mlflow.db"
PROTOTYPE_ARRAYS = "eval/prototypes.npz"
"""A run's artifact with kappa_student, kappa_teacher and usage arrays (written by pretrain, read by sweep plots)."""
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
_BATCH = 900  # below MLflow's 1000-item log_batch limit


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which URI and what to do."""


def resolve_tracking_uri(uri: str | None = None, workdir: str | os.PathLike[str] | None = None) -> str:
    """config value, else MLFLOW_TRACKING_URI, else an absolute sqlite file in the working directory.

    Absolute, because Ray Tune changes each trial's working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            path = Path(uri.removeprefix("sqlite:///"))
            if not path.is_absolute():
                uri = f"sqlite:///{(Path(workdir or os.getcwd()) / path).resolve()}"
        return uri
    return f"sqlite:///{(Path(workdir or os.getcwd()) / DEFAULT_DB).resolve()}"


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail now, with an actionable message, if the store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: directory {path.parent} does not exist; create it or set tracking.uri")
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: directory {path.parent} is not writable; set tracking.uri")
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s)))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - connection errors, HTTP errors, bad URIs all mean the same to the user
        raise TrackingError(
            f"MLflow tracking server at {uri} is unreachable ({type(exc).__name__}: {str(exc)[:300]}). "
            "Start one with `mlflow server --host 127.0.0.1 --port 5000`, or point tracking.uri / "
            "MLFLOW_TRACKING_URI at a reachable server, or unset them to use ./mlflow.db."
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``mlartifacts/``), not in whatever the working directory is;
    a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
    except mlflow.exceptions.MlflowException:  # created concurrently by someone else
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def create_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run holding ``params`` (a flat config) and return its id; it stays RUNNING."""
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run.info.run_id, params=items[i : i + _BATCH])
    return run.info.run_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """Id of the latest run called ``run_name`` in ``experiment`` (to continue it on resume)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class RunLogger:
    """Logs to one existing run by id; cheap to construct on a training worker."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = get_current_time_millis()
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def last_step(self, key: str) -> int:
        """The largest step at which ``key`` was logged; -1 if never."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED; never leave a run RUNNING."""
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.from_string(status)))

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> int:
        """Mark a run continued by a restarted trial as RUNNING again and count the attempt;
        returns the attempt number (1 for a fresh run)."""
        run = self.client.get_run(self.run_id)
        attempt = int(run.data.tags.get("raydino.attempts", "0")) + 1
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags({"raydino.attempts": str(attempt)})
        return attempt

    def end_unless_finished(self, status: str) -> bool:
        """Set the final ``status`` unless the run already ended FINISHED (its own process got
        there first); True if it was set. Used for runs whose process was stopped from outside."""
        if self.status() in ("FINISHED", status):
            return False
        self.end(status)
        return True

    def end_if_running(self, status: str) -> bool:
        """Set ``status`` only while the run is RUNNING; True if it was set. Used by a run's own
        process on its way down: a status set from outside first (a sweep driver ending an
        ASHA-stopped trial KILLED while the trial still unwinds) is the verdict, not overwritten."""
        if self.status() != "RUNNING":
            return False
        self.end(status)
        return True

    def download_artifact(self, artifact_path: str, dst: str | os.PathLike[str]) -> Path:
        """Copy one artifact of the run into ``dst`` (quietly: no per-file progress bar)."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))


def search_runs(uri: str, experiment: str, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every run of an experiment (or the children of one parent) as flat dicts:
    ``run_id``, ``run_name``, ``status``, ``start_time`` (epoch seconds), ``params.<key>``, ``metrics.<key>``, ``tags.<key>``."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments(max_results=50))
        raise TrackingError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {names or 'none'}")
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000, page_token=token)
        for run in page:
            row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                                   "start_time": run.info.start_time / 1000}
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            return rows


def start_system_metrics(uri: str, run_id: str, interval_s: float) -> Callable[[], None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where pynvml finds one)
    on this process's machine, logging into ``run_id`` every ``interval_s``; returns its stop function."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri, resume_logging=True)
    monitor.start()

    def stop() -> None:
        monitor.finish()
        monitor.collect_metrics()  # the monitor drops a partial interval: log one last sample, so no run ends without
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    return stop


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {uri}"
