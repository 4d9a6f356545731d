"""Rehearse the cluster path on one machine before renting one: your cluster.yaml's node types under
Ray's own autoscaler, a sweep submitted with ``ray job submit`` as docs/scale-out.md says, data at ImageNet's
geometry, the ``imagenet_vit_small`` code path at tiny sizes.

``python -m raydino.commands.rehearsal cluster.yaml`` (or ``make rehearse``):

1. derives a ``fake_multinode`` autoscaling config from ``cluster.yaml``: the same node types with
   the same custom resources and worker limits, CPU counts shrunk to fit this machine, each GPU a
   custom resource ``gpu_standin`` (no GPUs here: trials run with ``scaling.use_gpu=false``);
2. writes it where ``ray up`` would, ``~/ray_bootstrap_config.yaml`` of the (fake) head, and starts
   the head as ``ray up`` does, ``ray start --head --autoscaling-config=...`` with
   ``RAY_FAKE_CLUSTER=1`` (Ray's documented way for ``fake_multinode``; ``ray up`` itself only
   drives the Docker variant, ``fake_multinode_docker``, which needs Docker): Ray's real monitor
   and autoscaler add and remove nodes as local raylets;
3. submits a DINO-vMF sweep (``sweeps/kappa_ablation.py``, probability centering with vMF; two
   trials, ``--seeds`` to change) with ``ray job submit`` (without the ``--working-dir`` a real cluster
   takes: the fake nodes share this disk); the trials wait as PENDING until nodes come up;
4. reads back what happened: job status, nodes added and when, where the crop actors ran, the
   MLflow parent and child runs; then stops every process of the rehearsal cluster (by an
   environment marker, and their descendants: ``ray stop`` would stop every Ray on the machine).

No Ray import at module level: the driver here is the ``ray`` CLI, as for a user.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

GPU_STANDIN = "gpu_standin"
FAKE_HEAD_TYPE = "ray.head.default"
"""The fake provider registers its head under this type name, whatever the config calls it."""
REPO = Path(__file__).resolve().parents[2]
MARKER = "RAYDINO_REHEARSAL"
EXPERIMENT = "rehearsal"


class RehearsalError(RuntimeError):
    """The rehearsal found a problem; the message says what and where the logs are."""


def derive_fake_cluster(
    cluster: dict[str, Any], gcs_address: str, cpus_per_node: int = 2, max_workers_per_type: int = 2
) -> dict[str, Any]:
    """A ``fake_multinode`` autoscaling config with ``cluster``'s node types: resources kept by name,
    CPU and custom counts capped at ``cpus_per_node``, each node's GPUs one ``gpu_standin``, worker
    limits capped at ``max_workers_per_type``; the head keeps its (usually zero) CPU."""
    head = cluster["head_node_type"]
    types: dict[str, Any] = {}
    for name, node in cluster["available_node_types"].items():
        if name == head:
            name = FAKE_HEAD_TYPE
        resources: dict[str, float] = {}
        for key, value in (node.get("resources") or {}).items():
            if key == "GPU":
                resources[GPU_STANDIN] = 1
            elif name == FAKE_HEAD_TYPE:
                resources[key] = value
            else:
                resources[key] = min(value, cpus_per_node)
        limit = 0 if name == FAKE_HEAD_TYPE else min(node.get("max_workers", 0), max_workers_per_type)
        types[name] = {"resources": resources, "node_config": {}, "max_workers": limit,
                       "min_workers": 0 if name == FAKE_HEAD_TYPE else min(node.get("min_workers", 0), limit)}
    return {
        "cluster_name": f"{cluster.get('cluster_name', 'raydino')}-rehearsal",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        # cluster.yaml's: a shorter one would stop idle nodes mid-sweep, and here (every fake node on one
        # disk, one session directory) a stopping node deletes the job's unpacked working_dir under it
        "idle_timeout_minutes": cluster.get("idle_timeout_minutes", 5),
        "upscaling_speed": 1.0,
        # as Ray's own fake-multinode example: nodes are local raylets, no SSH updaters, no launch-config
        # hashes, and node ids stand for IPs (every fake node has this machine's IP)
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def imagenet_geometry_jpegs(root: Path, per_class: int, seed: int = 0) -> Path:
    """JPEGs of ImageNet's typical geometry (333-427 x 440-560 px, a quarter portrait, quality 90),
    cut from real photos (scikit-learn's two sample images, one class each), in ``root/<class>/``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]  # 427 x 640
        for i in range(per_class):
            h, w = int(rng.integers(333, 428)), int(rng.integers(440, 561))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crop = photo[top : top + h, left : left + w]
            if i % 4 == 3:
                crop = crop.transpose(1, 0, 2)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{name}_{i:04d}.jpg", quality=90)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_processes(marker: str) -> list[Any]:
    """The processes carrying ``marker`` and their descendants: Ray retitles some of its processes over the
    memory that held their environment (the head's dashboard agent), so the marker cannot be read there; left
    behind, that agent spins a core at 100% once its raylet is gone."""
    import psutil

    found: dict[int, Any] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARKER) == marker:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())


def _alive(proc: Any) -> bool:
    """Running and not a zombie (a killed process its parent has not reaped yet is gone for our purpose)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class FakeCluster:
    """A fake-multinode autoscaling Ray cluster on this machine, every process marked for teardown."""

    workdir: Path
    cluster: dict[str, Any]
    marker: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)

    @property
    def home(self) -> Path:
        return self.workdir / "head-home"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def temp_dir(self) -> Path:
        return Path("/tmp") / f"rdr-{self.marker}"  # short: Ray's socket paths must stay under 107 bytes

    def env(self) -> dict[str, str]:
        """What the head starts with: HOME holding ray_bootstrap_config.yaml (as on a ``ray up`` head),
        this Python's bin first on PATH (the job's ``python``), the fake-cluster switch and the marker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update({
            "HOME": str(self.home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", MARKER: self.marker,
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, timeout: float = 120.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        from ray.util import get_node_ip_address

        config = derive_fake_cluster(self.cluster, f"{get_node_ip_address()}:{self.gcs_port}")
        (self.home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        head = config["available_node_types"][config["head_node_type"]]["resources"]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.gcs_port}",
               f"--num-cpus={int(head.get('CPU', 0))}", "--num-gpus=0",
               f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               # ports of its own: another Ray on this machine (a test session's) holds the defaults
               *(f"--{flag}={_free_port()}" for flag in (
                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
                   "runtime-env-agent-port", "metrics-export-port")),
               "--autoscaling-config=~/ray_bootstrap_config.yaml"]
        log = (self.workdir / "ray-start.log").open("w")
        subprocess.run(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout,
                       start_new_session=True)

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGKILL every process carrying this cluster's marker and their descendants, until none is left
        (each found before its parent dies: an orphan's parent is init); the pids killed."""
        import psutil

        killed: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while True:
            for proc in _marked_processes(self.marker):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                killed[proc.pid] = proc
            left = [p for p in killed.values() if _alive(p)]
            if not left:
                break
            if time.monotonic() > deadline:
                raise RehearsalError(f"{len(left)} rehearsal process(es) survived SIGKILL for {timeout:.0f} s")
            time.sleep(0.5)
        logs = self.workdir / "ray-logs"  # kept for reading after the cluster is gone
        shutil.rmtree(logs, ignore_errors=True)
        for session in self.temp_dir.glob("session_2*"):
            shutil.copytree(session / "logs", logs / session.name, dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return sorted(killed)

    def monitor_log(self) -> str:
        path = self.temp_dir / "session_latest" / "logs" / "monitor.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def sweep_command(data: Path, storage: Path, tracking_uri: str, name: str, seeds: int = 2) -> list[str]:
    """README's cluster sweep at rehearsal sizes: the imagenet_vit_small preset, one DINO-vMF arm
    (probability centering, auto) with ``seeds`` seeds (a trial each, on a GPU node each); only sizes and
    counts overridden, plus what no GPU forces (``scaling.use_gpu=false``, the stand-in resource per worker)."""
    return [
        "python", str(REPO / "sweeps" / "kappa_ablation.py"), "--preset", "imagenet_vit_small", "--data", str(data),
        "--methods", "dino-vmf", "--prototypes", "unnormalised", "--centerings", "auto", "--seeds", str(seeds),
        "--epochs", "1", "--name", name, "--experiment", EXPERIMENT, "--storage", str(storage), "--tracking-uri", tracking_uri,
        "--out", str(storage.parent / "report"),
        "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
        f"scaling.resources_per_worker={{{GPU_STANDIN}: 1}}",
        "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0", "head.num_prototypes=1024",
        "data.batch_size_per_worker=2", "data.max_files=4", "data.crop_batch_size=4",
        "data.crop_actors_per_worker=[1, 2]", "data.crop_actor_resources={data_node: 1}",
        "eval.max_images=16",
    ]


@dataclass
class RehearsalReport:
    seconds: float
    job_status: str
    nodes: list[dict[str, Any]]
    """Worker nodes the autoscaler started: type (by resources), start time (s after submission)."""
    crop_actor_nodes: list[str]
    """The node type of every multi-crop actor that was placed."""
    crop_actors_never_placed: int
    """Actors the autoscaling pool asked for that got no node before the sweep ended."""
    runs: dict[str, str]
    """MLflow run name -> status (parent and children)."""
    trial_starts: list[float]
    """Child runs' start times, s after submission."""
    autoscaler_lines: list[str]
    job_log_tail: str
    crop_pool_lines: list[str] = field(default_factory=list)
    """Each trial's "multi-crop used N actor(s) (pool lo..hi), R images/s per busy actor" line."""
    marker: str = ""
    """The environment marker of the rehearsal cluster's processes."""
    processes_stopped: list[int] = field(default_factory=list)
    """The pids of the cluster's processes, SIGKILLed at the end."""

    def lines(self) -> list[str]:
        out = [f"rehearsal: job {self.job_status} in {self.seconds:.0f} s"]
        out += [f"  node {n['type']} up at {n['start_s']:.0f} s" for n in self.nodes]
        out += [f"  trial started at {t:.0f} s" for t in self.trial_starts]
        out.append(f"  crop actors on: {', '.join(sorted(set(self.crop_actor_nodes))) or 'none seen'} "
                   f"({len(self.crop_actor_nodes)} placed, {self.crop_actors_never_placed} requested but never placed)")
        out += [f"  {line}" for line in self.crop_pool_lines]
        out += [f"  MLflow {name}: {status}" for name, status in sorted(self.runs.items())]
        out += [f"  autoscaler: {line}" for line in self.autoscaler_lines]
        return out


def _node_type(resources: dict[str, float], cluster: dict[str, Any]) -> str:
    for name, node in cluster["available_node_types"].items():
        wanted = {GPU_STANDIN if k == "GPU" else k for k in (node.get("resources") or {}) if k != "CPU"}
        if wanted and wanted <= set(resources):
            return name
    return "head" if not resources.get("CPU") else "unknown"


def _ray(cluster: FakeCluster, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**cluster.env(), "HOME": os.environ.get("HOME", str(cluster.home))}  # the user's CLI, not the head
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True, text=True,
                          check=False,
                          timeout=timeout, cwd=REPO)


def rehearse(
    cluster_yaml: Path, workdir: Path, per_class: int = 100, timeout: float = 1200.0, seeds: int = 2
) -> RehearsalReport:
    """Run the rehearsal (see the module docstring) with ``seeds`` trials; RehearsalError if the job did not
    succeed."""
    cluster = yaml.safe_load(Path(cluster_yaml).read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "imagenet"
    if not (data / "train").is_dir():
        imagenet_geometry_jpegs(data / "train", per_class, seed=0)
        imagenet_geometry_jpegs(data / "val", max(per_class // 5, 4), seed=1)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    fake = FakeCluster(workdir, cluster)
    started = time.monotonic()
    submitted_at = time.time()
    try:
        fake.start()
        job_id = f"rehearsal-{fake.marker}"
        command = sweep_command(data / "train", workdir / "runs", tracking_uri, "rehearsal", seeds)
        agent_deadline = time.monotonic() + 120
        while True:  # a fresh head takes some seconds before its job agent accepts submissions
            # no --working-dir here, unlike on a real cluster: fake nodes share one disk and one session
            # directory, and each new node's runtime-env agent re-extracts the package into the same path,
            # deleting the directory the job's driver runs in; the code is on this disk anyway
            submit = _ray(fake, "job", "submit", "--address", fake.dashboard, "--submission-id", job_id,
                          "--no-wait", "--", *command, timeout=300)
            if "No available agent" not in submit.stderr + submit.stdout or time.monotonic() > agent_deadline:
                break
            time.sleep(2)
        if submit.returncode != 0:
            raise RehearsalError(f"ray job submit failed: {submit.stdout[-2000:]}{submit.stderr[-2000:]}")
        status = _wait_for_job(fake, job_id, started + timeout)
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(fake.dashboard).get_job_logs(job_id)
        report = RehearsalReport(
            seconds=time.monotonic() - started, job_status=status, job_log_tail=logs[-4000:], marker=fake.marker,
            crop_pool_lines=sorted({re.sub(r"^\(\w+ pid=\d+\)\s*", "", re.sub(r"\x1b\[[0-9;]*m", "", line)).strip()
                                    for line in logs.splitlines() if "multi-crop used" in line}),
            **_cluster_facts(fake, cluster, submitted_at), **_mlflow_facts(tracking_uri, submitted_at),
            autoscaler_lines=[line.strip() for line in fake.monitor_log().splitlines()
                              if "Adding" in line or "Removing" in line or "launching" in line.lower()][:20],
        )
    finally:
        stopped = fake.stop()
    report.processes_stopped = stopped
    if report.job_status != "SUCCEEDED":
        raise RehearsalError(f"the sweep job ended {report.job_status}:\n{report.job_log_tail}")
    return report


def _wait_for_job(fake: FakeCluster, job_id: str, deadline: float) -> str:
    """The job's final status (Ray's job SDK), or TIMEOUT after stopping it at ``deadline``."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(fake.dashboard)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return f"TIMEOUT (was {status.value})"
        time.sleep(1)  # one small request to the head's dashboard a second
        status = client.get_job_status(job_id)
    return JobStatus(status).value


def _cluster_facts(fake: FakeCluster, cluster: dict[str, Any], since: float) -> dict[str, Any]:
    from ray.util.state import list_actors, list_nodes

    nodes = list_nodes(address=fake.dashboard, detail=True, limit=1000, raise_on_missing_output=False)
    type_of = {n.node_id: _node_type(n.resources_total or {}, cluster) for n in nodes}
    workers = sorted(
        ({"type": type_of[n.node_id], "start_s": n.start_time_ms / 1000 - since} for n in nodes if not n.is_head_node),
        key=lambda n: n["start_s"],
    )
    actors = list_actors(address=fake.dashboard, detail=True, limit=10000, raise_on_missing_output=False)
    # Ray Data names its actor-pool workers MapWorker(<operator>): MapWorker(MapBatches(MultiCropStage))
    crop = [a for a in actors if "MultiCropStage" in (a.class_name or "")]
    return {"nodes": workers, "crop_actor_nodes": [type_of.get(a.node_id, "unknown") for a in crop if a.node_id],
            "crop_actors_never_placed": sum(1 for a in crop if not a.node_id)}


def _mlflow_facts(tracking_uri: str, since: float) -> dict[str, Any]:
    from raydino.tracking import search_runs

    runs = search_runs(tracking_uri, EXPERIMENT)
    children = [r for r in runs if r.get("tags.raydino.role") != "parent"]
    return {
        "runs": {r["run_name"]: r["status"] for r in runs},
        "trial_starts": sorted(r["start_time"] - since for r in children),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cluster_yaml", nargs="?", default=str(REPO / "cluster.yaml"))
    parser.add_argument("--workdir", default="rehearsal", help="data, MLflow store and checkpoints (default ./rehearsal)")
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before the job is stopped")
    parser.add_argument("--seeds", type=int, default=2, help="trials of the sweep, one GPU node each (default 2)")
    args = parser.parse_args(argv)
    try:
        report = rehearse(Path(args.cluster_yaml), Path(args.workdir).resolve(), args.images_per_class, args.timeout,
                           args.seeds)
    except RehearsalError as exc:
        print(f"raydino: rehearsal failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    print(json.dumps({"seconds": report.seconds, "nodes": report.nodes}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
