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
def test_a_spot_notice_checkpoints_at_the_next_step_and_the_run_resumes_there_when_the_node_goes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(JOB), str(tmp_path)], env=env, capture_output=True, text=True, check=False,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    [fault] = out["faults"]
    # placement: the two train workers sit on different train nodes, the crop actors on the CPU-only node
    assert len(set(fault["workers_on"])) == 2 and all(n.startswith("train") for n in fault["workers_on"])
    assert fault["crop_actors_on"] == ["data"] and set(out["crop_actor_nodes"]) == {"data"}
    assert "head" not in out["worker_nodes"] + out["crop_actor_nodes"]  # the head has no CPU for tasks
    assert len(out["clock_nodes"]) == 1  # one epoch clock; it restarts if its node is the one removed
    # the fault: a spot notice after step 2, early in the epoch of 168 steps (no checkpoint before it); the node drained itself,
    # Ray Train told every worker, and they checkpointed at the step boundary where they learnt it
    assert fault["fault"] == "spot notice, then node removed" and fault["notice_served_at"] is not None
    step = fault["checkpoint_step"]
    assert f"seen at step {step}" in fault["event"] and fault["node"] in {"train0", "train1", "train2"}
    assert fault["before_notice"] == [] and fault["after"] == [f"checkpoint_{step:08d}"] and step < out["steps_per_epoch"]
    assert f"raydino: resumed from step {step} " in proc.stdout + proc.stderr  # from that checkpoint, not an older one
    # the run finished with the right step count, one continuous history: no step before the checkpoint repeated
    total = out["steps_per_epoch"] * out["epochs"]
    assert out["steps"] == total
    assert out["history"] == list(range(1, total + 1))
    assert out["status"] == "FINISHED"
    assert all(n > 0 for n in out["metadata_requests"].values())  # every train node that ran a worker watched
    print(f"notice given -> checkpoint written: {fault['notice_to_checkpoint_s']:.1f} s "
          f"({fault['served_to_checkpoint_s']:.1f} s from the first answer with it), "
          f"{fault['steps_from_notice_to_checkpoint']} steps; run {out['seconds']:.0f} s")
