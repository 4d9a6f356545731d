"""MLflow tracking: the only module that imports MLflow.

The driver resolves the tracking URI, checks that the store answers (before any
training), creates the experiment and the run; rank 0 of the training workers logs
metrics to that run by id through ``RunLogger``; the driver logs artifacts and ends
the run with its final status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag, SourceType
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE
from mlflow.utils.time import get_current_time_millis

if TYPE_CHECKING:
    import numpy as np
    import torch

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
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(
                f"MLflow store {uri}: the file {path} is not writable; make it writable (chmod u+w {path}) "
                "or set tracking.uri / MLFLOW_TRACKING_URI to another file"
            )
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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The experiment tag MLflow 3's UI reads to choose between its GenAI pages (traces) and its
model-training pages (runs table); the values are the UI's ``ExperimentKind`` enum."""
TRAINING_KIND = "custom_model_development"
"""``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT``, shown as "Machine learning" in the UI."""
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
"""MLflow 3.17's UI takes the experiment kind from a global GenAI / machine-learning switch (default
GenAI, kept in the browser) rather than from the tag; this query selects machine learning."""


def _needs_kind(tags: Mapping[str, str]) -> bool:
    """True unless someone chose a kind explicitly (the UI's inferred values are guesses, not choices)."""
    kind = tags.get(EXPERIMENT_KIND_TAG, "")
    return kind in ("", "no_inferred_type") or kind.endswith("_inferred")


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it marked as a model-training experiment (``TRAINING_KIND``), so
    MLflow's UI opens it on the runs table, not on the empty GenAI trace overview."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if _needs_kind(experiment.tags):
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location(client.tracking_uri), tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    except mlflow.exceptions.MlflowException:  # created concurrently by someone else
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def source_name(argv: list[str] | None = None) -> str:
    """What started this process, as the runs table's Source column shows it: ``raydino pretrain``, or
    the script (``sweeps/kappa_ablation.py``, relative to the working directory when inside it)."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0] or argv[0] == "-c":
        return "python"
    script = Path(argv[0])
    if script.name == "raydino" and len(argv) > 1:
        return f"raydino {argv[1]}"
    try:
        return str(script.resolve().relative_to(Path.cwd()))
    except ValueError:
        return script.name


def source_tags(name: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run started by ``name`` (default: ``source_name()`` of this process)."""
    return {MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL), MLFLOW_SOURCE_NAME: name or source_name()}


def create_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run holding ``params`` (a flat config) and return its id; it stays RUNNING.

    The run gets MLflow's source tags (the runs table's Source column: ``source_name()`` unless
    ``tags`` names one) as the fluent API would give it."""
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    all_tags = {**source_tags(), **(tags or {})}
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
        filter_string=equals_filter("attributes.run_name", run_name),
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    return next((r.info.run_id for r in runs if r.info.run_name == run_name), None)


def equals_filter(key: str, value: str) -> str:
    """An MLflow filter clause matching ``key`` equal to user text ``value``.

    MLflow's filter grammar has no escape inside a quoted string: a value is quoted with the
    quote it does not contain; one holding both kinds becomes a LIKE pattern with ``_`` in their
    place, so callers compare the results exactly."""
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    return f"{key} LIKE '{value.replace(chr(39), '_').replace(chr(34), '_')}'"


def _batches(items: list[Metric]) -> Iterator[list[Metric]]:
    """``items`` in batches under log_batch's limit."""
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def _metric_batches(metrics: Mapping[str, float], step: int) -> Iterator[list[Metric]]:
    """The finite values of ``metrics`` as MLflow points taken now at ``step``, in batches under log_batch's limit."""
    now = get_current_time_millis()
    return _batches([Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)])


class RunLogger:
    """Logs to one existing run by id; cheap to construct on a training worker."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for batch in _metric_batches(metrics, step):
            self.client.log_batch(self.run_id, metrics=batch)

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


@dataclasses.dataclass
class _Batch:
    seq: int
    metrics: list[Metric]
    tags: list[RunTag]
    sent_at: float = 0.0
    operation: Any = None
    """MLflow's ``RunOperations`` while the batch is in MLflow's async queue."""

    def records(self) -> list[dict[str, Any]]:
        return [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.metrics] + [
            {"tag": t.key, "value": t.value} for t in self.tags
        ]


CLOSING_RESEND_S = 0.5
"""How often ``BackgroundLogger.close`` offers a held batch again (the run's training is over)."""


class BackgroundLogger(RunLogger):
    """A training worker's metrics and tags, sent with MLflow's async logging (the rest of ``RunLogger``, reads
    included, stays synchronous): no training step waits for
    the tracking server, and an unreachable one costs no step and no point.

    Each call queues a batch in MLflow's own async queue (``log_batch(synchronous=False)``), whose
    threads send it with the client's retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and its backoff). A batch
    MLflow gave up on is held, with every later one behind it, in order; every ``resend_every_s`` the first
    held batch is offered again (MLflow's retries pace it), and once one lands the rest follow. ``say``
    prints one line when tracking falls behind (a batch given up on, or none confirmed for ``behind_after_s``)
    and one when it has caught up. ``close`` waits a bounded time for the rest and returns what never reached
    the store, for the caller to write to a file. Each point keeps its own step and the time it was taken,
    so the store's history is the same whenever it arrives.
    """

    def __init__(
        self, uri: str, run_id: str, say: Callable[[str], None] = print, *, resend_every_s: float = 5.0,
        behind_after_s: float = 30.0,
    ) -> None:
        # one sending thread: batches reach the store in the order they were taken, and a SQLite store behind
        # the server sees one writer per run (MLflow reads this when its async queue starts in this process)
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE", "1")
        # the one warning and the one all-clear below replace MLflow's error line per failed batch and urllib3's
        # line per retry
        logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        super().__init__(uri, run_id)
        self.uri, self.say = uri, say
        self.resend_every_s, self.behind_after_s = resend_every_s, behind_after_s
        self._in_flight: list[_Batch] = []
        self._held: list[_Batch] = []
        self._offered: _Batch | None = None
        self._last_offer = -math.inf
        self._seq = 0
        self._behind_since: float | None = None
        self.points_confirmed = 0
        self.offers = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for batch in _metric_batches(metrics, step):
            self._queue(batch, [])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._queue([], [RunTag(k, str(v)) for k, v in tags.items()])

    @property
    def pending(self) -> int:
        """Batches the store has not confirmed yet (in MLflow's queue or held)."""
        return len(self._in_flight) + len(self._held)

    def _queue(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        self._seq += 1
        batch = _Batch(self._seq, metrics, tags)
        self.poll()
        if self._held:  # behind a held batch: wait in line
            self._held.append(batch)
        else:
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        batch.sent_at = time.monotonic()
        batch.operation = self.client.log_batch(self.run_id, metrics=batch.metrics, tags=batch.tags, synchronous=False)
        self._in_flight.append(batch)

    def poll(self) -> None:
        """Collect what MLflow has finished, without waiting: failed batches are held (in order), the first held
        one is offered again when due, and the rest follow once an offer lands."""
        now = time.monotonic()
        landed = False
        failures: list[BaseException] = []
        running: list[_Batch] = []
        for batch in self._in_flight:
            futures = batch.operation._operation_futures  # RunOperations has wait() only; these are its futures
            if not all(f.done() for f in futures):
                running.append(batch)
                continue
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                failures.append(errors[0])
                self._held.append(batch)
            else:
                self.points_confirmed += len(batch.metrics)
                landed = landed or batch is self._offered
            if batch is self._offered:
                self._offered = None
        self._in_flight = running
        self._held.sort(key=lambda b: b.seq)
        if failures:
            self._fall_behind(f"it did not take a batch: {str(failures[0]).splitlines()[0][:300]}")
        elif running and now - min(b.sent_at for b in running) > self.behind_after_s:
            self._fall_behind(f"no batch confirmed for {self.behind_after_s:.0f} s")
        if self._held and landed:  # the store answers again: everything held follows, in order
            held, self._held = self._held, []
            for batch in held:
                self._send(batch)
        elif self._held and self._offered is None and now - self._last_offer >= self.resend_every_s:
            self._offered, self._last_offer = self._held.pop(0), now
            self.offers += 1
            self._send(self._offered)
        if self._behind_since is not None and not self.pending:
            self.say(f"raydino: MLflow at {self.uri} has caught up: every metric point held is in the store "
                     f"({now - self._behind_since:.0f} s after it fell behind)")
            self._behind_since = None

    def _fall_behind(self, why: str) -> None:
        if self._behind_since is None:
            self._behind_since = time.monotonic()
            self.say(f"raydino: warning: tracking is behind: MLflow at {self.uri}: {why}; training goes on, the "
                     "metrics wait in memory and are sent when it answers")

    def close(self, timeout_s: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout_s`` for every pending batch (offering held ones again as ``poll`` does, every
        ``CLOSING_RESEND_S`` at most: no step is left to spare the requests for, and a store that is back
        should not wait a whole ``resend_every_s`` for the end of a run); returns the records still unsent
        (``{"metric", "value", "timestamp", "step"}`` or ``{"tag", "value"}``)."""
        deadline = time.monotonic() + timeout_s
        self.resend_every_s = min(self.resend_every_s, CLOSING_RESEND_S)
        self.poll()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.1)
            self.poll()
        return [record for batch in sorted(self._in_flight + self._held, key=lambda b: b.seq) for record in batch.records()]


UNSENT_FORMAT = "raydino-unsent-metrics/1"


def unsent_text(uri: str, run_id: str, records: list[dict[str, Any]]) -> str:
    """JSON lines: a header naming the store and the run, then one record per point or tag (``BackgroundLogger.close``)."""
    header = {"format": UNSENT_FORMAT, "tracking_uri": uri, "run_id": run_id}
    return "".join(json.dumps(line) + "\n" for line in [header, *records])


def replay_unsent(text: str, uri: str | None = None) -> tuple[str, str, int]:
    """Send a file of ``unsent_text`` to its run (in the store it names, or ``uri``); returns (uri, run_id,
    records sent). Sending a point twice is harmless: MLflow's stores keep one per (key, step, time, value)."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not lines or lines[0].get("format") != UNSENT_FORMAT:
        raise TrackingError(f"not a file of unsent raydino metrics (its first line is not a {UNSENT_FORMAT} header)")
    header, records = lines[0], lines[1:]
    uri = uri or header["tracking_uri"]
    check_tracking(uri)
    metrics = [Metric(r["metric"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in records if "metric" in r]
    tags = [RunTag(r["tag"], str(r["value"])) for r in records if "tag" in r]
    client = MlflowClient(uri)
    try:
        for batch in _batches(metrics):
            client.log_batch(header["run_id"], metrics=batch)
        if tags:
            client.log_batch(header["run_id"], tags=tags)
    except mlflow.exceptions.MlflowException as exc:  # no such run there, a deleted run, ...
        raise TrackingError(
            f"MLflow at {uri} did not take the points for run {header['run_id']}: {str(exc).splitlines()[0][:300]}; "
            "pass --tracking-uri with the store that holds the run"
        ) from None
    return uri, header["run_id"], len(metrics) + len(tags)


def search_runs(uri: str, experiment: str, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every run of an experiment (or the children of one parent) as flat dicts:
    ``run_id``, ``run_name``, ``status``, ``start_time`` (epoch seconds), ``params.<key>``, ``metrics.<key>``, ``tags.<key>``."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments(max_results=50))
        raise TrackingError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {names or 'none'}")
    query = equals_filter("tags.mlflow.parentRunId", parent_run_id) if parent_run_id else ""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000, page_token=token)
        for run in page:
            if parent_run_id and run.data.tags.get("mlflow.parentRunId") != parent_run_id:
                continue  # a LIKE match (equals_filter)
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


class ImageDataset(MetaDataset):
    """A directory (or URI) of images as an MLflow dataset: metadata only (source, digest, image count in
    the profile); nothing is read or copied. MLflow's MetaDataset has no profile, hence this subclass."""

    def __init__(self, source: Any, name: str, digest: str, profile: Mapping[str, Any]) -> None:
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def dataset_name(location: str) -> str:
    """A short name for a data directory or URI: its last two path components (``imagenet/train``)."""
    parts = [part for part in PurePosixPath(location.split("://", 1)[-1]).parts if part != "/"]
    return "/".join(parts[-2:]) or location


def log_dataset(
    uri: str,
    run_id: str,
    *,
    name: str,
    location: str,
    num_images: int,
    profile: Mapping[str, Any] | None = None,
    context: str = "training",
) -> str:
    """Log a run's data as an MLflow dataset input (the runs table's Dataset column; the run page's
    Datasets): ``location`` (a local path or a URI: ``s3://...``, ``https://...``) as its source, the
    image count and ``profile`` in its profile, and a digest of all three, so runs on the same data
    share a digest. Returns the digest. Logging the same dataset twice (a resumed run) adds nothing."""
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources, both alike
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(location)
    facts = {"num_images": int(num_images), **(profile or {})}
    digest = hashlib.sha256(json.dumps({"location": location, **facts}, sort_keys=True, default=str).encode())
    dataset = ImageDataset(source, name, digest.hexdigest()[:16], facts)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    MlflowClient(uri).log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
    return dataset.digest


def run_datasets(uri: str, run_id: str) -> list[dict[str, Any]]:
    """The run's dataset inputs as dicts: name, digest, source_type, source (the URI), profile, context."""
    out = []
    for item in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs:
        ds = item.dataset
        out.append({
            "name": ds.name, "digest": ds.digest, "source_type": ds.source_type,
            "source": _source_location(ds.source), "profile": json.loads(ds.profile or "{}"),
            "context": next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), None),
        })
    return out


def _source_location(source_json: str) -> str:
    """The URI or URL in a dataset source's JSON (file-system sources say ``uri``, HTTP ones ``url``)."""
    source = json.loads(source_json)
    return source.get("uri") or source.get("url") or source_json


class LoggedBackbone:
    """Where ``log_backbone_model`` put the model: its URI and, when registered, the version."""

    def __init__(self, model_uri: str, registered_name: str | None, version: str | None) -> None:
        self.model_uri, self.registered_name, self.version = model_uri, registered_name, version

    def __repr__(self) -> str:
        registered = f", registered {self.registered_name} v{self.version}" if self.registered_name else ""
        return f"LoggedBackbone({self.model_uri}{registered})"


def log_backbone_model(
    uri: str,
    run_id: str,
    backbone: torch.nn.Module,
    example: np.ndarray,
    *,
    name: str = "teacher_backbone",
    registered_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    step: int = 0,
) -> LoggedBackbone:
    """Log ``backbone`` as an MLflow model of the run, so ``mlflow.pyfunc.load_model``, ``mlflow models``
    and the UI's model pages see it; registered as a new version of ``registered_name`` when given.

    Saved with ``mlflow.pytorch`` as a ``torch.export`` program (MLflow's "pt2": loading it runs no
    pickled code, and needs torch only, not raydino or timm). Signature: float32 (N, C, H, W) images,
    preprocessed as the caller documents in ``metadata``, to float32 (N, D) embeddings; batch and image
    size are free (``example`` is traced with them dynamic, so keep it small: it is stored with the
    model). The run's metrics at ``step`` are linked to the model (the Models tab shows them)."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # Model.log reads the global URI
    from mlflow.types.schema import Schema, TensorSpec

    backbone = backbone.eval()
    example = np.ascontiguousarray(example, dtype=np.float32)
    with torch.no_grad():
        dim = backbone(torch.from_numpy(example)).shape[1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1], -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )
    # Without an active run, MLflow files a logged model under the process's active experiment (the Default
    # one, id 0), not under its source run's: name the run's experiment through MLflow's own variable for
    # the call, so the experiment's Models page and the runs table's Models column show it
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    saved_env = {key: os.environ.get(key) for key in keys}
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        with _use_tracking_uri(uri):
            info = _log_pytorch_model(backbone, name, run_id, signature, example, registered_name, metadata, step)
    finally:  # leaving it, MLflow unsets MLFLOW_TRACKING_URI: put back what the process had
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    return LoggedBackbone(info.model_uri, registered_name, version)


def _log_pytorch_model(
    backbone: torch.nn.Module,
    name: str,
    run_id: str,
    signature: Any,
    example: np.ndarray,
    registered_name: str | None,
    metadata: Mapping[str, Any] | None,
    step: int,
) -> Any:
    import mlflow.pytorch
    import torch

    return mlflow.pytorch.log_model(
        backbone,
        name=name,
        run_id=run_id,
        signature=signature,
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # all a pt2 program needs; no inference run
        registered_model_name=registered_name,
        metadata=dict(metadata or {}),
        step=step,
    )


DEFAULT_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` / ``mlflow server`` listen unless told otherwise."""


def experiment_url(uri: str, run_id: str, *, ui: str = DEFAULT_UI) -> str:
    """The MLflow UI page of the run's experiment, on its runs table (``UI_WORKFLOW_QUERY``). ``uri`` is
    the UI itself when it is a server, else ``ui`` (where ``mlflow ui`` on the store listens by default).
    No search filter in it: switching the workflow type on a first visit drops the other query keys."""
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}?{UI_WORKFLOW_QUERY}"
