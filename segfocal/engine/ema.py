"""An exponential moving average of the weights (``train.ema``), through ``torch.optim.swa_utils``.

:class:`~torch.optim.swa_utils.AveragedModel` keeps the averaged copy, its update count and its
state dict; BatchNorm's running statistics are averaged with the weights (``use_buffers=True``, so
no ``update_bn`` pass is needed). The decay ramps up over the first updates, as TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` does: ``min(decay, (1 + n) / (warmup + n))`` after
``n`` updates, so the average is not held back by the random initial weights.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import EmaConfig


def ema_decay(decay: float, warmup: int, updates: int) -> float:
    """The decay of update number ``updates + 1`` (``updates`` already averaged)."""
    return min(decay, (1 + updates) / (warmup + updates)) if warmup else decay


def _warmed_ema(decay: float, warmup: int) -> Callable[[List[torch.Tensor], List[torch.Tensor], torch.Tensor], None]:
    """``multi_avg_fn`` for :class:`AveragedModel`: torch's EMA update at the decay of this update."""
    def update(averaged: List[torch.Tensor], current: List[torch.Tensor], updates: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay(decay, warmup, int(updates)))(averaged, current, updates)

    return update


def build_ema(cfg: EmaConfig, model: nn.Module) -> AveragedModel:
    """The averaged copy of ``model`` (the bare module, not a DDP or compiled wrapper)."""
    return AveragedModel(model, multi_avg_fn=_warmed_ema(cfg.decay, cfg.warmup), use_buffers=True)
