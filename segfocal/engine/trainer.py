"""The training loop: epochs of optimiser steps, validation, checkpoints and resume.

One plain, explicit loop in the style of torchvision's segmentation references. :meth:`Trainer.fit`
is the schedule; :func:`~segfocal.engine.step.train_step` takes one optimiser step; the
:class:`~segfocal.engine.checkpointer.Checkpointer` keeps the run directory's files and the
:class:`~segfocal.engine.reporting.Reporter` its logs. Each epoch re-seeds every random source from
``seed + epoch`` (data order, augmentation, dropout), so a run resumed from ``last.pt`` reaches the
same weights as one that was never interrupted. Ctrl-C or SIGTERM saves ``last.pt`` after the
current optimiser step; resuming it re-reads (without training on) the epoch's earlier batches, so
the data and augmentation streams continue exactly.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from ..config import Config, ConfigError, class_names, to_dict
from ..data.seeding import reseed_transform
from ..evaluation import format_table, metric_value
from ..evaluation.report import format_calibration
from .calibrate import calibrate_model, store_calibration
from .checkpoint import load_checkpoint, model_state_from
from .checkpointer import Checkpointer, NonFiniteLossError
from .distributed import init_distributed
from .evaluate import EvalResult, evaluate
from .interrupt import StopSignals, TrainingInterrupted
from .parts import build_training_parts
from .progress import TrainState
from .reporting import Reporter
from .run_data import build_run_data, val_loader_of
from .seeding import restore_rng_state, rng_state, seed_everything
from .step import StepOutcome, train_step
from .timeline import Timeline

__all__ = ["Trainer", "TrainState", "NonFiniteLossError"]


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` and writes a run directory.

    The run directory holds ``config.yaml`` (the resolved config), ``last.pt`` (full state, after
    every epoch), ``best.pt`` (by ``train.checkpoint_metric``), ``metrics.jsonl`` and ``tb/``.
    """

    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        seed_everything(cfg.seed, cfg.deterministic)
        self.checkpointer = Checkpointer(Path(cfg.work_dir), self.dist.is_main)
        self.checkpointer.open(cfg)
        self.data = build_run_data(cfg, self.dist)
        self.timeline = Timeline.from_config(cfg.train, math.ceil(len(self.data.train_loader) / cfg.train.accumulate))
        self.parts = build_training_parts(cfg, self.dist, self.timeline.total_steps)
        self.class_names = class_names(cfg.data.class_names, cfg.data.num_classes)
        self.reporter = Reporter(cfg, self.timeline, self.class_names, self.device, self.dist.is_main, progress)
        self.state = TrainState()
        self.stop_signals = StopSignals()
        self._resume_rng: Optional[Dict[str, Any]] = None
        resumed = self.checkpointer.resume(resume, cfg, map_location=self.device)
        if resumed is not None:
            self.load_state_dict(*resumed)

    def fit(self) -> Optional[EvalResult]:
        """Train to the end of the timeline (or an early stop); returns the evaluation of the best
        checkpoint on the val split.

        Raises :class:`TrainingInterrupted` after saving ``last.pt`` when SIGINT or SIGTERM arrived.
        """
        self.reporter.console.line(self.timeline.describe())
        self.reporter.clock.start(self.timeline.count(self.state.epoch, self.state.step))
        try:
            with self.stop_signals:
                while not (self.timeline.finished(self.state.epoch, self.state.step) or self.state.stopped_early):
                    epoch = self.state.epoch
                    self._seed_epoch(epoch)
                    if self.train_one_epoch(epoch) is None:  # training ended part-way through the epoch
                        break
                    self._after_step(epoch_end=True)
            result = self.final_evaluation()
            if self.cfg.train.calibrate and self.dist.is_main:
                self.calibrate_best()
            return result
        finally:
            self.reporter.close()
            self.checkpointer.close()

    def train_one_epoch(self, epoch: int) -> Optional[float]:
        """One pass over the training loader, counted in ``state.epoch``, in optimiser steps of
        ``train.accumulate`` micro-batches; returns the mean loss since the last ``metrics.jsonl`` entry
        (the epoch's, when the run counts epochs), or None if training ended part-way through.

        A run resumed mid-epoch reads and skips the ``state.batch`` micro-batches trained before.
        """
        loader, state = self.data.train_loader, self.state
        self.parts.model.train()
        bar = self.reporter.console.progress(loader, f"epoch {epoch + 1}/{self.timeline.total_epochs}")
        stream = iter(bar)
        for _ in range(state.batch):
            next(stream)  # re-read, not trained on: the data and augmentation streams go on exactly
        if self._resume_rng is not None:
            restore_rng_state(self._resume_rng)
            self._resume_rng = None
        while state.batch < len(loader):
            # a group of micro-batches makes one step; the epoch's last group may be shorter
            group_size = min(self.cfg.train.accumulate, len(loader) - state.batch)
            self._step(itertools.islice(stream, group_size), group_size)
            if state.step % self.cfg.train.log_every == 0:
                self.reporter.step(state, epoch, len(loader), bar, self.parts.scheduler.get_last_lr()[0],
                                   getattr(self.parts.criterion, "last_class_weights", None))
            if state.batch < len(loader) and self._after_step(epoch_end=False):
                return None
        next(stream, None)  # the end of the loader: its bar closes
        state.epoch, state.batch = epoch + 1, 0
        return self.reporter.report_loss(state)

    def _step(self, micro_batches: Iterable, group_size: int) -> StepOutcome:
        """One optimiser step and its bookkeeping: the loss sums, the learning rate, the weights' average,
        and the count of consecutive skipped steps, which stops the run past ``train.max_bad_steps``."""
        parts, state = self.parts, self.state
        outcome = train_step(parts.model, micro_batches, group_size, parts.criterion, parts.optimizer, parts.scaler,
                             parts.step_settings, parts.ddp_model)
        self.reporter.add(state, outcome)
        state.batch += outcome.micro_batches
        state.bad_steps = 0 if outcome.applied else state.bad_steps + 1
        if state.bad_steps > self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{state.bad_steps} consecutive steps had a non-finite loss or gradient (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); stopping. The last good checkpoint is "
                f"{self.checkpointer.path('last.pt')}. Lower optim.lr, set train.grad_clip, or check the data.")
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update_parameters(parts.bare_model)
        state.step += 1
        return outcome

    def _after_step(self, epoch_end: bool) -> bool:
        """What follows an optimiser step, or an epoch's end: a ``metrics.jsonl`` entry (each epoch, or
        at each validation when counting steps), validation and ``last.pt`` when their interval ends
        (see :class:`Timeline`), and the stop on a signal. Returns True when training ends here."""
        timeline, state = self.timeline, self.state
        boundary = timeline.boundary(epoch_end)
        finished = boundary and timeline.finished(state.epoch, state.step)
        count = timeline.count(state.epoch, state.step)
        validate = boundary and timeline.due(timeline.val_every, count)
        if validate or (boundary and timeline.unit == "epoch"):
            self.reporter.entry(state, self.validate if validate else None)
        stop = not finished and self._stop_signal()
        ending = finished or state.stopped_early
        if stop or ending or (boundary and timeline.due(timeline.save_every, count)):
            self._save("last.pt")
        if stop:
            raise TrainingInterrupted(self.checkpointer.path("last.pt"), stop, state.epoch, state.step)
        return ending

    def _stop_signal(self) -> int:
        """The stop signal's number if one arrived (on any rank: all ranks agree on the step), else 0."""
        number = self.stop_signals.signal_number or 0
        if self.dist.enabled:
            flag = torch.tensor(number, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            number = int(flag)
        return number

    def validate(self) -> Dict[str, Any]:
        """Evaluate on the val split, log it, update ``best.pt``; returns the metrics."""
        cfg, data, step = self.cfg, self.cfg.data, self.state.step
        result = evaluate(self.parts.evaluated_model, self.data.val_loader, cfg.eval, data.num_classes,
                          data.ignore_index, self.device, self.parts.precision,
                          num_examples=cfg.train.log_images if self.dist.is_main else 0,
                          progress=self.reporter.console.bars)
        self.parts.model.train()
        metrics, logger = result.metrics, self.reporter.logger
        logger.scalars("val", {k: v for k, v in metrics.items() if isinstance(v, float)}, step)
        logger.scalars("val_iou", dict(zip(self.class_names, metrics["iou"])), step)
        logger.examples(result.examples, data, self.class_names, step)
        if self.state.record_validation(metric_value(metrics, cfg.train.checkpoint_metric, self.class_names),
                                        cfg.train.patience):
            self._save("best.pt")
        return metrics

    def final_evaluation(self) -> Optional[EvalResult]:
        """Evaluate ``best.pt`` (or the final weights) on the val split and print the per-class table."""
        best = self.checkpointer.path("best.pt")
        if best.is_file():
            self.parts.evaluated_weights.load_state_dict(model_state_from(load_checkpoint(best, self.device), best))
        data = self.cfg.data
        result = evaluate(self.parts.evaluated_model, self.data.val_loader, self.cfg.eval, data.num_classes,
                          data.ignore_index, self.device, self.parts.precision, progress=False)
        if self.dist.is_main:
            best_at = self.timeline.count(self.state.best_epoch, self.state.best_step)
            print(f"\nBest checkpoint ({self.timeline.unit} {best_at}) on split '{data.val_split}':")
            print(format_table(result.metrics, self.class_names))
        return result

    def calibrate_best(self) -> None:
        """``train.calibrate``: fit ``best.pt``'s calibration on the whole val split (under DDP too: rank 0 alone
        runs it on the unwrapped model, with no collective call, while the other ranks end) for
        ``train.checkpoint_metric``, store it in ``best.pt``, print its table."""
        best = self.checkpointer.path("best.pt")
        if not best.is_file():
            return
        data, train = self.cfg.data, self.cfg.train
        whole_val = val_loader_of(self.data.val_set, self.cfg)
        calibration = calibrate_model(self.parts.evaluated_weights, whole_val, self.cfg, data.val_split,
                                      train.checkpoint_metric, 2, self.device, self.parts.precision)
        store_calibration(best, load_checkpoint(best), calibration)
        print(f"\n{format_calibration(calibration, self.class_names)}\nstored in {best}")

    def _seed_epoch(self, epoch: int) -> None:
        seed = self.cfg.seed + epoch
        seed_everything(seed)
        self.data.train_loader.generator.manual_seed(seed)
        reseed_transform(self.data.train_set, seed)
        if hasattr(self.data.train_set, "set_epoch"):  # data.patches: epoch e's crops come from (seed, e, index)
            self.data.train_set.set_epoch(epoch)
        if self.data.train_sampler is not None:
            self.data.train_sampler.set_epoch(epoch)

    def _save(self, name: str) -> None:
        """Write ``last.pt`` (the trained weights) or ``best.pt`` (the evaluated ones), with the same state."""
        self.checkpointer.save(name, self.state_dict(best=name == "best.pt"), self.state.step)

    def state_dict(self, best: bool = False) -> Dict[str, Any]:
        """What a checkpoint holds: the parts' state dicts (``best``: the evaluated weights as the model's),
        the progress, the config, and mid-epoch the random state that dropout draws from."""
        self.reporter.save_sums(self.state)
        return {**self.parts.state_dict(evaluated=best), "state": vars(self.state).copy(), "config": to_dict(self.cfg),
                **({"rng": rng_state()} if self.state.batch else {})}

    def load_state_dict(self, path: Path, checkpoint: Dict[str, Any]) -> None:
        """Resume from ``checkpoint`` (read from ``path``, which errors name)."""
        model_state = model_state_from(checkpoint, path)
        try:
            self.parts.load_state_dict(checkpoint, model_state)
            self.state = TrainState.from_saved(checkpoint["state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise ConfigError(f"cannot resume from {path}: it does not match this config ({error})") from None
        self._resume_rng = checkpoint.get("rng") if self.state.batch else None
        self.reporter.restore_sums(self.state)
        if self.dist.is_main:
            print(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}")
