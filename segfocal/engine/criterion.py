"""The training loss chosen in the config: segfocal's focal loss or PyTorch's cross-entropy."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LossConfig
from ..losses import FocalLoss, class_histogram, weights_from_histogram
from ..losses.labels import sum_over_ranks


class CrossEntropy(nn.Module):
    """``F.cross_entropy`` with fixed class weights or weights from each batch's label histogram.

    The stock PyTorch loss, kept as the baseline the focal loss is compared against; like
    :class:`FocalLoss` it keeps the weights of the last batch in :attr:`last_class_weights`.
    """

    def __init__(self, weight: Union[str, list, None], ignore_index: int, enet_c: float, effective_beta: float,
                 sync_histogram: bool):
        super().__init__()
        self.weight_scheme = weight if isinstance(weight, str) else None
        self.register_buffer("weight", None if weight is None or isinstance(weight, str) else torch.tensor(weight))
        self.ignore_index = ignore_index
        self.enet_c = enet_c
        self.effective_beta = effective_beta
        self.sync_histogram = sync_histogram
        self.last_class_weights: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.weight_scheme is not None:
            histogram = class_histogram(target, logits.shape[1], self.ignore_index)
            if self.sync_histogram:
                histogram, _ = sum_over_ranks(histogram)
            weight = weights_from_histogram(histogram, self.weight_scheme, enet_c=self.enet_c,
                                            effective_beta=self.effective_beta)
            self.last_class_weights = weight
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        weight = None if weight is None else weight.to(logits.dtype)
        return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=self.ignore_index)


def build_criterion(cfg: LossConfig, num_classes: int, ignore_index: int) -> nn.Module:
    """The loss module for ``cfg`` (``focal`` or ``cross_entropy``)."""
    if cfg.name == "cross_entropy":
        if cfg.histogram_momentum is not None:
            raise ConfigError("loss.histogram_momentum applies to loss.name=focal only")
        return CrossEntropy(cfg.weight, ignore_index, cfg.enet_c, cfg.effective_beta, cfg.sync_histogram)
    try:
        return _focal(cfg, num_classes, ignore_index)
    except ValueError as error:  # an option the loss rejects: name the config section
        raise ConfigError(f"loss: {error}") from None


def _focal(cfg: LossConfig, num_classes: int, ignore_index: int) -> FocalLoss:
    return FocalLoss(
        gamma=cfg.gamma,
        alpha=cfg.alpha,
        weight=cfg.weight,
        ignore_index=ignore_index,
        normalize=cfg.normalize,
        poly_epsilon=cfg.poly_epsilon,
        enet_c=cfg.enet_c,
        effective_beta=cfg.effective_beta,
        sync_histogram=cfg.sync_histogram,
        histogram_momentum=cfg.histogram_momentum,
        num_classes=num_classes,
    )
