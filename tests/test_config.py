import pytest

from raydino.config import PRESETS, Config, ConfigError, flatten, load_config
from raydino.config.registry import CENTERING_MODES


def test_default_is_cpu_demo():
    cfg = load_config()
    assert cfg.model.img_size == 16 and cfg.data.source == "digits" and cfg.loss.vmf


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_saved_as_yaml_loads_back_as_the_same_run(preset, tmp_path):
    cfg = load_config(preset=preset)
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())  # what a checkpoint keeps as config.yaml
    assert load_config(path).flat() == cfg.flat()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_state_only_what_differs_from_the_defaults(preset):
    defaults, cfg = Config().flat(), load_config(preset=preset).flat()
    restated = [key for key in flatten(PRESETS[preset]) if cfg[key] == defaults[key]]
    assert restated == [], f"{preset} restates defaults: {restated}"


def test_imagenet_recipes():
    small, base = load_config(preset="imagenet_vit_small"), load_config(preset="imagenet_vit_base")
    assert small.model.name == "vit_small_patch16_224" and base.model.name == "vit_base_patch16_224"
    assert small.head.num_prototypes == base.head.num_prototypes == 65536
    assert small.head.bottleneck_dim == 256 and small.loss.student_temp == 0.1
    assert (small.loss.warmup_teacher_temp, small.loss.teacher_temp) == (0.04, 0.07)
    assert base.data.crops.local_number == 10 and base.data.crops.global_scale == (0.25, 1.0)
    assert base.lr == pytest.approx(7.5e-4 * base.global_batch_size / 1024)


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: imagenet_vit_small\nloss:\n  vmf: true\n  centering: probability\n")
    cfg = load_config(path, ["head.norm_last_layer=false", "data.crops.local_scale=[0.1, 0.3]"])
    assert cfg.model.name == "vit_small_patch16_224"
    assert cfg.loss.vmf and cfg.loss.centering == "probability" and not cfg.head.norm_last_layer
    assert cfg.data.crops.local_scale == (0.1, 0.3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.vmff=true", "unknown key 'loss.vmff'; valid keys in loss: method, vmf, student_temp"),
        ("los.vmf=true", "unknown key 'los'"),
        ("loss.student_temp=0", r"loss.student_temp: .*greater than 0 .*allowed: 0.0 < value <= 1.0"),
        ("loss.center_momentum=1.5", r"loss.center_momentum: .*allowed: 0.0 <= value < 1.0"),
        ("loss.centering=foo", "loss.centering: .*allowed: one of auto, logit, probability, sinkhorn, none$"),
        ("head.num_layers=x", "head.num_layers: .*valid integer"),
        ("data.crops.global_scale=[0.5,0.2]", r"data.crops.global_scale=\(0.5, 0.2\): need 0 < low <= high <= 1"),
        ("optim.warmup_epochs=500", "optim.warmup_epochs=500.0 exceeds optim.epochs=64"),
        ("data.source=imagefolder", "data.source='imagefolder' needs data.path"),
        ("loss.vmf", "not of the form section.key=value"),
        ("loss.vmf.x=1", "'vmf' is a value, not a section"),
        ("data.batch_size_per_worker=-4", r"data.batch_size_per_worker: .*allowed: 1 <= value"),
        ("data.crops.local_size=-8", r"data.crops.local_size: .*allowed: 8 <= value <= 4096"),
        ("data.crops.local_number=100", r"data.crops.local_number: .*allowed: 0 <= value <= 64"),
        ("data.crops.global_size=4", r"data.crops.global_size: .*allowed: 8 <= value <= 4096"),
        ("data.source=webdataset", "data.source: .*allowed: one of digits, fashion_mnist, imagefolder, images"),
        ("optim.nonfinite_loss=ignore", "optim.nonfinite_loss: .*allowed: one of stop, skip"),
        ("checkpoint.max_failures=-2", r"checkpoint.max_failures: .*allowed: -1 <= value"),
        ("scaling.placement_strategy=RANDOM", "scaling.placement_strategy: .*one of PACK, SPREAD"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_registered_model_needs_the_logged_model():
    with pytest.raises(ConfigError, match="tracking.register_model='dino' registers the MLflow model that "
                                          "tracking.log_model=false turns off"):
        load_config(overrides=["tracking.register_model=dino", "tracking.log_model=false"])
    assert load_config(overrides=["tracking.register_model=dino"]).tracking.log_model


def test_local_crops_larger_than_the_global_ones_are_refused_only_when_there_are_local_crops():
    with pytest.raises(ConfigError, match="local_size=64 exceeds data.crops.global_size=16"):
        load_config(overrides=["data.crops.local_number=2", "data.crops.local_size=64"])
    assert load_config(overrides=["data.crops.local_number=0", "data.crops.local_size=64"]).data.crops.local_number == 0


def test_missing_file_and_bad_preset(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(preset="nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_a_directory_given_as_the_config_file_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a directory; --config takes a YAML file"):
        load_config(tmp_path)


def test_a_short_run_cuts_the_presets_warmups_with_a_warning():
    cfg = load_config(overrides=["optim.epochs=1"])  # cpu_demo warms the lr up over 2 epochs
    assert cfg.optim.epochs == 1 and cfg.optim.warmup_epochs == 1 and cfg.optim.freeze_last_layer_epochs == 1
    assert cfg.warnings() == [(
        "optim.warmup_epochs=2 (preset cpu_demo) exceeds optim.epochs=1: cut to 1 for this run; "
        "set optim.warmup_epochs to choose another"
    )]
    base = load_config(preset="imagenet_vit_base", overrides=["optim.epochs=2"])  # 10, 3 and 50 epochs there
    assert (base.optim.warmup_epochs, base.optim.freeze_last_layer_epochs, base.loss.warmup_teacher_temp_epochs) == (
        2, 2, 2)
    assert [line.split("=")[0] for line in base.warnings()] == [
        "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "loss.warmup_teacher_temp_epochs"]
    assert load_config().warnings() == []


@pytest.mark.parametrize("where", ["override", "file", "section"])
def test_a_warmup_the_user_set_longer_than_the_run_stays_an_error(where, tmp_path):
    path, overrides = None, ["optim.epochs=1"]
    if where == "override":
        overrides.append("loss.warmup_teacher_temp_epochs=2")
    elif where == "section":
        overrides.append("loss={warmup_teacher_temp_epochs: 2}")
    else:
        path = tmp_path / "run.yaml"
        path.write_text("loss:\n  warmup_teacher_temp_epochs: 2\n")
    with pytest.raises(ConfigError, match="loss.warmup_teacher_temp_epochs=2.0 exceeds optim.epochs=1; lower "
                                          "loss.warmup_teacher_temp_epochs or raise optim.epochs"):
        load_config(path, overrides)


def test_flat_roundtrip_and_yaml():
    cfg = load_config()
    flat = cfg.flat()
    assert flat["loss.vmf"] is True and flat["model.kwargs"]["patch_size"] == 4
    overrides = [f"{k}={'null' if v is None else v}" for k, v in flat.items() if k.startswith("loss.")]
    assert load_config(overrides=overrides).flat() == flat
    assert "bottleneck_dim: 64" in cfg.to_yaml()


@pytest.mark.parametrize("mode", ["auto", *CENTERING_MODES])
def test_every_centering_mode_a_config_accepts_builds_a_loss(mode):
    from raydino.objectives import build_objective

    cfg = load_config(overrides=[f"loss.centering={mode}", "loss.method=ibot"])
    terms = build_objective(cfg).terms
    classes = {"logit": "LogitCentering", "probability": "ProbabilityCentering", "sinkhorn": "SinkhornCentering",
               "none": "NoCentering"}
    centering = terms["cls"].teacher.centering
    assert type(centering).__name__ == classes[cfg.loss.centering]  # auto: cpu_demo is vMF, so probability
    assert type(terms["patch"].teacher.centering) is type(centering)


def test_the_crop_pool_is_fixed_or_scales_with_the_train_workers():
    assert load_config(overrides=["data.num_crop_actors=3"]).crop_pool() == (3, 3)
    pooled = load_config(overrides=["data.crop_actors_per_worker=[0.5, 2.5]", "scaling.num_workers=3"])
    assert pooled.crop_pool() == (2, 8)  # ceil(1.5), ceil(7.5)
    assert load_config(preset="imagenet_vit_base").crop_pool() == (32, 256)  # 1 to 8 per worker, 32 workers
    with pytest.raises(ConfigError, match=r"crop_actors_per_worker=\(2.0, 1.0\): need 0 < min <= max"):
        load_config(overrides=["data.crop_actors_per_worker=[2, 1]"])
