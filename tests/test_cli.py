import time

import pytest

from raydino.cli import main
from tests.tiny import TINY_RUN

FAST = [*TINY_RUN, "optim.epochs=1", "data.batch_size_per_worker=16"]


@pytest.mark.timeout(120)
def test_pretrain_smoke_prints_knn_against_random_init(capsys):
    assert main(["pretrain", "--local", "--max-steps", "2", *FAST]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out
    assert "kNN top-1 (k=20) of the pretrained teacher" in out and "random initialisation" in out


def test_invalid_override_fails_fast_with_the_key(capsys):
    assert main(["pretrain", "loss.teacher_temp=2"]) == 2
    err = capsys.readouterr().err
    assert "loss.teacher_temp" in err and "allowed: 0.0 < value <= 1.0" in err


def test_help_explains_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "cpu_demo" in capsys.readouterr().out


def test_method_names_select_the_config_keys(capsys):
    from raydino.cli import _parser
    from raydino.config import METHODS

    args = _parser().parse_args(["pretrain", "--method", "ibot_vmf"])
    assert args.method == "ibot-vmf" and METHODS[args.method] == {"loss.method": "ibot", "loss.vmf": True}
    with pytest.raises(SystemExit):
        _parser().parse_args(["pretrain", "--method", "mae"])


# --- mistakes a user makes, each one line (or a clear outcome) -------------------------------


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("raydino")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_max_steps_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--local", "--max-steps", "-1", *FAST])
    assert exit_.value.code == 2 and "--max-steps: must be at least 1, got -1" in capsys.readouterr().err


def test_max_steps_without_local_is_refused_before_anything_else(capsys):
    assert main(["pretrain", "--max-steps", "3", "loss.teacher_temp=2"]) == 2  # not the config error: this first
    line = _one_line(capsys.readouterr().err)
    assert line == "raydino: error: --max-steps needs --local; for a Ray run set optim.epochs (e.g. optim.epochs=1)"


@pytest.mark.timeout(120)
def test_a_local_run_without_a_single_batch_says_which_key(capsys):
    assert main(["pretrain", "--local", *FAST, "data.batch_size_per_worker=4096"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "exceeds the" in line and "training images of digits" in line and "lower data.batch_size_per_worker" in line


def test_help_says_what_local_skips_and_where_keys_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "writes no MLflow run and no checkpoint" in text
    assert "docs/usage.md section 'Settings'" in text and "raydino/config/schema.py" in text and "--print-config" in text


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import yaml

    from raydino.config import load_config

    monkeypatch.chdir(tmp_path)
    file = tmp_path / "mine.yaml"
    file.write_text("preset: imagenet_vit_small\nhead:\n  num_prototypes: 1000\n")
    argv = ["--config", str(file), "--method", "ibot", "--data", "/data/x/train", "--storage", "s3://b/runs",
            "optim.epochs=3", "seed=4"]
    assert main(["pretrain", "--print-config", *argv]) == 0
    out, err = capsys.readouterr()
    tree = yaml.safe_load(out)
    assert tree["loss"]["method"] == "ibot" and tree["data"]["path"] == "/data/x/train" and tree["seed"] == 4
    assert tree["head"]["num_prototypes"] == 1000 and tree["model"]["name"] == "vit_small_patch16_224"
    assert "optim.warmup_epochs=10 (preset imagenet_vit_small) exceeds optim.epochs=3" in err  # cut, and said so
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    expected = load_config(file, ["loss.method=ibot", "loss.vmf=false", "data.source=imagefolder",
                                  "data.path=/data/x/train", "checkpoint.storage_path=s3://b/runs", "optim.epochs=3",
                                  "seed=4"])
    assert load_config(printed).flat() == expected.flat()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml", "printed.yaml"]  # no mlflow.db, no runs


def test_presets_lists_every_preset_with_a_line(capsys):
    from raydino.config import PRESETS
    from raydino.config.presets import DESCRIPTIONS

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(PRESETS) == sorted(DESCRIPTIONS)
    assert all(len(line.split()) > 3 for line in lines)
    assert next(line for line in lines if line.endswith("[default]")).startswith("cpu_demo ")


@pytest.mark.parametrize("layout", ["empty", "text-files", "empty-classes"])
def test_a_data_folder_without_images_is_refused_before_an_mlflow_run(tmp_path, capsys, layout):
    from mlflow import MlflowClient

    data = tmp_path / "data"
    data.mkdir()
    if layout == "text-files":
        (data / "notes.txt").write_text("x")
    if layout == "empty-classes":
        for name in ("cat", "dog"):
            (data / name).mkdir()
            (data / name / "readme.txt").write_text("x")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.monotonic()
    assert main(["pretrain", "--data", str(data), "--storage", str(tmp_path / "runs"), f"tracking.uri={uri}"]) == 2
    assert time.monotonic() - started < 30
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"raydino: error: data path '{data}' has no ")
    assert ("image files" if layout == "empty-classes" else "class subdirectories") in line
    experiment = MlflowClient(uri).get_experiment_by_name("raydino")
    assert experiment is None or MlflowClient(uri).search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def checkpoint(tmp_path):
    import torch

    from raydino.config import load_config
    from raydino.step import DINOStep
    from raydino.train.checkpoint import TrainState, write_checkpoint
    from tests.tiny import TINY_NET

    cfg = load_config(overrides=TINY_NET)
    state = TrainState(**DINOStep.build(cfg, torch.device("cpu")).state_dict(), step=1, epoch=0, batch_in_epoch=1,
                       steps_per_epoch=1)
    return write_checkpoint(tmp_path / "checkpoint_000001", state, cfg.to_yaml())


def test_export_into_an_existing_directory_writes_the_file_there(checkpoint, tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["teacher_backbone.safetensors"]  # no .exports.tmp anywhere
    assert not list(tmp_path.glob(".*tmp"))
    assert f"wrote {out / 'teacher_backbone.safetensors'}" in capsys.readouterr().out


def test_export_below_a_file_or_into_a_read_only_directory_is_one_line(checkpoint, tmp_path, capsys):
    from tests.readonly import read_only

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["export", str(checkpoint), str(blocker / "sub" / "b.safetensors")]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"raydino: error: cannot write {blocker / 'sub' / 'b.safetensors'}: {blocker} is a file, not a directory; "
        "choose another output path")
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert main(["export", str(checkpoint), str(locked / "b.safetensors")]) == 2
        assert main(["export", str(checkpoint), str(locked)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {locked / 'b.safetensors'}: {locked} is not writable; choose a path in a writable" in err
    assert f"cannot write {locked / 'teacher_backbone.safetensors'}: {locked} is not writable" in err
    assert "Traceback" not in err and list(locked.iterdir()) == []
