"""Run configuration: pydantic models (:mod:`.schema`), the YAML loader (:mod:`.loader`) and its
one-line errors (:mod:`.errors`)."""
from .errors import ConfigError
from .loader import apply_override, config_from_tree, load_config, save_config, to_dict
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
    class_names,
)

__all__ = [
    "Config", "DataConfig", "EmaConfig", "SyntheticConfig", "AugmentConfig", "ModelConfig", "LossConfig", "LossTermConfig",
    "OptimConfig", "PatchesConfig", "ScheduleConfig", "TrainConfig", "EvalConfig",
    "ConfigError", "load_config", "config_from_tree", "save_config", "apply_override", "to_dict", "class_names",
]
