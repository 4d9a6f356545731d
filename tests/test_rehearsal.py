"""The cluster path rehearsed on this machine (raydino/commands/rehearsal.py): cluster.yaml's node types under
Ray's own autoscaler (fake_multinode), a two-trial sweep submitted with `ray job submit`, data at
ImageNet geometry, the imagenet_vit_small code path at tiny sizes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from ray.autoscaler._private.util import validate_config

from raydino.commands.rehearsal import (
    FAKE_HEAD_TYPE,
    GPU_STANDIN,
    REPO,
    _marked_processes,
    derive_fake_cluster,
    imagenet_geometry_jpegs,
    rehearse,
)

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_the_rehearsal_submits_the_repository_it_lives_in():
    """The job's working directory and its sweep script: a module moved deeper must not lose them."""
    assert REPO == CLUSTER.parent and (REPO / "sweeps" / "kappa_ablation.py").is_file()


def test_the_fake_cluster_keeps_the_node_types_and_their_resources():
    cluster = yaml.safe_load(CLUSTER.read_text())
    fake = derive_fake_cluster(cluster, "127.0.0.1:6390", cpus_per_node=2, max_workers_per_type=2)
    validate_config(fake)  # Ray's own schema for autoscaler configs
    types = fake["available_node_types"]
    workers = {k for k in cluster["available_node_types"] if k != cluster["head_node_type"]}
    assert set(types) == workers | {FAKE_HEAD_TYPE} and fake["head_node_type"] == FAKE_HEAD_TYPE
    assert types[FAKE_HEAD_TYPE]["resources"] == {"CPU": 0} and types[FAKE_HEAD_TYPE]["max_workers"] == 0
    for name in workers:
        real = cluster["available_node_types"][name]["resources"]
        shrunk = types[name]["resources"]
        assert shrunk["CPU"] == 2 and types[name]["max_workers"] == min(2, cluster["available_node_types"][name]["max_workers"])
        # every custom resource kept by name; each node's GPUs one stand-in
        assert {GPU_STANDIN if k == "GPU" else k for k in real} == set(shrunk)
        assert shrunk.get(GPU_STANDIN, 0) == (1 if "GPU" in real else 0)
    assert fake["provider"]["type"] == "fake_multinode" and fake["provider"]["gcs_address"] == "127.0.0.1:6390"


def test_imagenet_geometry_jpegs_are_real_photo_crops_of_imagenet_size(tmp_path):
    root = imagenet_geometry_jpegs(tmp_path, per_class=8)
    files = sorted(root.rglob("*.jpg"))
    assert sorted({f.parent.name for f in files}) == ["china", "flower"] and len(files) == 16
    sizes = []
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.append(img.size)
            assert np.asarray(img).std() > 20  # a photo, not a flat fill
    assert all(333 <= min(s) <= 427 and 440 <= max(s) <= 560 for s in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)  # landscape and portrait


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rehearsal_on_an_autoscaling_cluster(tmp_path, monkeypatch):
    # the cluster inherits this environment: drop conftest's short worker-group start timeout, which an
    # autoscaling cluster (nodes start while Ray Train waits) would hit
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    # one trial (the command's default is two): one GPU node and one CPU node show the autoscaler at work
    started = time.time()
    report = rehearse(CLUSTER, tmp_path, per_class=8, timeout=900, seeds=1)
    print("\n".join(report.lines()))
    assert report.job_status == "SUCCEEDED"
    types = [n["type"] for n in report.nodes]
    assert "gpu_worker" in types and "cpu_worker" in types, report.lines()
    first_train_node = min(n["start_s"] for n in report.nodes if n["type"] == "gpu_worker")
    # submitted to a head with no CPU: the trials waited (PENDING) until the autoscaler added nodes
    assert min(n["start_s"] for n in report.nodes) > 0
    assert len(report.trial_starts) == 1 and min(report.trial_starts) >= first_train_node - 1.0, report.lines()
    assert report.crop_actor_nodes and set(report.crop_actor_nodes) == {"cpu_worker"}, report.lines()
    assert sorted(report.runs.values()) == ["FINISHED"] * 2, report.runs  # the parent and its child
    # every process of the cluster is gone, those whose marker Ray overwrote (its dashboard agent) too
    assert report.processes_stopped and not _marked_processes(report.marker)
    orphans = [p.info for p in psutil.process_iter(["pid", "ppid", "name", "create_time", "status"])
               if p.info["create_time"] >= started and p.info["ppid"] == 1 and p.info["name"].startswith("ray::")
               and p.info["status"] != psutil.STATUS_ZOMBIE]  # killed; init reaps it in its own time
    assert not orphans, orphans
