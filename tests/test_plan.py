"""What pretrain resolves once before Ray starts: storage, run name, data path; the registries."""

import pytest

from raydino.config import ConfigError, load_config
from raydino.config.registry import DATA_SOURCES, require_all
from raydino.launch.plan import check_data_path, plan_run
from raydino.stores.run_storage import StorageError, resolve_storage


def test_local_storage_is_absolute_and_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_run(load_config(overrides=["checkpoint.storage_path=runs"]))
    assert plan.storage == str(tmp_path / "runs") and (tmp_path / "runs").is_dir()
    assert plan.run_name.startswith("dino-vmf-digits-") and plan.cfg.tracking.run_name == plan.run_name
    assert resolve_storage(None) == str(tmp_path / "raydino_runs")


def test_unwritable_storage_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not writable.*checkpoint.storage_path"):
        resolve_storage(blocker / "runs")


def test_missing_data_path_fails_before_anything_starts(tmp_path):
    cfg = load_config(overrides=["data.source=imagefolder", f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="<class_name>"):
        check_data_path(cfg)
    with pytest.raises(FileNotFoundError):
        plan_run(cfg)


@pytest.mark.parametrize(
    "source,files,message",
    [
        ("imagefolder", [], "has no class subdirectories; expected <path>/<class_name>/<image files>"),
        ("imagefolder", ["x.jpg", "notes/readme.txt"], "has no class subdirectories"),  # a hidden dir is no class
        ("imagefolder", ["a/readme.txt", "b/", "x.jpg"], (r"has no image files \(jpg, jpeg, png.*\) in its class "
                                                          "directories; expected <path>/<class_name>/<image files>")),
        ("images", [], r"has no image files \(jpg, jpeg, png.*\); expected a directory holding image files"),
        ("images", ["a/b/readme.txt", "c.jpg.txt"], "has no image files"),
    ],
)
def test_a_data_folder_without_images_fails_before_anything_starts(tmp_path, source, files, message):
    root = tmp_path / "data"
    root.mkdir()
    for name in files:
        path = root / (name.replace("notes/", ".notes/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            path.write_text("not an image")
    cfg = load_config(overrides=[f"data.source={source}", f"data.path={root}"])
    with pytest.raises(FileNotFoundError, match=f"data path '{root}' {message}"):
        check_data_path(cfg)
    image = root / ("b/deep/x.PNG" if source == "imagefolder" else "a/b/x.PNG")
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"")  # one image is enough: the listing stops there
    check_data_path(cfg)


@pytest.mark.parametrize("source", sorted(DATA_SOURCES))
def test_every_registered_source_is_a_config_choice_and_file_sources_need_a_path(source, tmp_path):
    if DATA_SOURCES[source].needs_path:
        with pytest.raises(ConfigError, match=f"data.source=.{source}. needs data.path"):
            load_config(overrides=[f"data.source={source}"])
        assert load_config(overrides=[f"data.source={source}", f"data.path={tmp_path}"]).data.source == source
    else:
        assert load_config(overrides=[f"data.source={source}"]).data.path is None
    with pytest.raises(ConfigError, match="allowed: one of " + ", ".join(DATA_SOURCES)):
        load_config(overrides=["data.source=nope"])


def test_an_unregistered_implementation_fails_at_import():
    with pytest.raises(ImportError, match="not implemented \\['b'\\], not registered \\['c'\\]"):
        require_all({"a": 1, "b": 2}, ["a", "c"], "things")


def test_the_standard_train_val_layout_gives_a_knn_by_default(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
        (tmp_path / "imagenet" / split / "n01440764" / "a.JPEG").write_bytes(b"")  # listed, never decoded here
    train = tmp_path / "imagenet" / "train"
    plan = plan_run(load_config(preset="imagenet_vit_small", overrides=[f"data.path={train}",
                                                                         f"checkpoint.storage_path={tmp_path}/runs"]))
    assert (plan.cfg.eval.train_path, plan.cfg.eval.test_path) == (str(train), str(tmp_path / "imagenet" / "val"))
    explicit = plan_run(load_config(overrides=["data.source=imagefolder", f"data.path={train}",
                                               f"eval.train_path={train}", f"eval.test_path={train}",
                                               f"checkpoint.storage_path={tmp_path}/runs"]))
    assert explicit.cfg.eval.test_path == str(train)  # the user's choice stands
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a" / "x.png").write_bytes(b"")
    flat = plan_run(load_config(overrides=["data.source=imagefolder", f"data.path={tmp_path / 'flat' / 'train'}",
                                           f"checkpoint.storage_path={tmp_path}/runs"]))
    assert flat.cfg.eval.test_path is None  # no val folder beside it: no kNN unless the user sets one
