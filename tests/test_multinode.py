"""Multi-node runs and faults on a simulated cluster (``ray.cluster_utils.Cluster``: several raylets
on one machine), run in a subprocess (tests/multinode_job.py) because this process holds the
session's single-node Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("multinode_job.py")


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_two_node_run_survives_a_removed_node(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(JOB), str(tmp_path)], env=env, capture_output=True, text=True, check=False,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    [remove] = out["faults"]
    # placement: the two train workers sit on different train nodes, the crop actors on the CPU-only node
    assert len(set(remove["workers_on"])) == 2 and all(n.startswith("train") for n in remove["workers_on"])
    assert remove["crop_actors_on"] == ["data"] and set(out["crop_actor_nodes"]) == {"data"}
    assert "head" not in out["worker_nodes"] + out["crop_actor_nodes"]  # the head has no CPU for tasks
    assert len(out["clock_nodes"]) == 1  # one epoch clock; it restarts if its node is the one removed
    # the fault: a node removed after the first checkpoint, before the end of the epoch
    assert remove["fault"] == "remove node" and int(remove["after"][-1].split("_")[1]) < out["steps_per_epoch"]
    # the run restarted from its checkpoint and finished with the right step count, one continuous history
    total = out["steps_per_epoch"] * out["epochs"]
    assert out["steps"] == total
    assert out["history"] == list(range(1, total + 1))
    assert out["status"] == "FINISHED"
