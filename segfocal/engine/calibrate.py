"""Calibrating a trained model on a split (:mod:`segfocal.evaluation.calibration`) and the calibration a
checkpoint carries.

The logits come from the same inference as evaluation (``eval.mode``, ``eval.crop_size``/``stride``,
``eval.flip``, the run's precision). The calibration is stored in the checkpoint itself, under
``"calibration"``, by an atomic rewrite that leaves every other entry, the weights included, as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, class_names
from ..evaluation import predict_logits
from ..evaluation.calibration import Calibration, PixelSet, calibrate
from .checkpoint import CheckpointError, save_checkpoint
from .precision import Precision


@torch.no_grad()
def gather_pixels(model: nn.Module, loader: DataLoader, cfg: Config, device: torch.device, precision: Precision,
                  progress: bool = False) -> PixelSet:
    """The counted pixels' logits and labels of every image of ``loader``, inferred as evaluation does."""
    was_training = model.training
    model.eval()

    def batches() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        ev = cfg.eval
        for images, targets in tqdm(loader, desc="calibration logits", leave=False, disable=not progress):
            with precision.autocast():
                logits = predict_logits(model, images.to(device), cfg.data.num_classes, mode=ev.mode,
                                        crop_size=tuple(ev.crop_size), stride=tuple(ev.stride), flip=ev.flip)
            yield logits.float(), targets

    pixels = PixelSet.gather(batches(), cfg.data.num_classes, cfg.data.ignore_index)
    model.train(was_training)
    return pixels


def calibrate_model(model: nn.Module, loader: DataLoader, cfg: Config, split: str, metric: str, folds: int,
                    device: torch.device, precision: Precision, progress: bool = False) -> Calibration:
    """Fit ``model``'s calibration on the images of ``loader`` (the split ``split``)."""
    pixels = gather_pixels(model, loader, cfg, device, precision, progress)
    return calibrate(pixels, metric, class_names(cfg.data.class_names, cfg.data.num_classes), split, folds)


def stored_calibration(contents: Dict[str, Any], num_classes: int, source: Any) -> Optional[Calibration]:
    """The calibration a checkpoint carries (``None`` if it has none), checked against ``num_classes``."""
    if "calibration" not in contents:
        return None
    try:
        return Calibration.from_dict(contents["calibration"], num_classes, str(source))
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def check_storable(path: Path, contents: Dict[str, Any]) -> None:
    """Raise CheckpointError unless ``path`` (read as ``contents``) is a trainer checkpoint, where a calibration
    is stored (checked before calibrating, so that a bare state dict fails before the work)."""
    if not isinstance(contents.get("model"), dict):
        raise CheckpointError(f"{path} is a bare state dict: a calibration is stored in a trainer checkpoint "
                              f"(last.pt, best.pt)")


def store_calibration(path: Path, contents: Dict[str, Any], calibration: Calibration) -> None:
    """Rewrite the trainer checkpoint ``path`` (read as ``contents``) with ``calibration``, atomically;
    every other entry, the weights included, is written back as it was read."""
    check_storable(path, contents)
    save_checkpoint({**contents, "calibration": calibration.to_dict()}, path)
