"""Run a model over a data loader and accumulate segmentation metrics on the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import EvalConfig
from ..evaluation import BinnedAUROC, ConfusionMatrix, predict_logits, segmentation_metrics
from .precision import Precision

# What evaluate() can compute besides the confusion matrix and the metrics derived from it
# (segmentation_metrics: IoU, accuracy, Dice per class and their means, pixel accuracy, fwIoU).
OPTIONAL_METRICS = ("auroc",)


@dataclass
class EvalResult:
    metrics: Dict[str, Any]
    confusion: torch.Tensor
    auroc: Optional[List[float]] = None
    examples: List[tuple] = field(default_factory=list)  # (image, target, prediction) on the CPU
    calibrated: Optional["EvalResult"] = None  # the decisions with the calibration's bias, when one was given


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    cfg: EvalConfig,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    precision: Precision,
    metrics: Collection[str] = (),
    num_examples: int = 0,
    progress: bool = True,
    bias: Optional[torch.Tensor] = None,
) -> EvalResult:
    """Metrics of ``model`` on every batch of ``loader``: those of the confusion matrix, and the
    ``metrics`` of :data:`OPTIONAL_METRICS` asked for (``"auroc"``: per-class AUROC in ``result.auroc``).
    With a calibration's ``bias`` ``[C]``, ``result.calibrated`` holds the metrics of the argmax of the
    logits plus ``bias`` too (the raw ones stay in ``result``).

    The confusion matrix (and the AUROC histograms) accumulate on the device, with no per-batch
    host synchronisation and no stored predictions; they are all-reduced across ranks at the end.
    """
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    unknown = sorted(set(metrics) - set(OPTIONAL_METRICS))
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; the optional metrics are {list(OPTIONAL_METRICS)}")
    auroc = BinnedAUROC(num_classes, ignore_index=ignore_index, device=device) if "auroc" in metrics else None
    examples: List[tuple] = []
    calibrated = None if bias is None else ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    bias = None if bias is None else bias.to(device).view(1, -1, 1, 1)  # copied once, not per batch
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = predict_logits(
                model, images, num_classes, mode=cfg.mode, crop_size=tuple(cfg.crop_size),
                stride=tuple(cfg.stride), flip=cfg.flip,
            )
        predictions = logits.argmax(dim=1)
        confusion.update(predictions, targets)
        if calibrated is not None:
            calibrated.update((logits.float() + bias).argmax(dim=1), targets)
        if auroc is not None:
            auroc.update(logits.float().softmax(dim=1), targets)
        for index in range(min(len(images), num_examples - len(examples))):
            examples.append((images[index].cpu(), targets[index].cpu(), predictions[index].cpu()))
    confusion.all_reduce()
    if calibrated is not None:
        calibrated.all_reduce()
    if auroc is not None:
        auroc.all_reduce()
    model.train(was_training)
    return EvalResult(
        metrics=segmentation_metrics(confusion.matrix),
        confusion=confusion.matrix.cpu(),
        auroc=auroc.compute() if auroc is not None else None,
        examples=examples,
        calibrated=None if calibrated is None else EvalResult(segmentation_metrics(calibrated.matrix),
                                                              calibrated.matrix.cpu()),
    )
