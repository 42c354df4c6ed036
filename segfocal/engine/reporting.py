"""What a run reports while it trains: the loss sums behind each logged step and each
``metrics.jsonl`` entry, TensorBoard, ``curves.png`` and the console lines."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..config import Config
from ..config.schema import SUMMARY_METRICS
from .console import Console
from .curves import plot_curves_file
from .progress import Clock, TrainState
from .run_logger import RunLogger
from .step import StepOutcome
from .timeline import Timeline


class Reporter:
    """Rank 0's reports of the run ``cfg``. The loss sums stay on the device, read back only when
    logged or saved: since the last ``metrics.jsonl`` entry and since the last logged step (their
    micro-batch counts, like the sums when saved, are in the :class:`TrainState`)."""

    def __init__(self, cfg: Config, timeline: Timeline, class_names: Sequence[str], device: torch.device,
                 is_main: bool, progress: bool) -> None:
        self.train, self.timeline, self.class_names = cfg.train, timeline, list(class_names)
        self.work_dir = Path(cfg.work_dir)
        self.console = Console(is_main, progress)
        self.logger = RunLogger(self.work_dir, enabled=is_main, image_size=cfg.train.log_image_size,
                                max_mb=cfg.train.max_log_mb)
        self.clock = Clock()
        self._report_sum = torch.zeros((), device=device)
        self._interval_sum = torch.zeros((), device=device)

    def add(self, state: TrainState, outcome: StepOutcome) -> None:
        """Count a step's micro-batches and their losses."""
        self._report_sum += outcome.loss_sum
        self._interval_sum += outcome.loss_sum
        state.report_batches += outcome.micro_batches
        state.interval_batches += outcome.micro_batches

    def save_sums(self, state: TrainState) -> None:
        """Read the sums into ``state``, for a checkpoint."""
        state.report_loss, state.interval_loss = self._report_sum.item(), self._interval_sum.item()

    def restore_sums(self, state: TrainState) -> None:
        """Take the sums back from a resumed ``state``, and drop the log entries written after it."""
        self._report_sum.fill_(state.report_loss)
        self._interval_sum.fill_(state.interval_loss)
        self.logger.forget_after(state.step)  # a resumed run logs them again

    def report_loss(self, state: TrainState) -> float:
        """The mean loss of the micro-batches since the last ``metrics.jsonl`` entry."""
        return self._report_sum.item() / max(1, state.report_batches)

    def step(self, state: TrainState, epoch: int, batches: int, bar: Any, lr: float,
             class_weights: Optional[torch.Tensor]) -> None:
        """Log the mean loss since the last logged step (a short group counts as it is), the learning rate
        and, with a weight scheme, this batch's class weights: to TensorBoard, the bar, or a console line."""
        loss = self._interval_sum.item() / state.interval_batches
        self._interval_sum.zero_()
        state.interval_batches = 0
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.logger.scalars("train", {"loss": loss, "lr": lr}, state.step)
        if class_weights is not None:
            self.logger.scalars("class_weight", dict(zip(self.class_names, class_weights.tolist())), state.step)
        self.console.step(epoch, self.timeline, state.batch, batches, state.step, loss, lr)

    def entry(self, state: TrainState, validate: Optional[Callable[[], Dict[str, Any]]]) -> None:
        """A ``metrics.jsonl`` entry (the train loss since the last one, and ``validate()``'s metrics when
        given), the curves after a validation, and the entry's console line."""
        train, count = self.train, self.timeline.count(state.epoch, state.step)
        entry: Dict[str, Any] = {"epoch": state.epoch, "step": state.step, "train_loss": self.report_loss(state),
                                 "seconds": self.clock.lap()}
        self._report_sum.zero_()
        state.report_batches = 0
        if validate is not None:
            entry["val"] = validate()
        self.logger.record(entry)
        if validate is not None and self.console.enabled:
            # the curves star the best of a summary metric (mIoU when the checkpoint follows one class)
            metric = train.checkpoint_metric if train.checkpoint_metric in SUMMARY_METRICS else "miou"
            plot_curves_file(self.work_dir / "metrics.jsonl", self.work_dir / "curves.png", self.class_names,
                             metric, unit=self.timeline.unit)
        best_at = self.timeline.count(state.best_epoch, state.best_step)
        self.console.report(entry, self.timeline, train.checkpoint_metric, state.best_metric, best_at,
                            self.class_names, self.clock.seconds_per_unit(count))
        if state.stopped_early:
            self.console.line(f"early stop: no better {train.checkpoint_metric} in {train.patience} validations "
                              f"(train.patience) since {self.timeline.unit} {best_at}")

    def close(self) -> None:
        self.logger.close()
