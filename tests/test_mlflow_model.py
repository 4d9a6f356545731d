"""The teacher backbone as an MLflow model: logged by pretrain's own function into a real sqlite store,
loaded back through MLflow (pyfunc and the pytorch flavor) it embeds images exactly as the teacher's
backbone does in raydino's evaluation; ``tracking.register_model`` adds registry versions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from raydino.config import load_config
from raydino.eval.evaluate import extract
from raydino.models import normalize_crops
from raydino.pretrain import log_teacher_model
from raydino.step import DINOStep
from raydino.tracking import create_run
from raydino.train.checkpoint import TrainState, write_checkpoint
from raydino.train.export import load_teacher
from tests.tiny import TINY_NET

REGISTERED = "raydino-test-teacher"


def _checkpoint(directory: Path, *overrides: str) -> Path:
    """A real checkpoint of a tiny run whose teacher is not its initialisation (EMA of a moved student)."""
    cfg = load_config(overrides=[*TINY_NET, "model.img_size=32", *overrides])  # 4 x 4 patches of 8 px
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    state = step_fn.state_dict()
    state["teacher"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in state["teacher"].items()}
    write_checkpoint(directory, TrainState(**state, step=5, epoch=1, batch_in_epoch=0, steps_per_epoch=5), cfg.to_yaml())
    return directory


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite store, also as MLFLOW_TRACKING_URI: ``models:/`` URIs resolve through it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.get_tracking_uri() == uri  # nothing in this process pinned another store
    return uri


def _digits_like(n: int, size: int = 32) -> np.ndarray:
    """uint8 grayscale images, as the embedded sources give them (the model takes 3 channels)."""
    return np.random.default_rng(1).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


def test_logged_backbone_loads_back_and_embeds_like_the_teacher(tmp_path: Path, store: str) -> None:
    checkpoint = _checkpoint(tmp_path / "ckpt")
    run_id = create_run(store, "models", "run", {})
    lines: list[str] = []
    logged = log_teacher_model(store, run_id, checkpoint, step=5, log=lines.append)
    assert logged is not None, lines
    assert logged.version is None and "logged as MLflow model" in lines[-1]
    # filed under its run's experiment (not the Default one): the experiment's Models page and the runs
    # table's Models column show it
    client = MlflowClient(store)
    experiment_id = client.get_run(run_id).info.experiment_id
    assert experiment_id != "0"
    model_info = client.get_logged_model(mlflow.models.get_model_info(logged.model_uri).model_id)
    assert (model_info.experiment_id, model_info.source_run_id) == (experiment_id, run_id)
    assert [m.model_id for m in client.search_logged_models(experiment_ids=["0"])] == []

    teacher, _, _ = load_teacher(checkpoint)
    images = _digits_like(3)
    expected, _ = extract(teacher, images)  # the [CLS] features raydino's kNN uses
    x = normalize_crops([torch.from_numpy(images)], "cpu")[0].numpy()

    model = mlflow.pyfunc.load_model(logged.model_uri)
    np.testing.assert_allclose(model.predict(x), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert model.predict(x[:1]).shape == (1, expected.shape[1])  # the batch is free
    smaller = normalize_crops([torch.from_numpy(_digits_like(2, size=16))], "cpu")[0]
    with torch.no_grad():  # so is the image size (traced on 16 px, trained on 32)
        np.testing.assert_allclose(model.predict(smaller.numpy()), teacher.backbone(smaller).numpy(), rtol=1e-5, atol=1e-5)

    program = mlflow.pytorch.load_model(logged.model_uri)  # the torch flavor: a torch.export program
    with torch.no_grad():
        torch.testing.assert_close(program(torch.from_numpy(x)), expected, rtol=1e-5, atol=1e-5)

    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, -1, -1)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, expected.shape[1])
    assert info.metadata["img_size"] == 32 and info.metadata["mean"] == [0.485, 0.456, 0.406]
    run = MlflowClient(store).get_run(run_id)
    assert [m.model_id for m in run.outputs.model_outputs] == [info.model_id]  # the run's model (UI: Logged models)


@pytest.mark.slow  # two models logged and one loaded: about 20 s here
def test_register_model_adds_a_version_per_run(tmp_path: Path, store: str) -> None:
    checkpoint = _checkpoint(tmp_path / "ckpt", f"tracking.register_model={REGISTERED}")
    runs = [create_run(store, "models", f"run{i}", {}) for i in range(2)]
    logged = [log_teacher_model(store, run_id, checkpoint, step=5, log=print) for run_id in runs]
    assert [m.version if m else None for m in logged] == ["1", "2"]

    versions = MlflowClient(store).search_model_versions(f"name = '{REGISTERED}'")
    assert sorted((str(v.version), v.run_id) for v in versions) == [("1", runs[0]), ("2", runs[1])]
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/2")
    teacher, _, _ = load_teacher(checkpoint)
    x = normalize_crops([torch.from_numpy(_digits_like(2))], "cpu")[0]
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(x.numpy()), teacher.backbone(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_be_logged_costs_a_warning_not_the_run(tmp_path: Path, store: str) -> None:
    run_id = create_run(store, "models", "run", {})
    lines: list[str] = []
    assert log_teacher_model(store, run_id, tmp_path / "no-checkpoint", step=0, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("raydino: warning: the teacher backbone was not logged")
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"
