"""A pretraining run on a simulated multi-node cluster (``ray.cluster_utils.Cluster``), in its own process.

Run by tests/test_multinode.py: a test process holds the session's single-node Ray, and a
process can join only one Ray. Layout, as cluster.yaml's node types: a head with no CPU
for tasks, "train" nodes (one ``train_node`` resource each, standing in for a GPU node), and
a CPU-only "data" node (``data_node``) for the multi-crop actors. Each train node has its own fake EC2
metadata service (tests/fake_imds.py, named by AWS_EC2_METADATA_SERVICE_ENDPOINT in the node's environment,
as 169.254.169.254 is per instance). After the first checkpoint, one train worker's node gets a spot
interruption notice; once the run has checkpointed for it, the node is removed without grace (the
restart costs about a minute on 2 cores) and Ray Train restarts the workers from that checkpoint.
Prints one JSON line: placement, the fault, steps, history.

    python tests/multinode_job.py WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
import ray._private.state as ray_state
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's tests package

from raydino.config import load_config
from raydino.pretrain import pretrain
from raydino.train.driver import quiet_ray_data
from tests.fake_imds import FakeIMDS
from tests.tiny import TINY_RUN

BATCH = 4
"""Images per worker and step: 168 steps an epoch, ~0.05 s each alone. With 32 (21 steps) the notice's
checkpoint came at step 8 alone and at 17 once on a loaded machine, and the run ended before this job, seeing
that checkpoint, had removed the node: nothing resumed. With 8 (84 steps), alone: checkpoint at step 20, the
node gone at step ~43, so about half the epoch was left; the lag in steps doubled under load once."""
TINY = [
    *TINY_RUN,
    f"data.batch_size_per_worker={BATCH}",
    "data.crop_batch_size=32",
    "eval.every_epochs=0",
    "tracking.log_every_steps=1",
    "scaling.num_workers=2",
    "scaling.resources_per_worker={train_node: 1}",
    "scaling.placement_strategy=SPREAD",
    "data.crop_actor_resources={data_node: 1}",
    "checkpoint.every_steps=0",  # at the epoch's end only: the notice's checkpoint is the one mid-epoch checkpoint
    "checkpoint.notice_poll_s=0.5",
]
NODE_DEATH_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
NOTICE_S = 20  # the notice's deadline: Ray Train stops waiting for the preempted workers then and restarts


def _actors(class_fragment: str) -> list[dict]:
    """Actors of a class, from the GCS this process is connected to (the state API would need
    the dashboard, which a second Ray on the machine may keep from starting)."""
    return [
        {"node_id": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
        for a in ray_state.actors().values()
        if class_fragment in a["ActorClassName"]
    ]


def _committed_checkpoints(run_dir: Path) -> list[str]:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's record of committed checkpoints
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def main(workdir: Path) -> None:
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray Train's drain poll (5 s by default)
    # the head takes no training; a node removed without grace is declared dead after 3 missed health checks a
    # second apart (Ray's default: 5 missed, 3 s apart, ~15 s of the test waiting), as a cluster may set it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": NODE_DEATH_DETECTION})
    imds = [FakeIMDS().__enter__() for _ in range(3)]
    # three train nodes: two for the run, one to take over from the node that is removed
    train_nodes = [cluster.add_node(num_cpus=2, resources={"train_node": 1},
                                    env_vars={"AWS_EC2_METADATA_SERVICE_ENDPOINT": service.endpoint})
                   for service in imds]
    data_node = cluster.add_node(num_cpus=2, resources={"data_node": 1})
    os.environ["RAY_ADDRESS"] = cluster.address  # Ray's helper processes join this cluster, not another on the machine
    try:
        run(cluster, train_nodes, data_node, dict(zip([n.node_id for n in train_nodes], imds)), workdir)
    finally:  # leave no raylets behind, whatever happened
        ray.shutdown()
        cluster.shutdown()
        for service in imds:
            service.__exit__()


def run(cluster: Cluster, train_nodes: list, data_node: object, imds: dict[str, FakeIMDS], workdir: Path) -> None:
    ray.init(address=cluster.address)
    quiet_ray_data()
    node_kind = {n.node_id: f"train{i}" for i, n in enumerate(train_nodes)} | {data_node.node_id: "data",
                                                                                 cluster.head_node.node_id: "head"}
    epochs = 1
    cfg = load_config(overrides=[*TINY, f"optim.epochs={epochs}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
                                 f"checkpoint.storage_path={workdir / 'runs'}", "tracking.run_name=faults",
                                 "checkpoint.max_failures=2"])
    faults: list[dict[str, object]] = []
    run_dir = workdir / "runs" / "faults"

    def the_run() -> object | None:
        from mlflow import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'faults'") if experiment else []
        return runs[0] if runs else None

    def wait_for_tag(key: str, deadline: float) -> str:
        while time.monotonic() < deadline:
            if (found := the_run()) is not None and key in found.data.tags:
                return found.data.tags[key]
            time.sleep(0.2)
        raise TimeoutError(f"no tag {key} in time")

    def wait_for_step(min_step: int, deadline: float) -> None:
        from mlflow import MlflowClient

        while time.monotonic() < deadline:
            if (found := the_run()) is not None:
                history = MlflowClient(cfg.tracking.uri).get_metric_history(found.info.run_id, "loss")
                if any(m.step >= min_step for m in history):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"no step {min_step} logged in time")

    def inject_fault() -> None:
        """Once step 2 is logged, a spot notice on a train worker's node; as soon as a checkpoint is committed (the
        one the run writes for the notice: the only other is the epoch's end), the node is removed without grace.
        The checkpoint is watched in Ray Train's snapshot file, not in MLflow: the removal must come before the
        run's last step, and MLflow's tag arrives later (what the run says it saw is read after the removal)."""
        deadline = time.monotonic() + 400
        wait_for_step(2, deadline)
        checkpoints = _committed_checkpoints(run_dir)
        alive = [a for a in _actors("RayTrainWorker") if a["state"] == "ALIVE"]
        victim = next(n for n in train_nodes if n.node_id == alive[0]["node_id"])
        service = imds[victim.node_id]
        given = time.time()
        service.give_notice(NOTICE_S)
        print(f"multinode_job: spot notice on {node_kind[victim.node_id]}", file=sys.stderr, flush=True)
        while not (after_notice := _committed_checkpoints(run_dir)):
            if time.monotonic() > deadline:
                raise TimeoutError("no checkpoint after the notice in time")
            time.sleep(0.05)
        cluster.remove_node(victim, allow_graceful=False)
        removed_at = time.monotonic() - started
        step = int(after_notice[0].split("_")[1])
        event = wait_for_tag("raydino.preemption", deadline)  # "... seen at step N: checkpoint at step N"
        # when the checkpoint was written (its manifest's time), not when this thread saw it
        committed = (run_dir / f"checkpoint_{step:08d}" / "manifest.json").stat().st_mtime
        faults.append({"fault": "spot notice, then node removed", "node": node_kind[victim.node_id],
                       "event": event, "checkpoint_step": step, "notice_given_at": given,
                       "notice_served_at": service.first_served,
                       "checkpoint_committed_at": committed,
                       "before_notice": checkpoints, "after": after_notice,
                       "workers_on": sorted(node_kind[a["node_id"]] for a in alive),
                       # every crop actor started so far, alive or not: the run has fed a checkpointed step,
                       # so there is at least one, whatever moment of its pool's lifecycle this is
                       "crop_actors_on": sorted({node_kind[a["node_id"]] for a in _actors("MapWorker")
                                                 if a["node_id"] in node_kind}),
                       "at": removed_at})

    started = time.monotonic()
    threading.Thread(target=inject_fault, daemon=True).start()
    summary = pretrain(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.monotonic() - started
    workers = _actors("RayTrainWorker")
    crop_actors = _actors("MapWorker")
    from mlflow import MlflowClient

    losses = MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id, "loss")
    history = [m.step for m in losses]
    for fault in faults:  # steps that ended after the notice was given, up to the checkpoint's step
        fault["steps_from_notice_to_checkpoint"] = sum(
            m.step <= fault["checkpoint_step"] and m.timestamp / 1000 > fault["notice_given_at"] for m in losses)
        fault["notice_to_checkpoint_s"] = fault["checkpoint_committed_at"] - fault["notice_given_at"]
        fault["served_to_checkpoint_s"] = fault["checkpoint_committed_at"] - fault["notice_served_at"]
    out = {
        "steps": summary.result.steps,
        "steps_per_epoch": 1347 // 2 // BATCH,
        "epochs": epochs,
        "history": sorted(history),
        "seconds": seconds,
        "worker_nodes": [node_kind.get(a["node_id"], "?") for a in workers],
        "crop_actor_nodes": [node_kind.get(a["node_id"], "?") for a in crop_actors],
        "clock_nodes": [node_kind.get(a["node_id"], "?") for a in _actors("EpochClock")],
        "faults": faults,
        "metadata_requests": {node_kind[node]: len(service.requests) for node, service in imds.items()},
        "status": MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id).info.status,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    main(Path(sys.argv[1]))
