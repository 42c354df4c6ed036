"""What a run trains and with what, built once from the config: the model (as wrapped for DDP and
``torch.compile``), its weights' moving average, the loss, the optimiser and its schedule, and the
precision; with the state dicts a checkpoint keeps of them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import Config
from ..models import build_model
from .criterion import build_criterion
from .distributed import DistContext, data_parallel
from .ema import build_ema
from .optim import build_optimizer, build_scheduler
from .precision import Precision, resolve_precision
from .step import StepSettings


@dataclass
class TrainingParts:
    model: nn.Module  # what the step calls: the DDP and torch.compile wrappers included
    bare_model: nn.Module  # what checkpoints hold: no "module."/"_orig_mod." keys
    ddp_model: Optional[nn.Module]  # for no_sync during accumulation
    ema: Optional[AveragedModel]
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step_settings: StepSettings

    @property
    def precision(self) -> Precision:
        return self.step_settings.precision

    @property
    def evaluated_model(self) -> nn.Module:
        """The module validation runs: the weights' moving average under ``train.ema``, else the
        trained model (as wrapped for DDP or torch.compile)."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def evaluated_weights(self) -> nn.Module:
        """:attr:`evaluated_model` unwrapped: the module whose state dict ``best.pt`` holds."""
        return self.ema.module if self.ema is not None else self.bare_model

    def state_dict(self, evaluated: bool = False) -> Dict[str, Any]:
        """The state dicts a checkpoint holds; ``evaluated``: the scored weights as the model's (``best.pt``)."""
        return {
            "model": (self.evaluated_weights if evaluated else self.bare_model).state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, checkpoint: Dict[str, Any], model_state: Dict[str, Any]) -> None:
        """Put back a checkpoint's state dicts (``model_state``: its model's, checked); without an
        ``"ema"`` entry the average starts from these weights."""
        self.bare_model.load_state_dict(model_state)
        self.criterion.load_state_dict(checkpoint["criterion"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])


def build_training_parts(cfg: Config, dist: DistContext, total_steps: int) -> TrainingParts:
    """The parts of the run ``cfg`` on this process's device, the schedule spanning ``total_steps``."""
    device, train = dist.device, cfg.train
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    model = data_parallel(build_model(cfg.model, cfg.data.num_classes).to(device, memory_format=memory_format),
                          dist, train.find_unused_parameters)
    bare_model = model.module if dist.enabled else model
    precision = resolve_precision(train.amp, device)
    optimizer = build_optimizer(cfg.optim, model)
    return TrainingParts(
        model=torch.compile(model) if train.compile else model,
        bare_model=bare_model,
        ddp_model=model if dist.enabled else None,
        ema=build_ema(train.ema, bare_model) if train.ema else None,
        criterion=build_criterion(cfg.loss, cfg.data.num_classes, cfg.data.ignore_index).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.schedule, optimizer, total_steps, cfg.optim.lr),
        scaler=precision.grad_scaler(),
        step_settings=StepSettings(device, precision, memory_format, train.grad_clip or math.inf),
    )
