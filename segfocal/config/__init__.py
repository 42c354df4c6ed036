"""Run configuration: dataclasses (:mod:`.schema`) and the YAML loader (:mod:`.loader`)."""
from .loader import ConfigError, apply_override, config_from_tree, load_config, save_config, to_dict
from .schema import (
    AugmentConfig,
    Config,
    DataConfig,
    EmaConfig,
    EvalConfig,
    LossConfig,
    LossTermConfig,
    ModelConfig,
    OptimConfig,
    PatchesConfig,
    ScheduleConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "Config", "DataConfig", "EmaConfig", "SyntheticConfig", "AugmentConfig", "ModelConfig", "LossConfig", "LossTermConfig",
    "OptimConfig", "PatchesConfig", "ScheduleConfig", "TrainConfig", "EvalConfig",
    "ConfigError", "load_config", "config_from_tree", "save_config", "apply_override", "to_dict",
]
