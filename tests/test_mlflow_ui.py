"""What MLflow's UI shows of raydino's runs, read back from a real sqlite store as the UI's server reads
it: the experiment marked as model training, each run's Source, its data as a dataset input (runs
table's Dataset column) and a sweep trial's arm as tags. No browser here (CI has none):
``benchmarks/mlflow_ui_screenshot.py`` takes the screenshots."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from raydino.config import load_config
from raydino.pretrain import log_run_dataset
from raydino.sweep.trial import trial_tags
from raydino.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    create_run,
    experiment_url,
    log_dataset,
    run_datasets,
    source_name,
)


@pytest.fixture()
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiments_are_marked_model_training_new_or_existing(store: str) -> None:
    client = MlflowClient(store)
    create_run(store, "fresh", "r", {})
    assert client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    client.create_experiment("older")  # made before raydino set the tag
    client.create_experiment("inferred", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older", "inferred", "chosen"):
        create_run(store, name, "r", {})
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG) for name in ("older", "inferred", "chosen")}
    assert kinds == {"older": TRAINING_KIND, "inferred": TRAINING_KIND, "chosen": "genai_development"}  # a choice stays


def test_runs_carry_their_source(store: str) -> None:
    run = MlflowClient(store).get_run(create_run(store, "e", "r", {}))
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"] == source_name()
    assert source_name(["/venv/bin/raydino", "pretrain", "--local"]) == "raydino pretrain"
    assert source_name([str(Path.cwd() / "sweeps" / "kappa_ablation.py")]) == "sweeps/kappa_ablation.py"


def test_a_runs_data_is_a_dataset_input(store: str, tmp_path: Path) -> None:
    run_id = create_run(store, "e", "r", {})
    folder = tmp_path / "imagenet" / "train"
    digest = log_dataset(store, run_id, name="imagenet/train", location=str(folder), num_images=1281167)
    log_dataset(store, run_id, name="imagenet/train", location=str(folder), num_images=1281167)  # a resumed run
    [dataset] = run_datasets(store, run_id)
    assert dataset == {"name": "imagenet/train", "digest": digest, "source_type": "local", "source": str(folder),
                       "profile": {"num_images": 1281167}, "context": "training"}
    other = create_run(store, "e", "r2", {})
    assert log_dataset(store, other, name="x", location="s3://bucket/imagenet/train", num_images=10) != digest
    assert run_datasets(store, other)[0]["source_type"] == "s3"


def test_pretrain_logs_the_configured_data_and_survives_a_failure(store: str) -> None:
    run_id = create_run(store, "e", "r", {})
    lines: list[str] = []
    log_run_dataset(store, run_id, load_config(), 1347, lines.append)  # the demo: embedded digits
    [dataset] = run_datasets(store, run_id)
    assert lines == [] and dataset["name"] == "digits" and dataset["profile"]["num_images"] == 1347
    assert Path(dataset["source"]).name == "digits.csv.gz" and Path(dataset["source"]).is_file()
    log_run_dataset(store, "no-such-run", load_config(), 1347, lines.append)
    assert len(lines) == 1 and lines[0].startswith("raydino: warning: the dataset input was not logged")


def test_sweep_trials_show_their_arm_as_tags(store: str) -> None:
    cfg = load_config(overrides=["loss.vmf=true", "head.norm_last_layer=false"])
    setup = {"name": "kappa", "arm_keys": ["loss.vmf", "head.norm_last_layer", "loss.centering"],
             "source_name": "sweeps/kappa_ablation.py"}
    parent = create_run(store, "kappa_ablation", "kappa", {}, {"raydino.arm_keys": ", ".join(setup["arm_keys"])})
    child = create_run(store, "kappa_ablation", "kappa-t0", {}, trial_tags(cfg, setup, "t0"), parent)
    [run] = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("kappa_ablation").experiment_id],
        filter_string="tags.`raydino.arm.loss.vmf` = 'True'",  # what the UI's search box takes
    )
    assert run.info.run_id == child
    tags = run.data.tags
    assert {k: v for k, v in tags.items() if k.startswith("raydino.arm.")} == {
        "raydino.arm.loss.vmf": "True", "raydino.arm.head.norm_last_layer": "False",
        "raydino.arm.loss.centering": "probability",
    }
    assert tags["mlflow.source.name"] == "sweeps/kappa_ablation.py"  # the driver's script, not Ray's worker
    experiment_id = run.info.experiment_id
    assert experiment_url(store, parent) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
