"""Build a segmentation-models-pytorch model from a :class:`ModelConfig`.

``model.encoder_weights`` is null (random), a local state-dict file, or a name smp knows for the
encoder (``imagenet``, ...), which smp downloads from the Hugging Face Hub on first use and reads
from its cache after; nothing is downloaded unless a name is asked for.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ..config import ConfigError, ModelConfig

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def build_model(cfg: ModelConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The smp model ``cfg.arch`` with encoder ``cfg.encoder_name`` and ``num_classes`` outputs.

    ``pretrained=False`` skips ``encoder_weights`` (for a model about to receive a checkpoint's
    weights, so that inference never needs the network).
    """
    weights = cfg.encoder_weights if pretrained else None
    named = weights if weights and not is_weight_file(weights) else None
    try:
        model = smp.create_model(cfg.arch, encoder_name=cfg.encoder_name, encoder_weights=named,
                                 in_channels=cfg.in_channels, classes=num_classes, **cfg.kwargs)
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"model: cannot build arch={cfg.arch!r} encoder_name={cfg.encoder_name!r}"
                          f"{f' encoder_weights={named!r}' if named else ''}: {error}") from None
    except Exception as error:  # huggingface_hub's errors when the weights are neither reachable nor cached
        if named is None:
            raise
        raise ConfigError(_download_failure(cfg.encoder_name, named, error)) from None
    if weights and named is None:
        load_encoder_weights(model, Path(weights))
    return model


def is_weight_file(value: str) -> bool:
    """Whether ``model.encoder_weights`` names a local file (a path or a weights suffix) rather than smp weights."""
    return Path(value).suffix.lower() in WEIGHT_FILE_SUFFIXES or os.sep in value or "/" in value or Path(value).exists()


def _download_failure(encoder: str, weights: str, error: Exception) -> str:
    cache = _hub_cache()
    return (f"model.encoder_weights={weights!r}: smp could not fetch the {weights} weights of encoder {encoder} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}) and they are not in the "
            f"Hugging Face cache{f' ({cache})' if cache else ''}. Connect once to download them, or set "
            f"model.encoder_weights to a local state-dict file of the encoder")


def _hub_cache() -> Optional[str]:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return str(constants.HF_HUB_CACHE)


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a local encoder state dict (a plain state dict, or one nested under ``state_dict``/``model``)."""
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: file not found: {path} (a path names a local state-dict file; "
                          f"a name smp knows, such as imagenet, is downloaded instead)")
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
