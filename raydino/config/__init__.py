"""Configuration: the validated run config and the named choices it is checked against.

``schema`` is the config itself (pydantic, DINO's ``main_dino.py`` defaults, loading, overrides);
``presets`` the named starting points; ``registry`` the data sources and centering modes a user can
name; ``schedules`` the learning-rate, weight-decay, momentum and temperature schedules. Light on
purpose: no torch, no Ray, no MLflow, so every process (Ray Data's helpers too) can import it.
"""

from raydino.config.presets import DEFAULT_PRESET, PRESETS
from raydino.config.schema import (
    METHODS,
    CheckpointConfig,
    Config,
    ConfigError,
    CropsConfig,
    DataConfig,
    EvalConfig,
    HeadConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TrackingConfig,
    apply_overrides,
    build_config,
    default_centering,
    flatten,
    load_config,
    parse_method,
    parse_override,
    with_overrides,
)

__all__ = [
    "DEFAULT_PRESET",
    "METHODS",
    "PRESETS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CropsConfig",
    "DataConfig",
    "EvalConfig",
    "HeadConfig",
    "LossConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "ScalingConfig",
    "TrackingConfig",
    "apply_overrides",
    "build_config",
    "default_centering",
    "flatten",
    "load_config",
    "parse_method",
    "parse_override",
    "with_overrides",
]
