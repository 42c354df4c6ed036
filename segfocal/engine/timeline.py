"""How long a run trains, and when it validates and writes ``last.pt``: in epochs or in optimiser steps.

``train.epochs`` counts passes over the training set; ``train.iters`` (when set) counts optimiser
steps instead, which suits a small dataset (16 images make an epoch of 2 steps) and a huge one (an
epoch of days) alike. ``train.val_every`` and ``train.save_every`` count in the same unit. The
learning-rate schedule always runs per step, over :attr:`Timeline.total_steps`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig
from ..text import counted


@dataclass(frozen=True)
class Timeline:
    unit: str  # "epoch" or "step"
    steps_per_epoch: int
    total_steps: int
    val_every: int
    save_every: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "Timeline":
        if cfg.iters is not None:
            return cls("step", steps_per_epoch, cfg.iters, cfg.val_every, cfg.save_every)
        return cls("epoch", steps_per_epoch, cfg.epochs * steps_per_epoch, cfg.val_every, cfg.save_every)

    @property
    def total_epochs(self) -> int:
        """Epochs begun by the end of training (the last one may stop part-way in step units)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def total(self) -> int:
        """The run's length in its own unit."""
        return self.total_epochs if self.unit == "epoch" else self.total_steps

    def count(self, epoch: int, step: int) -> int:
        """Completed units at ``epoch`` completed epochs and ``step`` optimiser steps."""
        return epoch if self.unit == "epoch" else step

    def finished(self, epoch: int, step: int) -> bool:
        """Whether training is over at ``epoch`` completed epochs and ``step`` optimiser steps."""
        return self.count(epoch, step) >= self.total

    def boundary(self, epoch_end: bool) -> bool:
        """Whether the point just reached is a unit boundary: every step, or an epoch's end."""
        return self.unit == "step" or epoch_end

    def due(self, every: int, count: int) -> bool:
        """An interval of ``every`` units ends at ``count``, or training does."""
        return count % every == 0 or count >= self.total

    def describe(self) -> str:
        """One line for the console: the length in both units and the intervals."""
        unit = self.unit
        epoch = f"of {counted(self.steps_per_epoch, 'step')}"
        length = (f"{counted(self.total_epochs, 'epoch')} {epoch} ({counted(self.total_steps, 'step')})"
                  if unit == "epoch" else
                  f"{counted(self.total_steps, 'step')} (train.iters; {self.total_steps / self.steps_per_epoch:.1f} "
                  f"epochs {epoch})")
        return (f"training for {length}; validation every {_units(self.val_every, unit)}, last.pt every "
                f"{_units(self.save_every, unit)}")


def _units(count: int, unit: str) -> str:
    return f"{unit}" if count == 1 else f"{count} {unit}s"
