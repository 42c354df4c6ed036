"""Optimiser and learning-rate schedule from the config."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over the trainable parameters; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps out of ``total_steps``."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    if cfg.name == "poly":
        shape = (1.0 - progress) ** cfg.power
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int, base_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` (its state dict saves the step count, so resume continues the curve)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps, base_lr))
