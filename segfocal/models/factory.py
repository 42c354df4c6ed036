"""Build a segmentation-models-pytorch model from a :class:`ModelConfig`, offline."""
from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ..config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The smp model ``cfg.arch`` with encoder ``cfg.encoder_name`` and ``num_classes`` outputs.

    Nothing is downloaded: ``encoder_weights`` is a local state-dict file for the encoder (or
    null for random initialisation).
    """
    try:
        model = smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder_name,
            encoder_weights=None,
            in_channels=cfg.in_channels,
            classes=num_classes,
            **cfg.kwargs,
        )
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"model: cannot build arch={cfg.arch!r} encoder_name={cfg.encoder_name!r}: {error}") from None
    if cfg.encoder_weights:
        load_encoder_weights(model, Path(cfg.encoder_weights))
    return model


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict (a plain state dict, or one nested under ``state_dict``/``model``)."""
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: file not found: {path} (weights are never downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign, truncated or unsafe files
        raise ConfigError(f"model.encoder_weights: cannot read {path} as a state dict of tensors (only weights "
                          f"are loaded, never pickled code): {str(error).splitlines()[0].split('. ')[0]}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.encoder_weights: {path} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.encoder.state_dict()
    matching = {key: value for key, value in state.items() if key in own}
    if not matching:
        raise ConfigError(f"model.encoder_weights: {path} holds no tensor of encoder {type(model.encoder).__name__}")
    try:  # smp encoders override load_state_dict (dropping classifier keys) and return nothing
        model.encoder.load_state_dict(matching, strict=False)
    except RuntimeError as error:
        raise ConfigError(f"model.encoder_weights: {path} does not fit encoder {type(model.encoder).__name__}: "
                          f"{str(error).splitlines()[0]}") from None
