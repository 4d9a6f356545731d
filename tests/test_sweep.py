"""raydino.sweep: search spaces, concurrency, MLflow parent/child runs, ASHA, retries; the
sweep scripts' arguments; the per-arm report."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from raydino.config import ConfigError, load_config, with_overrides
from raydino.sweep import (
    Asha,
    SweepResult,
    SweepSpec,
    TrialOutcome,
    absolute_paths,
    derive_max_concurrent,
    run_sweep,
    validate_space,
)
from raydino.sweep.bookkeeping import close_children
from raydino.sweep.report import arm_table, child_runs, is_collapsed, to_markdown, write_report
from raydino.sweep.spec import arm_values, cluster_capacity
from raydino.tracking import RunLogger, create_run
from tests.tiny import TINY_RUN

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"

TINY = [
    *TINY_RUN,
    "data.batch_size_per_worker=64",
    "data.crop_batch_size=64",
    "data.cpus_per_crop_actor=0.5",
    "eval.max_images=100",
    "tracking.log_every_steps=3",
    "scaling.num_workers=1",
]


def _script(name: str):
    sys.path.insert(0, str(SWEEPS))
    try:
        spec = importlib.util.spec_from_file_location(name, SWEEPS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SWEEPS))


# --- search spaces and validation (no Ray) -------------------------------------------------


def test_sweep_epochs_must_be_at_least_one(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    _script("_common").add_common_arguments(parser, default_seeds=2)
    assert parser.parse_args(["--epochs", "2"]).epochs == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "0"])  # was taken as "not set": the preset's budget ran instead
    assert "--epochs: must be at least 1, got 0" in capsys.readouterr().err


def test_with_overrides_sets_typed_values_and_validates():
    base = load_config()
    cfg = with_overrides(base, {"loss.vmf": False, "head.norm_last_layer": True, "seed": 3, "model.kwargs.depth": 2})
    assert (cfg.loss.vmf, cfg.head.norm_last_layer, cfg.seed, cfg.model.kwargs["depth"]) == (False, True, 3, 2)
    assert cfg.model.kwargs["embed_dim"] == base.model.kwargs["embed_dim"]  # the rest of kwargs is kept
    with pytest.raises(ConfigError, match="loss.teacher_temp"):
        with_overrides(base, {"loss.teacher_temp": -1.0})


def test_validate_space_names_the_bad_point():
    base = load_config()
    with pytest.raises(ConfigError, match=r"loss.centering.*allowed: one of"):
        validate_space(SweepSpec("s", base, {"loss.centering": ["logit", "median"]}))
    with pytest.raises(ConfigError, match="unknown key 'loss.kappa'"):
        validate_space(SweepSpec("s", base, {"loss.kappa": [1, 2]}))
    with pytest.raises(ConfigError, match="eval.every_epochs=1"):
        validate_space(SweepSpec("s", with_overrides(base, {"eval.every_epochs": 0}), {"seed": [0, 1]}, asha=Asha()))
    with pytest.raises(ConfigError, match="arm key"):
        validate_space(SweepSpec("s", base, {"seed": [0, 1]}, arm_keys=["loss.vmf"]))
    assert len(validate_space(SweepSpec("s", base, {"loss.vmf": [False, True], "seed": [0, 1, 2]}))) == 6
    with pytest.raises(ConfigError, match="seed have an empty list"):
        validate_space(SweepSpec("s", base, {"loss.vmf": [False, True], "seed": []}))
    folder = with_overrides(base, {"data.source": "imagefolder", "data.path": "/data/train", "eval.every_epochs": 1})
    with pytest.raises(ConfigError, match="eval.train_path"):  # ASHA without labelled evaluation data
        validate_space(SweepSpec("s", folder, {"seed": [0, 1]}, asha=Asha()))
    with pytest.raises(ConfigError, match="only after the last epoch"):
        validate_space(SweepSpec("s", with_overrides(base, {"eval.every_epochs": 1}), {"seed": [0, 1]},
                                 asha=Asha(metric="final_knn_top1")))


def test_relative_paths_are_resolved_for_trials_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_overrides(load_config(), {"data.source": "imagefolder", "data.path": "train", "eval.test_path": "s3://b/t"})
    resolved = absolute_paths(cfg)
    assert resolved.data.path == str(tmp_path / "train") and resolved.eval.test_path == "s3://b/t"


def test_max_concurrent_trials_from_cluster_resources():
    cpu = load_config(overrides=["scaling.num_workers=2", "data.num_crop_actors=1"])  # 2 + 1 + 1 read + 1 driver
    assert derive_max_concurrent([cpu], 1.0, {"CPU": 16}) == 3
    assert derive_max_concurrent([cpu], 1.0, {"CPU": 4}) == 1  # never zero: one trial waits for resources
    gpu = with_overrides(cpu, {"scaling.use_gpu": True, "scaling.num_workers": 4})
    assert derive_max_concurrent([gpu], 1.0, {"CPU": 64, "GPU": 8}) == 2  # GPUs are the limit
    assert derive_max_concurrent([cpu, gpu], 1.0, {"CPU": 64, "GPU": 8}) == 2  # sized for the largest trial
    with pytest.raises(ConfigError, match="needs 4 GPU"):  # would wait forever
        derive_max_concurrent([gpu], 1.0, {"CPU": 64, "GPU": 2})


def test_a_fresh_autoscaling_cluster_counts_the_nodes_it_can_add(tmp_path):
    """On a `ray up` cluster of the shipped cluster.yaml (its bootstrap config on the head) no worker
    node is up at first: the head has CPU 0 and no GPU. Trials are sized from what it can grow to."""
    capacity = cluster_capacity({"CPU": 0.0, "memory": 1e9}, SWEEPS.parent / "cluster.yaml")
    assert capacity["GPU"] == 8 * 8 and capacity["CPU"] == 8 * 96 + 8 * 64 and capacity["data_node"] == 8 * 64
    base = load_config(preset="imagenet_vit_base")  # 32 GPU workers per trial
    assert derive_max_concurrent([base], 1.0, capacity) == 2
    too_big = with_overrides(base, {"scaling.num_workers": 128})
    with pytest.raises(ConfigError, match="needs 128 GPU.*can grow to, 64"):
        derive_max_concurrent([too_big], 1.0, capacity)
    assert cluster_capacity({"CPU": 4.0}, tmp_path / "no_bootstrap.yaml") == {"CPU": 4.0}  # not a ray up cluster


def test_runs_left_open_are_closed_as_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = create_run(uri, "s", "parent", {})
    open_child, done_child = (create_run(uri, "s", f"c{i}", {}, parent_run_id=parent) for i in range(2))
    RunLogger(uri, done_child).end("FINISHED")
    assert close_children(uri, "s", parent, log=lambda _: None)
    assert RunLogger(uri, open_child).status() == "KILLED" and RunLogger(uri, done_child).status() == "FINISHED"
    assert RunLogger(uri, parent).status() == "RUNNING"  # the parent is not its own child
    assert not close_children(uri, "s", parent, log=lambda _: None)


def test_a_dying_trial_does_not_overwrite_the_drivers_verdict(tmp_path):
    """ASHA stops a trial: the driver ends its run KILLED while the trial process may still be
    unwinding through pretrain()'s failure path, which must leave that verdict alone."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stopped, crashed = (RunLogger(uri, create_run(uri, "s", name, {})) for name in ("stopped", "crashed"))
    assert stopped.end_unless_finished("KILLED")
    assert not stopped.end_if_running("FAILED") and stopped.status() == "KILLED"
    assert crashed.end_if_running("FAILED") and crashed.status() == "FAILED"


# --- the sweep scripts ------------------------------------------------------------------


def test_the_trial_callback_unpickles_without_raydinos_sweep_driver_or_torch():
    """Ray Train unpickles a trial's ``RungReport`` in its controller and in every train worker, which import the
    class's module to do it: that module must not bring raydino's sweep, driver or evaluation code, nor torch (when
    it lived in raydino.sweep.trial, 4-4.5 s of imports in each of those processes)."""
    import subprocess

    from ray import cloudpickle

    from raydino.train.rung_report import RungReport

    # how Ray ships an instance's class: an importable class goes by reference to its module (the instance itself
    # can be made only inside a Tune trial)
    payload = cloudpickle.dumps(RungReport)
    script = ("import pickle, sys; cls = pickle.loads(sys.stdin.buffer.read()); print(cls.__module__, cls.__name__, "
              "sorted(m for m in sys.modules if m.startswith('raydino') or m == 'torch'))")
    done = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split(" ", 2) == [
        "raydino.train.rung_report", "RungReport", "['raydino', 'raydino.train', 'raydino.train.rung_report']\n"]


def test_kappa_ablation_arguments_and_arms():
    ablation = _script("kappa_ablation")
    args = ablation.build_parser().parse_args([])
    space, arm_keys = ablation.ablation_space(args)
    arms = ablation.arms(space, arm_keys)
    assert arm_keys == ["loss.vmf", "head.norm_last_layer", "loss.centering"]
    assert len(arms) == 8 and len({tuple(a.values()) for a in arms}) == 8
    assert space["seed"] == [0]  # one seed by default: 8 trials fit 20 minutes on 2 cores
    assert {"loss.vmf": True, "head.norm_last_layer": False, "loss.centering": "probability"} in arms

    args = ablation.build_parser().parse_args(["--teacher-temps", "0.04", "0.07", "--seeds", "3", "--methods",
                                               "dino-vmf", "--preset", "imagenet_vit_base", "--data", "/x"])
    space, arm_keys = ablation.ablation_space(args)
    assert arm_keys[-1] == "loss.teacher_temp" and space["loss.teacher_temp"] == [0.04, 0.07]
    assert len(ablation.arms(space, arm_keys)) == 1 * 2 * 2 * 2 and space["seed"] == [0, 1, 2]
    base = ablation.base_config(args, ablation.BUDGET, "kappa_ablation")
    assert base.model.name == "vit_base_patch16_224" and base.data.path == "/x"  # no small-machine budget
    small = ablation.base_config(ablation.build_parser().parse_args(["optim.epochs=2"]), ablation.BUDGET, "k")
    assert small.scaling.num_workers == 1 and small.optim.epochs == 2  # the user's override wins over the budget
    with pytest.raises(SystemExit):
        ablation.build_parser().parse_args(["--centerings", "median"])

    # the iBOT arms: a method family key joins the arms when both families are asked for
    args = ablation.build_parser().parse_args(["--methods", "dino", "dino-vmf", "ibot", "ibot-vmf"])
    space, arm_keys = ablation.ablation_space(args)
    assert arm_keys[0] == "loss.method" and space["loss.method"] == ["dino", "ibot"]
    arms = ablation.arms(space, arm_keys)
    assert len(arms) == 16 and {"loss.method": "ibot", "loss.vmf": True, "head.norm_last_layer": False,
                                "loss.centering": "probability"} in arms
    base = ablation.base_config(args, ablation.BUDGET, "kappa_ablation")
    assert len(validate_space(SweepSpec("k", base, space, arm_keys=arm_keys))) == 16  # every point validates
    only_ibot = ablation.ablation_space(ablation.build_parser().parse_args(["--methods", "ibot-vmf"]))[0]
    assert only_ibot["loss.method"] == ["ibot"] and only_ibot["loss.vmf"] == [True]
    with pytest.raises(ConfigError, match="grid of method family x vMF"):
        ablation.ablation_space(ablation.build_parser().parse_args(["--methods", "dino", "ibot-vmf"]))


def test_kappa_ablation_arms_record_the_centering_each_trial_uses(capsys):
    ablation = _script("kappa_ablation")
    args = ablation.build_parser().parse_args(["--centerings", "auto", "--methods", "dino", "dino-vmf", "ibot",
                                               "ibot-vmf"])
    space, arm_keys = ablation.ablation_space(args)
    base = ablation.base_config(args, ablation.BUDGET, "kappa_ablation")
    arms = ablation.arms(space, arm_keys, base)
    assert {(a["loss.vmf"], a["loss.centering"]) for a in arms} == {(False, "logit"), (True, "probability")}
    for config in validate_space(SweepSpec("k", base, space, arm_keys=arm_keys)):  # what each trial runs and tags
        want = "probability" if config.loss.vmf else "logit"
        assert (config.loss.centering, config.loss.patch_centering) == (want, want)
        assert arm_values(config, arm_keys)["loss.centering"] == want
    assert ablation.main(["--dry-run"]) == 0  # the default arms: logit beside probability, the vMF + logit ones marked
    listing = capsys.readouterr().out
    assert listing.count("cancels the teacher's vMF normalisers") == 2
    with pytest.raises(ConfigError, match="same arm twice"):
        ablation.ablation_space(ablation.build_parser().parse_args(["--centerings", "auto", "logit"]))


def test_temperature_sweep_arguments(capsys):
    sweep = _script("temperature_sweep")
    args = sweep.build_parser().parse_args(["--teacher-temps", "0.02", "0.04", "0.07", "--warmup-epochs", "0", "2"])
    space, arm_keys = sweep.temperature_space(args)
    assert space["loss.teacher_temp"] == [0.02, 0.04, 0.07] and space["loss.warmup_teacher_temp_epochs"] == [0, 2]
    assert space["loss.vmf"] == [False, True] and "seed" not in arm_keys
    assert sweep.main(["--dry-run"]) == 0
    assert "8 trials" in capsys.readouterr().out


def test_demo_recipe_sweep_arguments(capsys):
    sweep = _script("demo_recipe")
    args = sweep.build_parser().parse_args(
        ["--grid", "head.num_prototypes=256,1024", "optim.momentum_teacher=0.95,0.99", "--seeds", "2"])
    space, arm_keys = sweep.recipe_space(args)
    assert space["head.num_prototypes"] == [256, 1024] and space["optim.momentum_teacher"] == [0.95, 0.99]
    assert space["loss.koleo_weight"] == [0.0] and space["seed"] == [0, 1]  # the method alone by default
    assert arm_keys == ["head.num_prototypes", "optim.momentum_teacher", "loss.koleo_weight"]
    assert sweep.main(["--dry-run", "--grid", "head.num_prototypes=256,1024", "--koleo", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 trials" in out and "loss.koleo_weight in [0.0, 1.0]" in out
    assert sweep.main(["--dry-run"]) == 0  # the default grid: the two levers behind the demo, 4 arms
    assert "4 trials" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--grid", "head.num_prototypes"])
    with pytest.raises(ConfigError, match="--koleo"):
        sweep.recipe_space(sweep.build_parser().parse_args(["--grid", "loss.koleo_weight=0,1"]))


# --- the per-arm report (MLflow runs made here) -------------------------------------------


def test_collapse_flag():
    assert is_collapsed(6.93, 6.931)  # uniform targets for every sample
    assert is_collapsed(0.01, 0.02)  # the same one-hot target for every sample
    assert not is_collapsed(0.5, 5.0)  # sharp targets that differ between samples
    assert not is_collapsed(float("nan"), 1.0)
    assert is_collapsed(0.5, 5.0, prototypes_in_use=1)  # one argmax prototype for every evaluation image
    assert not is_collapsed(0.5, 5.0, prototypes_in_use=2)


def _ablation_store(tmp_path: Path) -> tuple[str, str]:
    """A parent run with two arms of child runs (one FAILED), as a sweep leaves them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = create_run(uri, "abl", "parent", {})
    runs = {  # (vmf, centering) -> per seed: (status, knn, teacher entropy, mean-target entropy)
        ("True", "logit"): [("FINISHED", 60.0, 1.0, 5.0), ("FINISHED", 64.0, 1.0, 5.0)],
        ("False", "logit"): [("FINISHED", 50.0, 6.9, 6.93), ("FAILED", None, None, None)],
    }
    rng = np.random.default_rng(0)
    for (vmf, centering), seeds in runs.items():
        for seed, (status, knn, h, hm) in enumerate(seeds):
            run = create_run(uri, "abl", f"{vmf}-{centering}-{seed}",
                             {"loss.vmf": vmf, "loss.centering": centering, "seed": seed}, parent_run_id=parent)
            logger = RunLogger(uri, run)
            if knn is not None:
                logger.log_metrics({"final_knn_top1": knn, "final_linear_probe_top1": knn - 5, "teacher_entropy": h,
                                    "mean_target_entropy": hm, "final_kappa_teacher_q50": 10.0 + seed,
                                    "final_kappa_teacher_q05": 5.0, "final_kappa_teacher_q95": 20.0,
                                    "final_prototypes_in_use": 7, "random_init_knn_top1": 40.0 + seed,
                                    "epoch_teacher_entropy_share": h / 6.93, "epoch_mean_target_entropy_share": hm / 6.93}, 1)
                arrays = tmp_path / "prototypes.npz"
                np.savez(arrays, kappa_teacher=rng.gamma(2.0, 5.0, 64), usage=rng.dirichlet(np.ones(64)))
                logger.log_artifact(arrays, "eval")
            logger.end(status)
    return uri, parent


def test_arm_table_and_report_from_mlflow(tmp_path):
    uri, parent = _ablation_store(tmp_path)
    table = arm_table(child_runs(uri, "abl", parent), ["loss.vmf", "loss.centering"])
    rows = {(r["loss.vmf"], r["loss.centering"]): r for _, r in table.iterrows()}
    vmf, dino = rows[("True", "logit")], rows[("False", "logit")]
    assert vmf["knn_top1_mean"] == pytest.approx(62.0) and vmf["knn_top1_std"] == pytest.approx(math.sqrt(8))
    assert vmf["kappa_median"] == pytest.approx(10.5) and vmf["collapsed"] == "0/2"
    assert (dino["finished"], dino["failed"], dino["collapsed"]) == (1, 1, "1/1")  # uniform targets: collapsed
    markdown = to_markdown(table, ["loss.vmf", "loss.centering"])
    assert vmf["knn_random_init"] == pytest.approx(40.5)  # the random network's kNN, beside the trained one
    assert "| True | logit | 2/2 | 62.0 ± 2.8 | 40.5 | 57.0 | 7 | 10.5 [5.0, 20.0] | 1.00 | 0.14 | 0.72 | 0/2 |" in markdown
    assert "| False | logit | 1/2 (1 failed) | 50.0 ± - |" in markdown

    everything = arm_table(child_runs(uri, "abl", parent), [])  # no arm keys: one row
    assert list(everything["arm"]) == ["all"] and everything["trials"].item() == 4

    text, files = write_report(uri, "abl", parent, ["loss.vmf", "loss.centering"], tmp_path / "report")
    assert text == markdown
    assert sorted(f.name for f in files) == ["arms.csv", "arms.md", "kappa_histograms.png", "knn_per_arm.png",
                                             "prototype_usage.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files if f.suffix == ".png")


def test_script_reports_onto_the_ended_parent_run_and_survives_a_failing_report(tmp_path, monkeypatch):
    uri, parent = _ablation_store(tmp_path)
    RunLogger(uri, parent).end("FINISHED")  # run_sweep ends the parent before the script writes the report
    common = _script("_common")
    failed = TrialOutcome("t2", {"loss.vmf": False}, "FAILED", 2, error="loss is nan at step 0")
    result = SweepResult("abl", uri, "abl", parent, [failed], 2, 60.0)
    arm_keys = ["loss.vmf", "loss.centering"]
    lines: list[str] = []
    markdown = common.report_sweep(result, arm_keys, tmp_path / "report", log=lines.append)

    assert (tmp_path / "report" / "arms.md").read_text() == markdown + "\n" and markdown.startswith("| loss.vmf |")
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(parent, "sweep")) == [
        "sweep/arms.csv", "sweep/arms.md", "sweep/kappa_histograms.png", "sweep/knn_per_arm.png",
        "sweep/prototype_usage.png"]
    assert lines[:3] == ["", markdown, ""]
    assert lines[3] == "FAILED trial t2 (2 attempts) {'loss.vmf': False}:\n  loss is nan at step 0"
    assert lines[4].startswith("0 finished, 0 stopped early, 1 failed in 1.0 min; report in ")
    assert client.get_run(parent).info.status == "FINISHED"

    def broken_report(*_):
        raise RuntimeError("plotting went wrong")

    monkeypatch.setattr("raydino.sweep.report.write_report", broken_report)
    lines.clear()
    assert common.report_sweep(result, arm_keys, tmp_path / "again", log=lines.append) == ""
    assert lines[0] == "sweep: the report failed (RuntimeError: plotting went wrong); trial outcomes follow"
    assert lines[2] == "(no table)" and lines[4].startswith("FAILED trial t2")  # the outcomes are not lost
    assert client.get_run(parent).data.tags["raydino.report_error"] == "plotting went wrong"


# --- real sweeps on the shared Ray instance -----------------------------------------------


def _children(uri: str, experiment: str, parent_run_id: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_asha_sweep_stops_trials_ends_every_run_and_loses_no_metric(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = load_config(overrides=[*TINY, "optim.epochs=2", f"tracking.uri={uri}", "tracking.experiment=asha"])
    # ASHA on the reported learning rate, a metric whose order across trials is known, one trial at a time: the
    # second (lower lr) reaches the epoch-1 rung after the first has recorded a higher value there, so it is below
    # every recorded value and must be stopped. (Trials logging at once into one sqlite store lose nothing:
    # tests/test_sweep_resume.py runs two at a time; the concurrency derived from the cluster's CPUs:
    # test_max_concurrent_trials_from_cluster_resources.)
    spec = SweepSpec("asha", base, {"optim.base_lr": [4e-4, 1e-4]}, asha=Asha(metric="lr", reduction_factor=2),
                     max_concurrent_trials=1, storage_path=tmp_path / "runs")
    result = run_sweep(spec, log=lambda _: None)

    assert result.max_concurrent_trials == 1
    assert len(result.trials) == 2 and result.count("FAILED") == 0
    by_lr = {t.overrides["optim.base_lr"]: t for t in result.trials}
    assert by_lr[1e-4].status == "KILLED" and by_lr[1e-4].metrics["epoch"] == 1
    assert by_lr[4e-4].status == "FINISHED" and by_lr[4e-4].metrics["epoch"] == 2
    assert "final_knn_top1" in by_lr[4e-4].metrics

    client, children = _children(uri, "asha", result.parent_run_id)
    runs = {r.data.tags["raydino.trial_id"]: r for r in children}
    assert len(runs) == 2
    assert "RUNNING" not in {r.info.status for r in children}
    for trial in result.trials:
        run = runs[trial.trial_id]
        assert run.info.status == trial.status
        assert run.data.params["optim.base_lr"] == str(trial.overrides["optim.base_lr"])
        assert run.data.tags["raydino.arm"] == f"optim.base_lr={trial.overrides['optim.base_lr']}"
    steps = 2 * (1347 // 64)
    for trial in result.trials:  # every step's loss and every epoch's kNN of the finished trial
        if trial.status == "FINISHED":
            run = runs[trial.trial_id]
            assert len(client.get_metric_history(run.info.run_id, "loss")) == steps // 3
            assert len(client.get_metric_history(run.info.run_id, "knn_top1")) == 2
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["optim.base_lr"].startswith("grid")
    assert parent.data.metrics["trials_stopped"] == result.count("KILLED")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_failing_trial_is_reported_and_the_sweep_ends_well(ray_session, tmp_path):
    """A trial whose loss is NaN at every step fails and is reported with its error (the skip policy: two steps
    skipped, the third in a row stops the run; the policy itself is unit-tested in tests/test_training_step.py);
    the sweep itself finishes. No retry here (``trial_retries=0``: one attempt, then FAILED): each attempt is a
    whole Train run's start-up (~30 s). Tune's retry of a failed trial (attempt 2, from its checkpoint, one
    MLflow history) is tests/test_sweep_resume.py's, in the sweep whose driver is killed during that retry."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = load_config(overrides=[*TINY, "optim.epochs=1", f"tracking.uri={uri}", "tracking.experiment=fail",
                                  "optim.nonfinite_loss=skip", "optim.max_nonfinite_in_a_row=3"])
    # LayerScale initialised at 1e30 makes the loss NaN at step 0: a trial that raises, every attempt
    spec = SweepSpec("fail", base, {"model.kwargs.init_values": [1.0e30]}, trial_retries=0,
                     storage_path=tmp_path / "runs")
    result = run_sweep(spec, log=lambda _: None)

    [failed] = result.trials
    assert failed.status == "FAILED" and failed.attempts == 1
    assert re.search(r"loss is nan at step 2.*3 non-finite losses in a row.*3 skipped in all.*Last good checkpoint: "
                     r"none yet", failed.error, re.DOTALL), failed.error

    client, children = _children(uri, "fail", result.parent_run_id)
    [run] = children
    assert run.data.tags["raydino.trial_id"] == failed.trial_id
    assert run.info.status == "FAILED" and run.data.tags["raydino.attempts"] == "1"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raydino.failed_trials"] == failed.trial_id
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_finished"] == 0


def test_scripts_report_user_errors_in_one_line(capsys, monkeypatch):
    ablation = _script("kappa_ablation")
    sys.path.insert(0, str(SWEEPS))
    try:
        from _common import run_cli
    finally:
        sys.path.remove(str(SWEEPS))
    monkeypatch.setattr(sys, "argv", ["kappa_ablation.py"])
    assert run_cli(lambda: ablation.main(["--dry-run", "loss.kappa=1"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("kappa_ablation.py: error: invalid configuration") and "Traceback" not in err
