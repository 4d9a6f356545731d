"""A pretraining run on a simulated multi-node cluster (``ray.cluster_utils.Cluster``), in its own process.

Run by tests/test_multinode.py: a test process holds the session's single-node Ray, and a
process can join only one Ray. Layout, as cluster.yaml's node types: a head with no CPU
for tasks, "train" nodes (one ``train_node`` resource each, standing in for a GPU node), and
a CPU-only "data" node (``data_node``) for the multi-crop actors. A train worker's node is removed, without grace, after the first
checkpoint (the restart costs about a minute on 2 cores); Ray Train restarts the workers from it.
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
from tests.tiny import TINY_RUN

TINY = [
    *TINY_RUN,
    "data.batch_size_per_worker=64",
    "data.crop_batch_size=64",
    "eval.every_epochs=0",
    "tracking.log_every_steps=1",
    "scaling.num_workers=2",
    "scaling.resources_per_worker={train_node: 1}",
    "scaling.placement_strategy=SPREAD",
    "data.crop_actor_resources={data_node: 1}",
    "checkpoint.every_steps=4",
]


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
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head takes no training
    # three train nodes: two for the run, one to take over from the node that is removed
    train_nodes = [cluster.add_node(num_cpus=2, resources={"train_node": 1}) for _ in range(3)]
    data_node = cluster.add_node(num_cpus=2, resources={"data_node": 1})
    os.environ["RAY_ADDRESS"] = cluster.address  # Ray's helper processes join this cluster, not another on the machine
    try:
        run(cluster, train_nodes, data_node, workdir)
    finally:  # leave no raylets behind, whatever happened
        ray.shutdown()
        cluster.shutdown()


def run(cluster: Cluster, train_nodes: list, data_node: object, workdir: Path) -> None:
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

    def wait_for_checkpoint(min_step: int, deadline: float) -> list[str]:
        while time.monotonic() < deadline:
            done = _committed_checkpoints(run_dir)
            if any(int(name.split("_")[1]) >= min_step for name in done):
                return done
            time.sleep(0.2)
        raise TimeoutError(f"no checkpoint at step >= {min_step} in time")

    def inject_fault() -> None:
        """Remove a train worker's node, without grace, after the first committed checkpoint."""
        deadline = time.monotonic() + 400
        checkpoints = wait_for_checkpoint(1, deadline)
        alive = [a for a in _actors("RayTrainWorker") if a["state"] == "ALIVE"]
        victim = next(n for n in train_nodes if n.node_id == alive[0]["node_id"])
        faults.append({"fault": "remove node", "node": node_kind[victim.node_id], "after": checkpoints,
                       "workers_on": sorted(node_kind[a["node_id"]] for a in alive),
                       # every crop actor started so far, alive or not: the run has fed a checkpointed step,
                       # so there is at least one, whatever moment of its pool's lifecycle this is
                       "crop_actors_on": sorted({node_kind[a["node_id"]] for a in _actors("MapWorker")
                                                 if a["node_id"] in node_kind}),
                       "clock_on": [node_kind[a["node_id"]] for a in _actors("EpochClock") if a["state"] == "ALIVE"],
                       "at": time.monotonic() - started})
        cluster.remove_node(victim, allow_graceful=False)

    started = time.monotonic()
    threading.Thread(target=inject_fault, daemon=True).start()
    summary = pretrain(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.monotonic() - started
    workers = _actors("RayTrainWorker")
    crop_actors = _actors("MapWorker")
    from mlflow import MlflowClient

    history = [m.step for m in MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id, "loss")]
    out = {
        "steps": summary.result.steps,
        "steps_per_epoch": 1347 // 2 // 64,
        "epochs": epochs,
        "history": sorted(history),
        "seconds": seconds,
        "worker_nodes": [node_kind.get(a["node_id"], "?") for a in workers],
        "crop_actor_nodes": [node_kind.get(a["node_id"], "?") for a in crop_actors],
        "clock_nodes": [node_kind.get(a["node_id"], "?") for a in _actors("EpochClock")],
        "faults": faults,
        "status": MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id).info.status,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    main(Path(sys.argv[1]))
