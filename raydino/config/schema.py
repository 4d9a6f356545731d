"""One typed, validated configuration for a raydino run, with presets.

Built from a preset, then a YAML file, then dotted overrides (``loss.vmf=true``),
validated once at load: unknown keys and out-of-range values fail with a message
that names the key and what is allowed. ``Config.lr`` applies the batch-size scaling
of the learning rate; ``raydino.launch.plan.plan_run`` fills in the run name and storage, and
that config is what gets logged and checkpointed. Choices (data sources, centering
modes) come from ``raydino.config.registry``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from raydino.config.presets import DEFAULT_PRESET, PRESETS
from raydino.config.registry import CENTERING_MODES, DATA_SOURCES, choice_type
from raydino.config.schedules import Schedules

CenteringMode = choice_type(CENTERING_MODES)
CenteringChoice = choice_type(["auto", *CENTERING_MODES])
SourceName = choice_type(DATA_SOURCES)


class ConfigError(ValueError):
    """A configuration problem, with a message that says which key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("vit_small_patch16_224", min_length=1, description="timm model name")
    img_size: int = Field(224, ge=8, le=4096, description="size the position embeddings are made for")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm overrides: patch_size, depth ...")


class HeadConfig(_Section):
    num_prototypes: int = Field(65536, ge=2, le=1_048_576)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=2, le=65536, description="p: the vMF sphere is S^(p-1)")
    num_layers: int = Field(3, ge=1, le=8)
    use_bn: bool = False
    norm_last_layer: bool = True
    patch_prototypes: Literal["shared", "separate"] = Field(
        "shared", description="iBOT: score patch tokens with the [CLS] prototypes or with their own"
    )
    num_patch_prototypes: int | None = Field(None, ge=2, le=1_048_576, description="separate: default num_prototypes")


class MaskConfig(_Section):
    """iBOT's block-wise masks on the student's global crops (used with loss.method=ibot)."""

    ratio: tuple[float, float] = Field((0.1, 0.5), description="prediction ratio range of a masked image")
    unmasked_share: float = Field(0.5, ge=0.0, lt=1.0, description="share of images left unmasked")
    aspect: tuple[float, float] = Field((0.3, 1 / 0.3), description="block aspect ratio range")

    @model_validator(mode="after")
    def _ranges(self) -> MaskConfig:
        lo, hi = self.ratio
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"mask.ratio=({lo}, {hi}): need 0 < low <= high < 1 (fractions of the patches)")
        a, b = self.aspect
        if not 0.0 < a <= 1.0 <= b:
            raise ValueError(f"mask.aspect=({a}, {b}): need 0 < low <= 1 <= high")
        return self


class LossConfig(_Section):
    method: Literal["dino", "ibot"] = Field("dino", description="ibot adds masked patch prediction (iBOT)")
    vmf: bool = False
    student_temp: float = Field(0.1, gt=0.0, le=1.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0, le=1.0)
    teacher_temp: float = Field(0.04, gt=0.0, le=1.0)
    warmup_teacher_temp_epochs: float = Field(0, ge=0)
    centering: CenteringChoice = Field(
        "auto", description="auto: probability with loss.vmf (the paper's), logit without (DINO's); resolved at load"
    )
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    sinkhorn_iterations: int = Field(3, ge=1, le=100)
    koleo_weight: float = Field(0.0, ge=0.0, description="KoLeo anti-collapse term on student features (DINOv2: 0.1)")
    warmup_teacher_patch_temp: float = Field(0.04, gt=0.0, le=1.0, description="iBOT: patch teacher temperature")
    teacher_patch_temp: float = Field(0.07, gt=0.0, le=1.0)
    patch_centering: CenteringChoice = Field(
        "auto", description="iBOT: the patch center's mode; auto (or null): the same as loss.centering"
    )
    lambda1: float = Field(1.0, ge=0.0, description="iBOT: weight of the [CLS] loss")
    lambda2: float = Field(1.0, ge=0.0, description="iBOT: weight of the patch loss")

    _auto: frozenset[str] = PrivateAttr(default_factory=frozenset)
    """The centering keys that were ``auto`` before resolution (``with_overrides`` resolves them again)."""

    @model_validator(mode="wrap")
    @classmethod
    def _resolve_auto(cls, data: Any, handler: Any) -> LossConfig:
        """Resolve ``auto`` centering from ``vmf`` before validation, and remember which keys were auto."""
        auto: set[str] = set()
        if isinstance(data, Mapping):
            data = dict(data)
            try:
                vmf = TypeAdapter(bool).validate_python(data.get("vmf", False))
            except ValidationError:
                vmf = False  # the field's own validation reports the bad value
            if data.get("centering", "auto") == "auto":
                data["centering"] = default_centering(vmf)
                auto.add("centering")
            if data.get("patch_centering", "auto") in ("auto", None):  # None: configs written before auto
                valid = data["centering"] in CENTERING_MODES  # else only loss.centering's own error is reported
                data["patch_centering"] = data["centering"] if valid else "auto"
                auto.add("patch_centering")
        out = handler(data)
        if auto:
            out._auto = frozenset(auto)
        return out


def default_centering(vmf: bool) -> str:
    """What ``auto`` centering means: probability for the vMF methods, logit for DINO / iBOT.

    With logit centering the teacher's per-prototype log-normalisers enter the running center
    one-for-one and are subtracted again, so the teacher half of the vMF correction cancels
    (docs/objective.md section 4); the paper centres probabilities for that reason.
    """
    return "probability" if vmf else "logit"


class CropsConfig(_Section):
    global_size: int = Field(224, ge=8, le=4096)
    local_size: int = Field(96, ge=8, le=4096)
    local_number: int = Field(8, ge=0, le=64)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian blur sigma range in pixels (DINO's)")
    blur_sigma_per_224px: bool = Field(
        False, description="scale blur_sigma by crop size / 224 (for tiny images); DINO blurs every crop by 0.1-2 px"
    )
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flip probability (DINO: 0.5)")
    color_jitter_p: float = Field(
        0.8, ge=0.0, le=1.0, description="probability of DINO's colour jitter (brightness, contrast 0.4; saturation 0.2; hue 0.1)"
    )
    solarize_p: float = Field(0.2, ge=0.0, le=1.0, description="solarize probability of the second global crop (DINO: 0.2)")

    @model_validator(mode="after")
    def _scales(self) -> CropsConfig:
        if self.local_number and self.local_size > self.global_size:
            raise ValueError(
                f"data.crops.local_size={self.local_size} exceeds data.crops.global_size={self.global_size}: "
                "local crops are the small views; make them smaller than the global crops"
            )
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"data.crops.{key}=({lo}, {hi}): need 0 < low <= high <= 1 (fractions of the image area)")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi <= 100.0:
            raise ValueError(f"data.crops.blur_sigma=({lo}, {hi}): need 0 < low <= high <= 100 (pixels)")
        return self


class DataConfig(_Section):
    source: SourceName = "digits"
    path: str | None = Field(
        None, description="directory for the file sources (imagefolder, images): a local path or a URI (s3://...)"
    )
    max_files: int | None = Field(
        None, ge=1, description="train on a seeded, class-stratified sample of at most this many files of "
        "data.path (default: all): cluster rehearsals, sweeps on a subset",
    )
    batch_size_per_worker: int = Field(64, ge=1)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    num_crop_actors: int = Field(1, ge=1, le=4096, description="Ray Data CPU actors running multi-crop (a fixed pool)")
    crop_actors_per_worker: tuple[float, float] | None = Field(
        None,
        description="an autoscaling pool instead: (min, max) crop actors per train worker; Ray Data grows it "
        "while the trainers wait on crops, up to max",
    )
    cpus_per_crop_actor: float = Field(1.0, gt=0.0)
    crop_actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources per crop actor, e.g. {data_node: 1} to keep them on CPU-only nodes",
    )
    crop_batch_size: int = Field(64, ge=1, description="images per multi-crop actor call")

    @model_validator(mode="after")
    def _pool(self) -> DataConfig:
        if self.crop_actors_per_worker is not None:
            lo, hi = self.crop_actors_per_worker
            if not 0.0 < lo <= hi <= 1024:
                raise ValueError(f"data.crop_actors_per_worker=({lo}, {hi}): need 0 < min <= max <= 1024")
        return self
    shuffle_buffer_batches: int = Field(4, ge=0, description="local shuffle buffer, in training batches")

    @model_validator(mode="after")
    def _path(self) -> DataConfig:
        layout = DATA_SOURCES[self.source].layout
        if layout is not None and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path ({layout})")
        return self


class OptimConfig(_Section):
    epochs: int = Field(100, ge=1)
    base_lr: float = Field(5e-4, gt=0.0, le=1.0, description="lr for a global batch of 256")
    min_lr: float = Field(1e-6, ge=0.0, le=1.0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0.0, le=10.0)
    weight_decay_end: float = Field(0.4, ge=0.0, le=10.0)
    clip_grad: float = Field(3.0, ge=0.0, description="max gradient norm; 0 disables clipping")
    clip_mode: Literal["per_param", "global"] = Field(
        "per_param",
        description="per_param: each parameter's gradient to norm clip_grad (DINO's and iBOT's clip_gradients); "
        "global: the norm of the whole student's gradient",
    )
    freeze_last_layer_epochs: float = Field(1, ge=0)
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0)
    decay_prototype_norms: bool = True
    layer_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="layer-wise lr decay (iBOT, DINOv2): block l of L trains at "
        "lr * layer_decay ** (L + 1 - l), the embeddings slowest; 1.0 = off",
    )
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    compile: bool = Field(False, description="torch.compile student and teacher (in place; minutes of compiling first)")
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="on a NaN/Inf loss: stop with the step and the last good checkpoint, or skip the step"
    )
    max_nonfinite_in_a_row: int = Field(5, ge=1, description="with nonfinite_loss=skip: stop after this many in a row")


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per train worker, e.g. {train_node: 1}"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the train workers over nodes (SPREAD: one per node where possible)"
    )
    start_timeout_s: float = Field(
        900.0, gt=0.0,
        description="on a shared or autoscaling cluster: how long a run waits for its train workers and its "
        "crop actors before it fails with what it needed and what was free",
    )


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = Field("raydino", min_length=1)
    run_name: str | None = Field(None, description="names the MLflow run and the Ray Train run (resume key)")
    log_every_steps: int = Field(10, ge=1)
    progress_seconds: float = Field(
        30.0, gt=0.0, description="rank 0 prints a progress line (images/s, data wait, ETA) this often within an epoch"
    )
    system_metrics: bool = Field(False, description="MLflow's system metrics (CPU, memory, GPU) for the run")
    flush_timeout_s: float = Field(
        60.0, ge=0.0,
        description="at the end of training, how long rank 0 waits for metrics MLflow has not confirmed; the rest "
        "is written to a file in the run directory (raydino replay-metrics sends it later)",
    )
    log_model: bool = Field(
        True,
        description="log the teacher backbone as an MLflow model at the end (a torch.export program: seconds of CPU "
        "per run; the safetensors export is logged either way)",
    )
    register_model: str | None = Field(
        None, min_length=1,
        description="register the run's teacher backbone (an MLflow model) as a new version of this registered model",
    )

    @model_validator(mode="after")
    def _registered_model_is_logged(self) -> TrackingConfig:
        if self.register_model is not None and not self.log_model:
            raise ValueError(
                f"tracking.register_model={self.register_model!r} registers the MLflow model that "
                "tracking.log_model=false turns off: set tracking.log_model=true or drop register_model"
            )
        return self


class EvalConfig(_Section):
    """Held-out labelled data for kNN / linear probe; the embedded sources bring their own split."""

    train_path: str | None = Field(None, description="ImageFolder used as the kNN memory bank")
    test_path: str | None = Field(None, description="ImageFolder whose kNN top-1 is reported")
    max_images: int = Field(5000, ge=10, description="per split, to keep per-epoch evaluation cheap")
    every_epochs: int = Field(1, ge=0, description="0: evaluate only at the end")
    knn_k: list[int] = Field(default_factory=lambda: [10, 20, 100])
    knn_temperature: float = Field(0.07, gt=0.0)


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0, description="0: at the end of every epoch only")
    num_to_keep: int = Field(2, ge=1)
    storage_path: str | None = Field(
        None, description="local directory or remote URI (s3://bucket/prefix) for Ray Train; default ./raydino_runs"
    )
    max_failures: int = Field(1, ge=-1, description="worker failures a run recovers from its latest checkpoint; -1: no limit")
    max_preemptions: int = Field(
        -1, ge=-1,
        description="node preemptions (a node drained for preemption, e.g. after a spot notice) a run recovers from "
        "its latest checkpoint, counted apart from max_failures; -1: no limit",
    )
    spot_notices: bool = Field(
        True,
        description="each node's first train worker polls the node's EC2 metadata service for a spot interruption "
        "notice and drains the node, so the run checkpoints at its next step (off EC2 the first poll fails and the "
        "watch stops)",
    )
    metadata_endpoint: str | None = Field(
        None, min_length=1,
        description="the instance metadata service spot notices come from; default: AWS_EC2_METADATA_SERVICE_ENDPOINT "
        "on the node, else http://169.254.169.254",
    )
    notice_poll_s: float = Field(5.0, gt=0.0, description="how often the metadata service is asked (AWS: every 5 s)")
    preemption_check_every_steps: int = Field(
        1, ge=1,
        description="how often the loop asks Ray Train whether a node is being preempted (a collective through one "
        "actor: about 1 ms per step with 1 worker, 2 ms with 2 on 2 cores); larger trades it for up to that many "
        "steps before the notice's checkpoint",
    )


class Config(_Section):
    seed: int = Field(0, ge=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)

    _notes: list[str] = PrivateAttr(default_factory=list)
    """What ``load_config`` changed on its own (warm-ups cut to a short run), reported by ``warnings``."""

    @property
    def method_name(self) -> str:
        """The method this config runs: dino, dino-vmf, ibot or ibot-vmf (a key of METHODS)."""
        return self.loss.method + ("-vmf" if self.loss.vmf else "")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        o = self.optim
        for key in ("warmup_epochs", "freeze_last_layer_epochs"):
            if getattr(o, key) > o.epochs:
                raise ValueError(
                    f"optim.{key}={getattr(o, key)} exceeds optim.epochs={o.epochs}; lower optim.{key} or raise optim.epochs"
                )
        if self.loss.warmup_teacher_temp_epochs > o.epochs:
            raise ValueError(
                f"loss.warmup_teacher_temp_epochs={self.loss.warmup_teacher_temp_epochs} exceeds optim.epochs={o.epochs}; "
                "lower loss.warmup_teacher_temp_epochs or raise optim.epochs"
            )
        if self.loss.koleo_weight > 0 and self.data.batch_size_per_worker < 2:
            raise ValueError("loss.koleo_weight > 0 needs data.batch_size_per_worker >= 2 (nearest neighbours in a batch)")
        if o.min_lr > o.base_lr:
            raise ValueError(f"optim.min_lr={o.min_lr} exceeds optim.base_lr={o.base_lr}")
        return self

    def warnings(self) -> list[str]:
        """Legal but surprising choices, one line each, for the driver to print once per run."""
        out = list(self._notes)
        lo = self.loss
        if lo.vmf:
            modes = {"loss.centering": lo.centering}
            if lo.method == "ibot":
                modes["loss.patch_centering"] = lo.patch_centering
            for key, mode in modes.items():
                if mode == "logit":
                    out.append(
                        f"{key}=logit with loss.vmf=true: the running center absorbs the teacher's vMF "
                        "log-normalisers and subtracts them again, so the teacher half of the correction cancels "
                        f"(docs/objective.md section 4); leave {key}=auto (probability) to run DINO-vMF as the paper does"
                    )
        return out

    def crop_pool(self) -> tuple[int, int]:
        """(min, max) multi-crop actors: fixed at ``data.num_crop_actors``, or ``data.crop_actors_per_worker``
        times the train workers (at least one actor)."""
        if self.data.crop_actors_per_worker is None:
            return self.data.num_crop_actors, self.data.num_crop_actors
        lo, hi = self.data.crop_actors_per_worker
        workers = self.scaling.num_workers
        return max(1, math.ceil(lo * workers - 1e-9)), max(1, math.ceil(hi * workers - 1e-9))

    @property
    def global_batch_size(self) -> int:
        return self.data.batch_size_per_worker * self.scaling.num_workers

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr * global batch / 256 (DINO's linear scaling rule)."""
        return self.optim.base_lr * self.global_batch_size / 256.0

    def schedules(self) -> Schedules:
        o, lo = self.optim, self.loss
        return Schedules(
            epochs=o.epochs,
            lr=self.lr,
            min_lr=o.min_lr,
            warmup_epochs=o.warmup_epochs,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            momentum_teacher=o.momentum_teacher,
            warmup_teacher_temp=lo.warmup_teacher_temp,
            teacher_temp=lo.teacher_temp,
            warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
            freeze_last_layer_epochs=o.freeze_last_layer_epochs,
            warmup_teacher_patch_temp=lo.warmup_teacher_patch_temp,
            teacher_patch_temp=lo.teacher_patch_temp,
        )

    @property
    def usage_temperature(self) -> float | None:
        """The teacher temperature prototype usage is measured at through the vMF logits (DINO-vMF runs);
        None: the raw scores' argmax (``raydino.eval.evaluate``, ``vmf_temperature``)."""
        return self.loss.teacher_temp if self.loss.vmf else None

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for logging as parameters and for comparing runs."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# the four methods as the config keys that select them (CLI --method, sweep --methods)
METHODS: dict[str, dict[str, Any]] = {
    "dino": {"loss.method": "dino", "loss.vmf": False},
    "dino-vmf": {"loss.method": "dino", "loss.vmf": True},
    "ibot": {"loss.method": "ibot", "loss.vmf": False},
    "ibot-vmf": {"loss.method": "ibot", "loss.vmf": True},
}


def parse_method(text: str) -> str:
    """A method as written by a user (``ibot_vmf``, ``iBOT-vMF``) -> its key in METHODS."""
    return text.strip().lower().replace("_", "-")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "kwargs":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "kwargs":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``loss.vmf=true`` -> (["loss", "vmf"], True); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (for example loss.vmf=true)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, label: str) -> None:
    """Set ``tree[a][b]...[z] = value`` for path [a, b, ..., z], creating sections on the way."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {label!r}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; an unknown section or key is caught at validation."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        _set_dotted(tree, path, value, text)
    return tree


def _field_info(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    model: type[BaseModel] | None = Config
    info = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return model, None
        info = model.model_fields[part]
        annotation = info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model, info


def _allowed(info: Any) -> str:
    """Describe a field's constraints, e.g. '0 < value <= 1' or 'one of logit, probability'."""
    if info is None or (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
        return ""
    choices = get_args(info.annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return "one of " + ", ".join(choices)
    low = high = ""
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Gt):
            low = f"{meta.gt} < "
        elif isinstance(meta, annotated_types.Ge):
            low = f"{meta.ge} <= "
        elif isinstance(meta, annotated_types.Lt):
            high = f" < {meta.lt}"
        elif isinstance(meta, annotated_types.Le):
            high = f" <= {meta.le}"
    if low or high:
        return f"{low}value{high}"
    return getattr(info.annotation, "__name__", str(info.annotation))


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str))
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            parent, _ = _field_info(loc[:-1]) if len(loc) > 1 else (Config, None)
            valid = ", ".join(parent.model_fields) if parent else ""
            where = ".".join(loc[:-1]) or "the top level"
            lines.append(f"unknown key '{key}'; valid keys in {where}: {valid}")
            continue
        _, info = _field_info(loc)
        allowed = _allowed(info)
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if loc and not isinstance(err["input"], dict) else ""
        if err["type"] == "value_error":  # our own cross-field checks already name their keys
            lines.append(msg)
        else:
            lines.append(f"{key}: {msg}{got}" + (f"; allowed: {allowed}" if allowed else ""))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested dict; raise ConfigError with one line per problem."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None) -> Config:
    """preset (default ``cpu_demo``, or the file's ``preset:`` key) <- YAML file <- overrides."""
    file_tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; --config takes a YAML file (e.g. run.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(file_tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(file_tree).__name__}")
    preset = preset or file_tree.pop("preset", None) or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tree = apply_overrides(_deep_merge(_deep_merge({}, PRESETS[preset]), file_tree), overrides or [])
    notes = _fit_warmups(tree, _user_keys(file_tree, overrides or []), preset)
    cfg = build_config(tree)
    cfg._notes = notes
    return cfg


WARMUP_KEYS = ("optim.warmup_epochs", "optim.freeze_last_layer_epochs", "loss.warmup_teacher_temp_epochs")
"""Lengths in epochs that must fit in ``optim.epochs``."""


def _user_keys(file_tree: dict[str, Any], overrides: list[str]) -> set[str]:
    """Dotted keys a user set in the YAML file or the overrides (not the preset's, not the defaults)."""
    keys = set(flatten(file_tree))
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        keys |= {dotted, *(flatten(value, dotted + ".") if isinstance(value, dict) else {})}
    return keys


def _fit_warmups(tree: dict[str, Any], user_keys: set[str], preset: str) -> list[str]:
    """Cut warm-ups that come from the preset or the defaults to a shorter run's ``optim.epochs`` (a
    1-epoch smoke run), one warning line each; a warm-up the user set stays an error at validation."""
    optim = tree.get("optim")
    epochs = optim.get("epochs", OptimConfig.model_fields["epochs"].default) if isinstance(optim, dict) else None
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        return []  # validation reports the bad epochs
    notes = []
    for dotted in WARMUP_KEYS:
        section, key = dotted.split(".")
        node = tree.setdefault(section, {})
        if dotted in user_keys or not isinstance(node, dict):
            continue
        value = node.get(key, Config.model_fields[section].annotation.model_fields[key].default)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > epochs:
            node[key] = epochs
            notes.append(
                f"{dotted}={value} (preset {preset}) exceeds optim.epochs={epochs}: cut to {epochs} for this run; "
                f"set {dotted} to choose another"
            )
    return notes


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys set to already-typed values (a Tune trial's sample); validated."""
    tree = cfg.model_dump(mode="json")
    for key in cfg.loss._auto:  # centering that followed loss.vmf follows it again (a sweep arm may set vmf)
        tree["loss"][key] = "auto"
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted.split("."), copy.deepcopy(value), dotted)
    return build_config(tree)
