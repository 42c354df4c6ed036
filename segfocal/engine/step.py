"""One optimiser step, as a plain function: the micro-batches of an accumulation group under
autocast, DDP's ``no_sync`` on all but the last, gradient clipping, and the non-finite check.

It knows nothing of epochs, checkpoints or logging (the :class:`~segfocal.engine.trainer.Trainer`
does), so it can be read in one screen and tested without a run directory.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .precision import Precision


@dataclass(frozen=True)
class StepSettings:
    """What a step needs of the run: where the tensors go, in which precision, and the clipping norm."""

    device: torch.device
    precision: Precision
    memory_format: torch.memory_format = torch.contiguous_format
    max_norm: float = math.inf  # train.grad_clip; inf measures the norm without clipping


@dataclass(frozen=True)
class StepOutcome:
    """What one step did: the sum of its micro-batches' losses (detached, on the device: read back
    only when logged), how many there were, and whether the weights moved (False: a loss or the
    gradient was not finite, a float16 scaler's overflow included, and the step was skipped)."""

    loss_sum: torch.Tensor
    micro_batches: int
    applied: bool


def train_step(model: nn.Module, micro_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], group_size: int,
               criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, settings: StepSettings,
               ddp_model: Optional[DistributedDataParallel] = None) -> StepOutcome:
    """Accumulate the gradient of ``group_size`` micro-batches and take one optimiser step.

    Each micro-batch's loss counts ``1 / group_size``, so every sample of the step weighs the same
    (an epoch's last group may be shorter). Micro-batches are read from ``micro_batches`` one at a
    time, as they are trained on. The step is skipped, and the gradient dropped, when any loss or
    the gradient's norm is not finite; a float16 scaler also lowers its scale then.
    """
    optimizer.zero_grad(set_to_none=True)  # the step depends on its own micro-batches only
    loss_sum = torch.zeros((), device=settings.device)
    losses_finite = torch.ones((), dtype=torch.bool, device=settings.device)
    count = 0
    for count, (images, targets) in enumerate(micro_batches, start=1):
        images = images.to(settings.device, non_blocking=True, memory_format=settings.memory_format)
        targets = targets.to(settings.device, non_blocking=True)
        with _gradient_sync(ddp_model, sync=count == group_size):
            with settings.precision.autocast():
                logits = model(images)
            loss = criterion(logits, targets)
            scaler.scale(loss / group_size).backward()
        loss_sum += loss.detach()
        losses_finite &= torch.isfinite(loss.detach())
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_norm)
    # the step's one host synchronisation; a finite norm of the unscaled gradient is exactly what a
    # float16 scaler's own overflow check would find, so the scaler never skips a step counted as applied
    applied = bool(torch.isfinite(grad_norm) & losses_finite)
    if applied:
        scaler.step(optimizer)  # a disabled scaler is optimizer.step()
    scaler.update()  # an enabled one lowers its scale after an overflow
    optimizer.zero_grad(set_to_none=True)  # free the gradient before the data of the next step arrives
    return StepOutcome(loss_sum, count, applied)


def _gradient_sync(ddp_model: Optional[DistributedDataParallel], sync: bool) -> ContextManager:
    """Under DistributedDataParallel, all-reduce gradients only on a group's last micro-batch
    (``no_sync`` on the others: the communication of one step, not one per micro-batch)."""
    if sync or ddp_model is None:
        return contextlib.nullcontext()
    return ddp_model.no_sync()
