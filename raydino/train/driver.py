"""The driver of a pretraining run: Ray, the Ray Data pipeline, one TorchTrainer, its result.

Takes a ``RunPlan`` (run name, storage, tracking resolved and checked by ``pretrain``);
a dataset smaller than one batch fails here, before the first worker starts.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raydino.config import Config
from raydino.data.catalog import source_from_config
from raydino.data.clock import start_crop_meter, start_epoch_clock
from raydino.data.eval_data import load_eval_data
from raydino.data.pipeline import epoch_stream, multicrop_dataset
from raydino.eval.data import EvalData
from raydino.launch.capacity import cluster_capacity, fit_verdict
from raydino.launch.plan import RunPlan, last_complete_checkpoint
from raydino.step import TrainingDiverged
from raydino.stores.run_storage import is_remote, join_storage, ray_storage, resolve_storage
from raydino.train.entry import train_loop
from raydino.train.stream import WorkerPlan, download_checkpoint


class PretrainError(RuntimeError):
    """A run that could not start or did not finish; the message says why and what to do."""


@dataclass
class TrainResult:
    """What the fit produced: the latest checkpoint as a local directory, and the last report."""

    checkpoint_dir: Path | None
    """Local: the checkpoint in storage itself; remote storage: a downloaded copy."""
    local_run_dir: Path
    """A local directory of the run for files such as the exported backbone."""
    steps: int
    metrics: dict[str, float]
    skipped_images: int
    eval_data: EvalData | None = None
    crop_stats: dict[str, float] = field(default_factory=dict)
    """``CropMeter.summary()``: actors the multi-crop pool used, images per second per busy actor."""
    """The evaluation arrays the workers used, loaded once per run: the final evaluation reuses them."""


def _crop_summary(meter: Any) -> dict[str, float]:
    """The crop meter's totals; {} if it cannot answer within 30 s (a statistic must not fail a run)."""
    try:
        return ray.get(meter.summary.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a lost meter costs a log line, never the run
        return {}


def required_cpus(cfg: Config) -> float:
    """Logical CPUs a run needs to start: train workers + the crop pool's minimum + one for reading/decoding
    (an autoscaling pool grows into whatever else the cluster has or adds)."""
    train = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    return train + cfg.crop_pool()[0] * cfg.data.cpus_per_crop_actor + 1


def stream_passes(epochs: int) -> int:
    """Passes over the source to stream for ``epochs`` epochs of steps, with slack.

    Steps per epoch come from the files listed; files that turn out undecodable are
    skipped, so a pass can hold fewer rows. The spare passes (one, plus one per eight
    epochs) absorb 10% of the files skipped; passes nobody reads are never computed.
    """
    return epochs + 1 + epochs // 8


PRIVATE_INSTANCE = "raydino_private_instance"
"""A custom resource a Ray started by ``ensure_ray`` declares: another run on the same machine sees it
and starts a Ray of its own instead of joining one sized for somebody else (which deadlocks both)."""


def needed_resources(cfg: Config) -> dict[str, float]:
    """What one run holds at once: train workers (with their GPUs and custom resources), the crop
    pool's minimum and a reader (``required_cpus``)."""
    needs = {"CPU": required_cpus(cfg), "GPU": float(cfg.scaling.num_workers if cfg.scaling.use_gpu else 0)}
    for key, value in cfg.scaling.resources_per_worker.items():
        needs[key] = needs.get(key, 0.0) + value * cfg.scaling.num_workers
    for key, value in cfg.data.crop_actor_resources.items():
        needs[key] = needs.get(key, 0.0) + value * cfg.crop_pool()[0]
    return needs


def _join_cluster() -> bool:
    """Join a cluster started on this machine with ``ray start`` / ``ray up``; never another run's private Ray."""
    try:
        ray.init(address="auto", log_to_driver=True, logging_level="WARNING")
    except ConnectionError:
        return False
    if ray.cluster_resources().get(PRIVATE_INSTANCE):
        ray.shutdown()
        return False
    return True


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


PRIVATE_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}
"""A private Ray keeps an idle task worker for 5 minutes, not Ray's 1 s: a run starts ~10 actors beside its
tasks, so the task workers are over Ray's soft limit (the CPU count) and were killed between Ray Data's
stages; each new one costs ~1 s of CPU. A sweep's next trial reuses them: on 2 cores a tiny trial took
17 s instead of 27 (2026-12-05). Memory: a few idle processes for minutes on one machine."""


def ensure_ray(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Connect to RAY_ADDRESS or to a cluster started on this machine (``ray start``); else start a
    private Ray sized for this run, which later runs on this machine do not join.

    Logical CPUs are bookkeeping: on a small machine we declare enough for the run to
    schedule (an under-sized cluster hangs silently instead of failing); ``extra_cpus``
    is what else must fit beside one run (a sweep's trial driver). A run that needs GPUs this
    machine lacks fails here, before Ray starts.
    """
    if ray.is_initialized():
        return
    own = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # the token-auth notice, every start
    try:
        _start_or_join(cfg, extra_cpus)
        _filter_ray_console()
    finally:  # ray.init sets SIGTERM to sys.exit, which aborts a driver blocked in fit (rc 134, a C++ dump)
        if callable(own):
            signal.signal(signal.SIGTERM, own)


def _start_or_join(cfg: Config, extra_cpus: float) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
        quiet_ray_data()
        return
    if _join_cluster():
        quiet_ray_data()
        return
    gpus, local = needed_resources(cfg)["GPU"], _local_gpus()
    if gpus > local:
        raise PretrainError(
            f"scaling.use_gpu=true asks for {gpus:g} GPU(s) ({cfg.scaling.num_workers} workers), but this machine has "
            f"{local} and no Ray cluster is running here to add them; set scaling.use_gpu=false to train on "
            "CPU, or start the run on a GPU cluster (`ray up cluster.yaml`, then RAY_ADDRESS or `ray job submit`)"
        )
    num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(cfg) + extra_cpus))
    ray.init(address="local", num_cpus=num_cpus, resources={PRIVATE_INSTANCE: 1}, log_to_driver=True,
             configure_logging=True, logging_level="WARNING", _system_config=PRIVATE_RAY_SYSTEM_CONFIG)
    quiet_ray_data()


RAY_NOISE = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
    r"|site-packages/ray/.*(Deprecation|Future)Warning"
    r"|^\s+self\.exclude_resources = exclude_resources$"
    r"|^Progress bars disabled\."
    r"|PYTHON worker processes have been started on node"
)
"""Lines of Ray internals that every run prints and that read as errors: known and harmless here."""


def _without_noise(print_lines: Callable[..., None]) -> Callable[..., None]:
    def filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = [line for line in data.get("lines", []) if not RAY_NOISE.search(str(line))]
        if lines:
            print_lines({**data, "lines": lines}, *args, **kwargs)

    filtered.raydino_filter = True  # type: ignore[attr-defined]
    return filtered


def _filter_ray_console() -> None:
    """Keep RAY_NOISE out of the console; the workers' and raylet's log files (``ray logs``) keep every line.

    Ray prints forwarded worker output (``log_to_driver``) through the handler ``ray_print_logs`` of its
    stdstream dispatcher and the raylet's warnings through ``print_to_stdstream``: both are wrapped in a
    filter. These are Ray internals: if they change, the lines simply show again."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not getattr(ray_worker.print_to_stdstream, "raydino_filter", False):
        ray_worker.print_to_stdstream = _without_noise(ray_worker.print_to_stdstream)
    handlers = dict(dispatcher.handlers)
    printer = handlers.get("ray_print_logs")
    if printer is not None and not getattr(printer, "raydino_filter", False):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _without_noise(printer))


def mute_worker_logs() -> None:
    """Stop forwarding worker output to this console (a run being stopped: what its workers print while
    Ray tears them down reads as a crash). Their log files keep it."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    dispatcher.remove_handler("ray_print_logs")


def check_cluster_fits(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Compare what the run needs with what the cluster has free, has, and can grow to: more than it
    can ever hold fails now; a shortfall that nodes or other jobs may clear is said, and is bounded by
    ``scaling.start_timeout_s`` (Ray Train's worker-group start retries, Ray Data's wait for the crop
    pool's minimum)."""
    needs = needed_resources(cfg)
    total = ray.cluster_resources()
    verdict, message = fit_verdict(needs, ray.available_resources(), total, cluster_capacity(total))
    if verdict == "never":
        raise PretrainError(
            f"{message}; lower scaling.num_workers or the crop pool (data.num_crop_actors, "
            "data.crop_actors_per_worker), set scaling.use_gpu=false, or add node types (cluster.yaml) that provide them"
        )
    if verdict == "wait":
        log(f"raydino: {message}; it gives up after scaling.start_timeout_s={cfg.scaling.start_timeout_s:g} s")


def prepare_cluster(cfg: Config, log: Callable[[str], None] = print, extra_cpus: float = 0.0) -> None:
    """Ray connected or started (``ensure_ray``), the run checked against the cluster, and Ray Data's wait
    for crop actors bounded: all before any MLflow run is created, so a run that cannot start leaves none."""
    ensure_ray(cfg, extra_cpus)
    check_cluster_fits(cfg, log)
    quiet_ray_data(cfg.scaling.start_timeout_s)


def start_attempts(cfg: Config) -> int:
    """Ray Train retries of starting the worker group (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
    60 s by default) that fit in ``scaling.start_timeout_s``: a run never waits for workers forever."""
    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    return max(0, math.ceil(cfg.scaling.start_timeout_s / per_try) - 1)


def quiet_ray_data(wait_for_actors_s: float | None = None) -> None:
    """One progress line per epoch from us instead of Ray Data's per-operator bars; with
    ``wait_for_actors_s``, Ray Data fails instead of waiting forever for the crop pool's minimum."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if wait_for_actors_s is not None:
        context.wait_for_min_actors_s = math.ceil(wait_for_actors_s)


def _root_cause(exc: BaseException) -> BaseException:
    """The first worker's exception inside Ray's wrappers, when there is one."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return getattr(inner, "cause", None) or inner.__cause__ or inner
    return exc


def _diverged_message(exc: BaseException) -> str | None:
    """The TrainingDiverged message a worker raised, from the exception or its traceback text."""
    root = _root_cause(exc)
    if isinstance(root, TrainingDiverged):
        return str(root)
    match = re.search(r"TrainingDiverged: (.+)", str(exc)) or re.search(r"TrainingDiverged: (.+)", str(root))
    return match.group(1) if match else None


_STORAGE_ERRNOS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EROFS: "is read-only",
                   errno.EACCES: "is not writable", errno.EPERM: "is not writable"}


def storage_failure_message(exc: BaseException, plan: RunPlan) -> str | None:
    """A checkpoint the run could not write (a full, read-only or forbidden storage): one line with the path,
    the last good checkpoint (complete in storage, see ``checkpoint_complete``) and how to go on."""
    root = _root_cause(exc)
    what = _STORAGE_ERRNOS.get(getattr(root, "errno", None))
    if not isinstance(root, OSError) or what is None:
        return None
    last = last_complete_checkpoint(plan.run_dir)
    good = f"the last good checkpoint is {last.uri}" if last is not None else "it has no complete checkpoint yet"
    return (
        f"checkpoint storage {plan.run_dir} {what} ({os.strerror(root.errno)}): the run stopped at its next "
        f"checkpoint; {good}. Free space there (or move the run directory to checkpoint.storage_path elsewhere) "
        f"and run again with tracking.run_name={plan.run_name} to resume from it"
    )


def _start_timeout_message(exc: BaseException, cfg: Config) -> str | None:
    """Ray Train's worker-group start or Ray Data's crop-actor start that ran out of
    ``scaling.start_timeout_s``: what the run needed and what the cluster had free when it gave up."""
    text = f"{type(exc).__name__} {exc} {type(_root_cause(exc)).__name__} {_root_cause(exc)}"
    if "WorkerGroupStartupTimeoutError" not in text and "Timed out while starting actors" not in text \
            and "worker group startup timed out" not in text:
        return None
    needs = needed_resources(cfg)
    free = ray.available_resources()
    what = ", ".join(f"{v:g} {k} (free: {float(free.get(k, 0.0)):g})" for k, v in needs.items() if v > 0)
    return (
        f"the cluster did not give this run its train workers and crop actors within "
        f"scaling.start_timeout_s={cfg.scaling.start_timeout_s:g} s; it needs {what}. Wait for other jobs to end, "
        "lower scaling.num_workers or the crop pool (data.num_crop_actors), or raise scaling.start_timeout_s"
    )


def build_trainer(
    cfg: Config, dataset: ray.data.Dataset, plan: WorkerPlan, run_config: ray.train.RunConfig
) -> TorchTrainer:
    """The TorchTrainer for ``train_loop_per_worker`` with the config's scaling (gloo on CPU, NCCL on GPU).
    The driver keeps the plan's object reference alive for as long as the trainer fits."""
    return TorchTrainer(
        train_loop,  # an entry point that imports nothing: the controller unpickles it (raydino.train.entry)
        train_loop_config={"plan": ray.put(plan)},  # an object reference: the workers fetch it
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=run_config,
        datasets={"train": dataset},
    )


def _local_checkpoint(checkpoint: ray.train.Checkpoint | None, storage: str, local_run_dir: Path) -> Path | None:
    """The checkpoint as a local directory: itself on local storage, a download from remote storage."""
    if checkpoint is None:
        return None
    if not is_remote(storage):
        return Path(checkpoint.path)
    return download_checkpoint(checkpoint, local_run_dir / Path(checkpoint.path).name)


def newest_checkpoint(plan: RunPlan, storage_path: str, filesystem: Any) -> ray.train.Checkpoint | None:
    """The run's newest complete checkpoint in storage (its manifest's files all there at full size), whether
    or not Ray Train recorded it; None for a run without one. Workers restore from it only when Ray offers none."""
    folder = last_complete_checkpoint(plan.run_dir)
    if folder is None:
        return None
    return ray.train.Checkpoint(path=join_storage(storage_path, plan.run_name, folder.name), filesystem=filesystem)


def run_pretraining(
    plan: RunPlan,
    *,
    log: Callable[[str], None] = print,
    run_callbacks: list[Any] | None = None,
    on_source: Callable[[int], None] | None = None,
) -> TrainResult:
    """Fit one TorchTrainer for ``plan``; it resumes when a run of the same name exists in storage.

    ``on_source`` is called with the number of training images as soon as the source is listed
    (``pretrain`` logs the run's MLflow dataset input with it, before training starts)."""
    cfg = plan.cfg
    ensure_ray(cfg)
    quiet_ray_data(cfg.scaling.start_timeout_s)
    source = source_from_config(cfg.data, "train", cfg.seed)
    if on_source is not None:
        on_source(source.num_files)
    world = cfg.scaling.num_workers
    steps_per_epoch = source.num_files // world // cfg.data.batch_size_per_worker
    if steps_per_epoch < 1:
        raise PretrainError(
            f"the dataset has {source.num_files} images, fewer than one global batch "
            f"({world} workers x data.batch_size_per_worker={cfg.data.batch_size_per_worker}); "
            "lower data.batch_size_per_worker or scaling.num_workers"
        )
    clock = start_epoch_clock()
    meter = start_crop_meter()
    dataset = multicrop_dataset(
        # in-memory rows cannot turn out undecodable: only file sources need spare passes
        epoch_stream(
            source.dataset,
            cfg.optim.epochs if source.in_memory else stream_passes(cfg.optim.epochs),
            cfg.seed if source.in_memory else None,
            source.pass_dataset,
        ),
        cfg.data.crops,
        cfg.seed,
        cfg.crop_pool(),
        cfg.data.crop_batch_size,
        cpus_per_actor=cfg.data.cpus_per_crop_actor,
        actor_resources=cfg.data.crop_actor_resources,
        epoch_clock=clock,
        meter=meter,
    )
    eval_data = load_eval_data(cfg)  # once per run: the final evaluation gets it from TrainResult
    storage_path, storage_filesystem = ray_storage(plan.storage)
    worker_plan = WorkerPlan(cfg, steps_per_epoch, clock, eval_data, plan.tracking_uri, plan.mlflow_run_id,
                             resume_from=newest_checkpoint(plan, storage_path, storage_filesystem), run_dir=plan.run_dir,
                             run_dir_location=(join_storage(storage_path, plan.run_name), storage_filesystem),
                             tracking_env={k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})
    trainer = build_trainer(
        cfg,
        dataset,
        worker_plan,
        ray.train.RunConfig(
            name=plan.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=ray.train.FailureConfig(
                max_failures=plan.max_failures, controller_failure_limit=start_attempts(cfg),
                max_preemption_failures=cfg.checkpoint.max_preemptions,
            ),
            callbacks=run_callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our epoch lines, not per-report INFO
        ),
    )
    log(
        f"raydino: run {plan.run_name!r}: {cfg.model.name}, {source.num_files} images, {world} workers x "
        f"{cfg.data.batch_size_per_worker}, {steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs; "
        f"checkpoints in {plan.run_dir}"
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        mute_worker_logs()  # the workers' dying tracebacks belong in their log files, not under the stop line
        raise
    except Exception as exc:  # Ray wraps worker errors; surface the one the user can act on
        root = _root_cause(exc)
        storage = storage_failure_message(exc, plan)
        if storage is not None:
            raise PretrainError(f"training failed: {storage}") from exc
        message = (_diverged_message(exc) or _start_timeout_message(exc, cfg)
                   or f"{type(root).__name__}: {str(root)[-2000:]}")
        raise PretrainError(f"training failed: {message}\n(full logs: {plan.run_dir})") from exc
    finally:
        crops = _crop_summary(meter)
        ray.kill(clock)
        ray.kill(meter)
    low, high = cfg.crop_pool()
    log(
        f"raydino: multi-crop used {crops.get('crop_actors_used', 0):.0f} actor(s) (pool {low}..{high}), "
        f"{crops.get('crop_images_per_second_per_actor', 0):.0f} images/s per busy actor"
    )
    if result.error is not None:
        raise PretrainError(f"training failed: {result.error}")
    # exports and downloaded checkpoints of a run on remote storage go to the local default storage
    local_run_dir = Path(join_storage(resolve_storage(None), plan.run_name) if is_remote(plan.storage) else plan.run_dir)
    local_run_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(result.metrics or {})
    return TrainResult(
        checkpoint_dir=_local_checkpoint(result.checkpoint, plan.storage, local_run_dir),
        local_run_dir=local_run_dir,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        skipped_images=source.skipped.count(),
        crop_stats=crops,
        eval_data=eval_data,
    )
