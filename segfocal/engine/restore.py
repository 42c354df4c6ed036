"""Rebuild a trained model for inference from a checkpoint or state-dict file, and its config.

One way for every caller (``tools/eval.py``, ``tools/predict.py``, :class:`segfocal.segmenter.Segmenter`):
the checkpoint is read once, the model is built from ``cfg.model`` and must take every weight
(a mismatch is a :class:`CheckpointError` naming the file), and it ends on the device in eval mode
with the run's memory format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..config import Config, config_from_tree
from ..models import build_model
from .checkpoint import CheckpointError, load_checkpoint, model_state_from

PathLike = Union[str, Path]


def restore_model(cfg: Config, checkpoint: PathLike, device: torch.device,
                  contents: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``cfg.model`` with the weights of ``checkpoint`` (a trainer checkpoint or a bare state dict), in
    eval mode; ``contents``: the checkpoint already read (it is not read again)."""
    return _model_with_weights(cfg, load_checkpoint(checkpoint) if contents is None else contents, checkpoint, device)


def restore_with_config(checkpoint: PathLike, device: torch.device, cfg: Optional[Config] = None,
                        contents: Optional[Dict[str, Any]] = None) -> Tuple[Config, nn.Module]:
    """``(config, model)`` from ``checkpoint``: ``cfg`` if given, else the config the trainer saved in it.

    A bare state dict holds no config: without ``cfg`` it is a :class:`CheckpointError` naming the file.
    ``contents``: the checkpoint already read.
    """
    contents = load_checkpoint(checkpoint) if contents is None else contents
    cfg = cfg if cfg is not None else saved_config(contents, checkpoint)
    return cfg, _model_with_weights(cfg, contents, checkpoint, device)


def saved_config(contents: Dict[str, Any], source: PathLike, overrides: Iterable[str] = ()) -> Config:
    """The resolved config that :class:`~segfocal.engine.trainer.Trainer` stores under ``"config"``,
    with ``key=value`` ``overrides`` applied (e.g. ``data.root`` on another machine).

    Raises :class:`CheckpointError` naming ``source`` when there is none, and
    :class:`~segfocal.config.ConfigError` naming it when the stored config is no longer valid.
    """
    raw = contents.get("config")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} holds no config (a bare state dict?): pass the run's config "
                              f"(its config.yaml, or a Config) along with it")
    return config_from_tree(dict(raw), overrides, source=f"config stored in {source}")


def prepare_for_inference(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in eval mode, channels-last if the run trained that way (as it was validated)."""
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format).eval()


def _model_with_weights(cfg: Config, contents: Dict[str, Any], source: PathLike, device: torch.device) -> nn.Module:
    model = build_model(cfg.model, cfg.data.num_classes, pretrained=False)  # the checkpoint brings the weights
    state = model_state_from(contents, source)  # a CheckpointError of its own; load_state_dict's come below
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{source} does not fit model {cfg.model.arch}/{cfg.model.encoder_name} with "
            f"{cfg.data.num_classes} classes: {str(error).splitlines()[0]}"
        ) from None
    return prepare_for_inference(model, cfg, device)
