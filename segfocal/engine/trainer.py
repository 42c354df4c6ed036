"""The training loop: epochs of optimiser steps, validation, checkpoints and resume.

One plain, explicit loop in the style of torchvision's segmentation references. Each epoch
re-seeds every random source from ``seed + epoch`` (data order, augmentation, dropout), so a run
resumed from ``last.pt`` reaches the same weights as one that was never interrupted. Ctrl-C or
SIGTERM saves ``last.pt`` after the current optimiser step; resuming it re-reads (without training
on) the epoch's earlier batches, so the data and augmentation streams continue exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

from ..config import Config, ConfigError, save_config, to_dict
from ..config.schema import SUMMARY_METRICS
from ..data import build_loader
from ..data.splits import run_dataset
from ..evaluation import class_names, format_table
from ..models import build_model
from ..visualize import denormalize, legend, overlay_masks, palette_of
from .console import Console
from .curves import plot_curves_file
from .checkpoint import load_checkpoint, model_state_from, remove_stale_temporaries, resume_path, save_checkpoint
from .criterion import build_criterion
from .distributed import DistContext, init_distributed
from .evaluate import EvalResult, evaluate
from .interrupt import StopSignals, TrainingInterrupted
from .optim import build_optimizer, build_scheduler
from .precision import resolve_precision
from .run_logger import RunLogger
from .seeding import reseed_transform, restore_rng_state, rng_state, seed_everything
from .work_dir_lock import WorkDirLock


class NonFiniteLossError(RuntimeError):
    """Training cannot go on: too many consecutive non-finite steps, or non-finite weights."""


@dataclass
class TrainState:
    """Progress saved in every checkpoint: completed epochs, optimiser steps, best metric so far, and,
    for a run stopped mid-epoch, the micro-batches of epoch ``epoch`` already trained and their loss sums."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    batch: int = 0
    epoch_loss: float = 0.0
    interval_loss: float = 0.0


# Keys a run cannot change on resume: they change the shape or kind of the saved state.
RESUME_KEYS = ("model.arch", "model.encoder_name", "model.in_channels", "model.kwargs", "data.num_classes",
               "loss.name", "optim.name", "schedule.name")


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
        self.model = model
        self.criterion = build_criterion(cfg.loss, data.num_classes, data.ignore_index).to(self.device)
        self.precision = resolve_precision(cfg.train.amp, self.device)
        self.scaler = self.precision.grad_scaler()
        self.optimizer = build_optimizer(cfg.optim, model)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.accumulate)
        self.scheduler = build_scheduler(
            cfg.schedule, self.optimizer, cfg.train.epochs * self.steps_per_epoch, cfg.optim.lr
        )
        self.class_names = class_names(data.class_names, data.num_classes)
        self.state = TrainState()
        self.stop_signals = StopSignals()
        self.console = Console(self.dist.is_main, progress)
        self._resume_rng: Optional[Dict[str, Any]] = None
        self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main, image_size=cfg.train.log_image_size,
                                max_mb=cfg.train.max_log_mb)

        checkpoint = resume_path(self.work_dir, resume)
        if checkpoint is not None:
            self._load(checkpoint)

    @property
    def bare_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def fit(self) -> Optional[EvalResult]:
        """Train to ``train.epochs``; returns the evaluation of the best checkpoint on the val split.

        Raises :class:`TrainingInterrupted` after saving ``last.pt`` when SIGINT or SIGTERM arrived.
        """
        cfg = self.cfg.train
        epoch_times = []  # seconds per epoch (training and validation) in this process, for the ETA
        # the curves star the best epoch of a summary metric (mIoU when the checkpoint follows one class)
        curves_metric = cfg.checkpoint_metric if cfg.checkpoint_metric in SUMMARY_METRICS else "miou"
        try:
            with self.stop_signals:
                for epoch in range(self.state.epoch, cfg.epochs):
                    self._seed_epoch(epoch)
                    started = time.perf_counter()
                    train_loss = self.train_one_epoch(epoch)
                    if train_loss is None:  # stopped mid-epoch
                        self._save("last.pt")
                        raise self._interrupted()
                    self.state.epoch = epoch + 1
                    entry: Dict[str, Any] = {"epoch": epoch + 1, "step": self.state.step, "train_loss": train_loss,
                                             "epoch_seconds": time.perf_counter() - started}
                    if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                        entry["val"] = self.validate()
                    self.logger.record(entry)
                    if "val" in entry and self.dist.is_main:
                        plot_curves_file(self.work_dir / "metrics.jsonl", self.work_dir / "curves.png",
                                         self.class_names, curves_metric)
                    epoch_times.append(time.perf_counter() - started)
                    self.console.epoch(entry, cfg.epochs, cfg.checkpoint_metric, self.state.best_metric,
                                       self.state.best_epoch, self.class_names, sum(epoch_times) / len(epoch_times))
                    stop = epoch + 1 < cfg.epochs and self._stop_signal()
                    if stop or (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                        self._save("last.pt")
                    if stop:
                        raise self._interrupted()
            return self.final_evaluation()
        finally:
            self.logger.close()
            self.work_dir_lock.release()

    def train_one_epoch(self, epoch: int) -> Optional[float]:
        """One pass over the training loader; returns the mean loss, or None if a stop signal ended it early.

        A run resumed mid-epoch reads and skips the ``state.batch`` micro-batches trained before.
        """
        cfg = self.cfg.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        trained = self.state.batch
        loss_sum = torch.tensor(self.state.epoch_loss, device=self.device)
        interval_sum = torch.tensor(self.state.interval_loss, device=self.device)
        bad_steps = 0
        batches = self.console.progress(self.train_loader, f"epoch {epoch + 1}/{cfg.epochs}")
        for index, (images, targets) in enumerate(batches):
            if index < trained:
                continue
            if index == trained and self._resume_rng is not None:
                restore_rng_state(self._resume_rng)
                self._resume_rng = None
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.model(images)
            loss = self.criterion(logits, targets)
            self.scaler.scale(loss / cfg.accumulate).backward()
            loss_sum += loss.detach()
            interval_sum += loss.detach()
            if (index + 1) % cfg.accumulate and index + 1 != len(self.train_loader):
                continue
            bad_steps = self._optimizer_step(loss, bad_steps)
            if self.state.step % cfg.log_every == 0:
                interval_loss = interval_sum.item() / (cfg.log_every * cfg.accumulate)
                interval_sum.zero_()
                batches.set_postfix(loss=f"{interval_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                self._log_step(interval_loss)
                self.console.step(epoch, cfg.epochs, index + 1, len(self.train_loader), interval_loss,
                                  self.scheduler.get_last_lr()[0])
            if index + 1 < len(self.train_loader) and self._stop_signal():
                self.state.batch, self.state.epoch_loss, self.state.interval_loss = (
                    index + 1, loss_sum.item(), interval_sum.item())
                return None
        self.state.batch, self.state.epoch_loss, self.state.interval_loss = 0, 0.0, 0.0
        return loss_sum.item() / len(self.train_loader)

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
        self.state.step += 1
        return bad_steps

    def validate(self) -> Dict[str, Any]:
        """Evaluate on the val split, log it, update ``best.pt``; returns the metrics."""
        cfg, data = self.cfg, self.cfg.data
        result = evaluate(
            self.model, self.val_loader, cfg.eval, data.num_classes, data.ignore_index, self.device,
            self.precision, num_examples=cfg.train.log_images if self.dist.is_main else 0,
            progress=self.console.bars,
        )
        metrics = result.metrics
        step = self.state.step
        self.logger.scalars("val", {k: v for k, v in metrics.items() if isinstance(v, float)}, step)
        self.logger.scalars("val_iou", dict(zip(self.class_names, metrics["iou"])), step)
        self._log_examples(result, step)
        score = checkpoint_score(metrics, cfg.train.checkpoint_metric, self.class_names)
        if not math.isnan(score) and score > self.state.best_metric:
            self.state.best_metric = score
            self.state.best_epoch = self.state.epoch
            self._save("best.pt")
        return metrics

    def final_evaluation(self) -> Optional[EvalResult]:
        """Evaluate ``best.pt`` (or the final weights) on the val split and print the per-class table."""
        best = self.work_dir / "best.pt"
        if best.is_file():
            self.bare_model.load_state_dict(model_state_from(load_checkpoint(best, self.device), best))
        data = self.cfg.data
        result = evaluate(self.model, self.val_loader, self.cfg.eval, data.num_classes, data.ignore_index,
                          self.device, self.precision, progress=False)
        if self.dist.is_main:
            print(f"\nBest checkpoint (epoch {self.state.best_epoch}) on split '{data.val_split}':")
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
        save_checkpoint(
            {
                "model": self.bare_model.state_dict(),
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
            self.state = TrainState(**checkpoint["state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise ConfigError(f"cannot resume from {path}: it does not match this config ({error})") from None
        self._resume_rng = checkpoint.get("rng") if self.state.batch else None
        self.logger.forget_after(self.state.epoch)  # epochs logged after this checkpoint are redone
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


def _lookup(tree: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree
