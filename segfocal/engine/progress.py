"""Where a run is (:class:`TrainState`, saved in every checkpoint) and how fast it goes (:class:`Clock`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict


@dataclass
class TrainState:
    """Progress saved in every checkpoint: completed epochs, optimiser steps, the best metric so far
    and the validations since; for a run stopped mid-epoch, the micro-batches of epoch ``epoch``
    already trained; the loss sums since the last ``metrics.jsonl`` entry and the last logged step;
    the consecutive skipped (non-finite) steps, which a resume goes on counting."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    best_step: int = -1
    validations_since_best: int = 0
    stopped_early: bool = False
    batch: int = 0
    report_loss: float = 0.0
    report_batches: int = 0
    interval_loss: float = 0.0
    interval_batches: int = 0
    bad_steps: int = 0

    def record_validation(self, score: float, patience: int) -> bool:
        """Count a validation scoring ``score`` (NaN: undefined); True when it is the best so far.
        Past ``patience`` validations (0: never) without a better one, the run stops early."""
        if not math.isnan(score) and score > self.best_metric:
            self.best_metric, self.best_epoch, self.best_step = score, self.epoch, self.step
            self.validations_since_best = 0
            return True
        self.validations_since_best += 1
        self.stopped_early = 0 < patience <= self.validations_since_best
        return False

    @classmethod
    def from_saved(cls, saved: Dict[str, Any]) -> "TrainState":
        """The state of a checkpoint, including one written before entries could span epochs."""
        saved = dict(saved)
        if "epoch_loss" in saved:  # then an entry was always one epoch: its sum over the batches done
            saved["report_loss"] = saved.pop("epoch_loss")
            saved.setdefault("report_batches", saved.get("batch", 0))
        return cls(**saved)


class Clock:
    """Seconds between entries, and the mean seconds per unit (epoch or step) in this process, for the ETA."""

    def __init__(self) -> None:
        self._began = self._last = time.perf_counter()
        self._first_count = 0

    def start(self, count: int) -> None:
        self._began = self._last = time.perf_counter()
        self._first_count = count

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds

    def seconds_per_unit(self, count: int) -> float:
        return (time.perf_counter() - self._began) / max(1, count - self._first_count)
