"""The training loop: epochs of optimiser steps, validation, checkpoints and resume.

One plain, explicit loop in the style of torchvision's segmentation references. Each epoch
re-seeds every random source from ``seed + epoch`` (data order, augmentation, dropout), so a run
resumed from ``last.pt`` reaches the same weights as one that was never interrupted. Ctrl-C or
SIGTERM saves ``last.pt`` after the current optimiser step; resuming it re-reads (without training
on) the epoch's earlier batches, so the data and augmentation streams continue exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

from ..config import Config, ConfigError, save_config, to_dict
from ..config.schema import SUMMARY_METRICS
from ..data import build_loader
from ..data.seeding import reseed_transform
from ..data.splits import run_dataset
from ..evaluation import class_names, format_table
from ..models import build_model
from ..visualize import denormalize, legend, overlay_masks, palette_of
from .console import Console
from .curves import plot_curves_file
from .checkpoint import load_checkpoint, model_state_from, remove_stale_temporaries, resume_path, save_checkpoint
from .criterion import build_criterion
from .distributed import DistContext, init_distributed
from .ema import build_ema
from .evaluate import EvalResult, evaluate
from .interrupt import StopSignals, TrainingInterrupted
from .optim import build_optimizer, build_scheduler
from .precision import resolve_precision
from .run_logger import RunLogger
from .seeding import restore_rng_state, rng_state, seed_everything
from .timeline import Timeline
from .work_dir_lock import WorkDirLock


class NonFiniteLossError(RuntimeError):
    """Training cannot go on: too many consecutive non-finite steps, or non-finite weights."""


@dataclass
class TrainState:
    """Progress saved in every checkpoint: completed epochs, optimiser steps, the best metric so far
    and the validations since; for a run stopped mid-epoch, the micro-batches of epoch ``epoch``
    already trained; the loss sums since the last ``metrics.jsonl`` entry and the last logged step."""

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

    @classmethod
    def from_saved(cls, saved: Dict[str, Any]) -> "TrainState":
        """The state of a checkpoint, including one written before entries could span epochs."""
        saved = dict(saved)
        if "epoch_loss" in saved:  # then an entry was always one epoch: its sum over the batches done
            saved["report_loss"] = saved.pop("epoch_loss")
            saved.setdefault("report_batches", saved.get("batch", 0))
        return cls(**saved)


# Keys a run cannot change on resume: they change the shape or kind of the saved state.
# "loss.terms.name" is the list of the terms' names (their factors may change).
RESUME_KEYS = ("model.arch", "model.encoder_name", "model.in_channels", "model.kwargs", "data.num_classes",
               "loss.name", "loss.terms.name", "optim.name", "schedule.name")


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` and writes a run directory.

    The run directory holds ``config.yaml`` (the resolved config), ``last.pt`` (full state, after
    every epoch), ``best.pt`` (by ``train.checkpoint_metric``), ``metrics.jsonl`` and ``tb/``.
    """

    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.work_dir = Path(cfg.work_dir)
        self.dist: DistContext = init_distributed(cfg.device)
        self.device = self.dist.device
        data = cfg.data
        seed_everything(cfg.seed, cfg.deterministic)

        self.work_dir_lock = WorkDirLock(self.work_dir)
        if self.dist.is_main:
            try:
                self.work_dir.mkdir(parents=True, exist_ok=True)
                self.work_dir_lock.acquire()  # before the cleanup: another run's temporaries are not stale
                remove_stale_temporaries(self.work_dir)
                save_config(cfg, self.work_dir / "config.yaml")
            except OSError as error:
                raise ConfigError(f"work_dir {self.work_dir} cannot be written ({error.filename}: {error.strerror}); "
                                  f"choose a writable one with --work-dir") from None
        self.train_set = run_dataset(cfg, cfg.augment.train, data.train_split, record=self.dist.is_main)
        self.val_set = run_dataset(cfg, cfg.augment.val, data.val_split)
        for dataset in (self.train_set, self.val_set):
            dataset.validate(data.num_classes, data.ignore_index)
        self.train_sampler = (
            DistributedSampler(self.train_set, shuffle=True, seed=cfg.seed, drop_last=True) if self.dist.enabled else None
        )
        self.train_loader = build_loader(
            self.train_set, data.batch_size, shuffle=self.train_sampler is None, num_workers=data.num_workers,
            seed=cfg.seed, drop_last=True, sampler=self.train_sampler,
            persistent_workers=False,  # workers re-seeded every epoch: a resumed run matches exactly
        )
        val_shard = Subset(self.val_set, range(self.dist.rank, len(self.val_set), self.dist.world_size))
        self.val_loader = build_loader(
            val_shard, cfg.eval.batch_size, shuffle=False, num_workers=data.num_workers, seed=cfg.seed, drop_last=False
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"data.batch_size={data.batch_size} exceeds the {len(self.train_set)} training images "
                f"(per rank); lower it"
            )

        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = build_model(cfg.model, data.num_classes).to(self.device, memory_format=self.memory_format)
        if self.dist.enabled:
            if self.device.type == "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters,
            )
        self.ddp_model = model if self.dist.enabled else None
        # the module checkpoints hold: not the DDP or torch.compile wrapper (no "module."/"_orig_mod." keys)
        self.bare_model = model.module if self.dist.enabled else model
        self.model = torch.compile(model) if cfg.train.compile else model
        self.ema = build_ema(cfg.train.ema, self.bare_model) if cfg.train.ema else None
        self.criterion = build_criterion(cfg.loss, data.num_classes, data.ignore_index).to(self.device)
        self.precision = resolve_precision(cfg.train.amp, self.device)
        self.scaler = self.precision.grad_scaler()
        self.optimizer = build_optimizer(cfg.optim, model)
        self.timeline = Timeline.from_config(cfg.train, math.ceil(len(self.train_loader) / cfg.train.accumulate))
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.timeline.total_steps, cfg.optim.lr)
        self.class_names = class_names(data.class_names, data.num_classes)
        self.state = TrainState()
        self.stop_signals = StopSignals()
        self.console = Console(self.dist.is_main, progress)
        self._resume_rng: Optional[Dict[str, Any]] = None
        # loss sums on the device, read back only when logged or saved: since the last metrics.jsonl
        # entry (with its micro-batch count) and since the last logged step
        self._report_sum = torch.zeros((), device=self.device)
        self._interval_sum = torch.zeros((), device=self.device)
        self._clock = _Clock()
        self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main, image_size=cfg.train.log_image_size,
                                max_mb=cfg.train.max_log_mb)

        checkpoint = resume_path(self.work_dir, resume)
        if checkpoint is not None:
            self._load(checkpoint)

    @property
    def evaluated_model(self) -> nn.Module:
        """The module validation runs and ``best.pt`` keeps: the weights' moving average under
        ``train.ema``, else the trained model (as wrapped for DDP or torch.compile)."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def evaluated_weights(self) -> nn.Module:
        """:attr:`evaluated_model` unwrapped: the module whose state dict ``best.pt`` holds."""
        return self.ema.module if self.ema is not None else self.bare_model

    def fit(self) -> Optional[EvalResult]:
        """Train to the end of the timeline (or an early stop); returns the evaluation of the best
        checkpoint on the val split.

        Raises :class:`TrainingInterrupted` after saving ``last.pt`` when SIGINT or SIGTERM arrived.
        """
        self.console.line(self.timeline.describe())
        self._clock.start(self.timeline.count(self.state.epoch, self.state.step))
        try:
            with self.stop_signals:
                while not (self.timeline.finished(self.state.epoch, self.state.step) or self.state.stopped_early):
                    epoch = self.state.epoch
                    self._seed_epoch(epoch)
                    if self.train_one_epoch(epoch) is None:  # training ended part-way through the epoch
                        break
                    self._after_step(epoch_end=True)
            return self.final_evaluation()
        finally:
            self.logger.close()
            self.work_dir_lock.release()

    def train_one_epoch(self, epoch: int) -> Optional[float]:
        """One pass over the training loader, counted in ``state.epoch``; returns the mean loss since the
        last ``metrics.jsonl`` entry (the epoch's, when the run counts epochs), or None if training
        ended part-way through.

        A run resumed mid-epoch reads and skips the ``state.batch`` micro-batches trained before.
        """
        cfg = self.cfg.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        trained = self.state.batch
        bad_steps = 0
        batches = self.console.progress(self.train_loader, f"epoch {epoch + 1}/{self.timeline.total_epochs}")
        for index, (images, targets) in enumerate(batches):
            if index < trained:
                continue
            if index == trained and self._resume_rng is not None:
                restore_rng_state(self._resume_rng)
                self._resume_rng = None
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            # a group of micro-batches makes one step: the last group of an epoch may be shorter, and each
            # micro-batch's loss counts 1/(its group's size), so every sample of a step weighs the same
            group_start = index - index % cfg.accumulate
            group_size = min(cfg.accumulate, len(self.train_loader) - group_start)
            steps_now = index + 1 == group_start + group_size
            with self._gradient_sync(steps_now):
                with self.precision.autocast():
                    logits = self.model(images)
                loss = self.criterion(logits, targets)
                self.scaler.scale(loss / group_size).backward()
            self._report_sum += loss.detach()
            self._interval_sum += loss.detach()
            state = self.state
            state.batch, state.report_batches, state.interval_batches = (
                index + 1, state.report_batches + 1, state.interval_batches + 1)
            if not steps_now:
                continue
            bad_steps = self._optimizer_step(loss, bad_steps)
            if self.state.step % cfg.log_every == 0:
                interval_loss = self._interval_sum.item() / self.state.interval_batches  # a short group counts as it is
                self._interval_sum.zero_()
                self.state.interval_batches = 0
                batches.set_postfix(loss=f"{interval_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                self._log_step(interval_loss)
                self.console.step(epoch, self.timeline, index + 1, len(self.train_loader), self.state.step,
                                  interval_loss, self.scheduler.get_last_lr()[0])
            if index + 1 < len(self.train_loader) and self._after_step(epoch_end=False):
                return None
        self.state.epoch, self.state.batch = epoch + 1, 0
        return self._report_loss()

    def _best_at(self) -> int:
        """The epoch or step (the run's unit) of the best checkpoint metric so far; -1 before any."""
        return self.timeline.count(self.state.best_epoch, self.state.best_step)

    def _report_loss(self) -> float:
        """The mean loss of the micro-batches since the last ``metrics.jsonl`` entry."""
        return self._report_sum.item() / max(1, self.state.report_batches)

    def _gradient_sync(self, sync: bool) -> ContextManager:
        """Under DistributedDataParallel, all-reduce gradients only on a group's last micro-batch
        (``no_sync`` on the others: the communication of one step, not one per micro-batch)."""
        if sync or self.ddp_model is None:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

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
            self._report(validate, count)
        stop = not finished and self._stop_signal()
        ending = finished or state.stopped_early
        if stop or ending or (boundary and timeline.due(timeline.save_every, count)):
            self._save("last.pt")
        if stop:
            raise self._interrupted()
        return ending

    def _report(self, validate: bool, count: int) -> None:
        """Log an entry (train loss since the last one; the validation, when due) and its console line."""
        cfg, state = self.cfg.train, self.state
        entry: Dict[str, Any] = {"epoch": state.epoch, "step": state.step,
                                 "train_loss": self._report_loss(),
                                 "seconds": self._clock.lap()}
        self._report_sum.zero_()
        state.report_batches = 0
        if validate:
            entry["val"] = self.validate()
            self.model.train()
        self.logger.record(entry)
        if validate and self.dist.is_main:
            # the curves star the best of a summary metric (mIoU when the checkpoint follows one class)
            metric = cfg.checkpoint_metric if cfg.checkpoint_metric in SUMMARY_METRICS else "miou"
            plot_curves_file(self.work_dir / "metrics.jsonl", self.work_dir / "curves.png", self.class_names,
                             metric, unit=self.timeline.unit)
        best_at = self._best_at()
        self.console.report(entry, self.timeline, cfg.checkpoint_metric, state.best_metric, best_at,
                            self.class_names, self._clock.seconds_per_unit(count))
        if state.stopped_early:
            self.console.line(f"early stop: no better {cfg.checkpoint_metric} in {cfg.patience} validations "
                              f"(train.patience) since {self.timeline.unit} {best_at}")

    def _stop_signal(self) -> int:
        """The stop signal's number if one arrived (on any rank: all ranks agree on the step), else 0."""
        number = self.stop_signals.signal_number or 0
        if self.dist.enabled:
            flag = torch.tensor(number, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            number = int(flag)
        return number

    def _interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(self.work_dir / "last.pt", self._stop_signal(), self.state.epoch, self.state.step)

    def _optimizer_step(self, loss: torch.Tensor, bad_steps: int) -> int:
        """Unscale, clip, step (unless the gradient is not finite); returns the consecutive bad-step count."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the scaler itself skips non-finite steps and lowers its scale
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if not finite and not self.scaler.is_enabled():
            bad_steps += 1
            if bad_steps > self.cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{bad_steps} consecutive steps had a non-finite loss or gradient (train.max_bad_steps="
                    f"{self.cfg.train.max_bad_steps}); stopping. The last good checkpoint is "
                    f"{self.work_dir / 'last.pt'}. Lower optim.lr, set train.grad_clip, or check the data."
                )
        elif finite:
            bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.bare_model)
        self.state.step += 1
        return bad_steps

    def validate(self) -> Dict[str, Any]:
        """Evaluate on the val split, log it, update ``best.pt``; returns the metrics."""
        cfg, data = self.cfg, self.cfg.data
        result = evaluate(
            self.evaluated_model, self.val_loader, cfg.eval, data.num_classes, data.ignore_index, self.device,
            self.precision, num_examples=cfg.train.log_images if self.dist.is_main else 0,
            progress=self.console.bars,
        )
        metrics = result.metrics
        step = self.state.step
        self.logger.scalars("val", {k: v for k, v in metrics.items() if isinstance(v, float)}, step)
        self.logger.scalars("val_iou", dict(zip(self.class_names, metrics["iou"])), step)
        self._log_examples(result, step)
        score = checkpoint_score(metrics, cfg.train.checkpoint_metric, self.class_names)
        state = self.state
        if not math.isnan(score) and score > state.best_metric:
            state.best_metric, state.best_epoch, state.best_step = score, state.epoch, state.step
            state.validations_since_best = 0
            self._save("best.pt")
        else:
            state.validations_since_best += 1
            state.stopped_early = 0 < cfg.train.patience <= state.validations_since_best
        return metrics

    def final_evaluation(self) -> Optional[EvalResult]:
        """Evaluate ``best.pt`` (or the final weights) on the val split and print the per-class table."""
        best = self.work_dir / "best.pt"
        if best.is_file():
            self.evaluated_weights.load_state_dict(model_state_from(load_checkpoint(best, self.device), best))
        data = self.cfg.data
        result = evaluate(self.evaluated_model, self.val_loader, self.cfg.eval, data.num_classes, data.ignore_index,
                          self.device, self.precision, progress=False)
        if self.dist.is_main:
            print(f"\nBest checkpoint ({self.timeline.unit} {self._best_at()}) on split '{data.val_split}':")
            print(format_table(result.metrics, self.class_names))
        return result

    def _seed_epoch(self, epoch: int) -> None:
        seed = self.cfg.seed + epoch
        seed_everything(seed)
        self.train_loader.generator.manual_seed(seed)
        reseed_transform(self.train_set, seed)
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)

    def _log_step(self, interval_loss: float) -> None:
        step = self.state.step
        self.logger.scalars("train", {"loss": interval_loss, "lr": self.scheduler.get_last_lr()[0]}, step)
        weights = getattr(self.criterion, "last_class_weights", None)
        if weights is not None:
            self.logger.scalars("class_weight", dict(zip(self.class_names, weights.tolist())), step)

    def _log_examples(self, result: EvalResult, step: int) -> None:
        if not result.examples:
            return
        data = self.cfg.data
        images, targets, predictions = (torch.stack(parts) for parts in zip(*result.examples))
        palette = palette_of(data)
        rgb = denormalize(images, data.mean, data.std)
        self.logger.images("val/input", rgb, step)
        for tag, masks in (("label", targets), ("prediction", predictions)):
            self.logger.images(f"val/{tag}", overlay_masks(rgb, masks, palette, data.ignore_index), step)
        # every class's colour, as wide as the logger's images may be so it is not shrunk: a few kB a validation
        key = legend(palette, self.class_names, self.cfg.train.log_image_size or rgb.shape[-1])
        self.logger.images("val/legend", torch.from_numpy(key).permute(2, 0, 1).unsqueeze(0), step)

    def _save(self, name: str) -> None:
        """Write a checkpoint, never one with non-finite weights: those stop the run instead."""
        broken = next((key for key, value in self.bare_model.state_dict().items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if broken is not None:
            raise NonFiniteLossError(
                f"the model's weights became non-finite ({broken}) by step {self.state.step}; stopping without "
                f"writing {name}. {self.work_dir / 'last.pt'} keeps the last finite weights. Lower optim.lr, set "
                f"train.grad_clip, or check the data.")
        if not self.dist.is_main:
            return
        self.state.report_loss, self.state.interval_loss = self._report_sum.item(), self._interval_sum.item()
        save_checkpoint(
            {
                "model": (self.evaluated_weights if name == "best.pt" else self.bare_model).state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "criterion": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": vars(self.state).copy(),
                "config": to_dict(self.cfg),
                **({"rng": rng_state()} if self.state.batch else {}),  # mid-epoch: dropout's stream goes on
            },
            self.work_dir / name,
        )

    def _load(self, path: Path) -> None:
        checkpoint = load_checkpoint(path, map_location=self.device)
        self._check_resumable(checkpoint, path)
        model_state = model_state_from(checkpoint, path)
        try:
            self.bare_model.load_state_dict(model_state)
            self.criterion.load_state_dict(checkpoint["criterion"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None and "ema" in checkpoint:  # else the average starts from these weights
                self.ema.load_state_dict(checkpoint["ema"])
            self.state = TrainState.from_saved(checkpoint["state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise ConfigError(f"cannot resume from {path}: it does not match this config ({error})") from None
        self._resume_rng = checkpoint.get("rng") if self.state.batch else None
        self._report_sum.fill_(self.state.report_loss)
        self._interval_sum.fill_(self.state.interval_loss)
        self.logger.forget_after(self.state.step)  # entries logged after this checkpoint are redone
        if self.dist.is_main:
            print(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}")

    def _check_resumable(self, checkpoint: Dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint whose saved config differs from this one in a key that shapes the saved state."""
        saved = checkpoint.get("config")
        if not isinstance(saved, dict):
            return  # a bare or foreign checkpoint: load_state_dict decides
        current = to_dict(self.cfg)
        for key in RESUME_KEYS:
            before, now = _lookup(saved, key), _lookup(current, key)
            if before is not _MISSING and before != now:
                raise ConfigError(f"cannot resume from {path}: it was trained with {key}={before!r} and this config "
                                  f"has {key}={now!r}; resume with the same value, or start a new work dir")


def checkpoint_score(metrics: Dict[str, Any], metric: str, class_names: List[str]) -> float:
    """The value of ``train.checkpoint_metric`` (checked at load): a summary metric, or one class's
    ``iou``/``accuracy``/``dice`` named ``"iou.<class name>"``; NaN when it is undefined."""
    kind, _, name = metric.partition(".")
    value = metrics[kind][class_names.index(name)] if name else metrics[metric]
    return math.nan if value is None else float(value)


_MISSING = object()


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at ``dotted`` in nested dicts; through a list, the list of each item's value."""
    head, _, rest = dotted.partition(".")
    if isinstance(tree, list):
        return [_lookup(item, dotted) for item in tree]
    if not isinstance(tree, dict) or head not in tree:
        return _MISSING
    return _lookup(tree[head], rest) if rest else tree[head]


class _Clock:
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
