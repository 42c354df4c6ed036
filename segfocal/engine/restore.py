"""Rebuild a trained model for inference from a config and a checkpoint or state-dict file."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..config import Config
from ..models import build_model
from .checkpoint import CheckpointError, load_checkpoint, model_state_from


def restore_model(cfg: Config, checkpoint: Union[str, Path], device: torch.device) -> nn.Module:
    """``cfg.model`` with the weights of ``checkpoint`` (a trainer checkpoint or a bare state dict), in eval mode."""
    model = build_model(cfg.model, cfg.data.num_classes)
    state = model_state_from(load_checkpoint(checkpoint), checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{checkpoint} does not fit model {cfg.model.arch}/{cfg.model.encoder_name} with "
            f"{cfg.data.num_classes} classes: {str(error).splitlines()[0]}"
        ) from None
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format).eval()
