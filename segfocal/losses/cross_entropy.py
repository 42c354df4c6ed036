"""Cross-entropy with fixed class weights or weights from each batch's label histogram."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .class_weights import keep_class_weight
from .options import WeightArg, check_class_factors, check_ignore_index


class CrossEntropy(nn.Module):
    """``F.cross_entropy`` with the class weights of :class:`~segfocal.losses.FocalLoss` (``weight``:
    a scheme of ``WEIGHT_SCHEMES``, fixed values or ``None``).

    The stock PyTorch loss, kept as the baseline the focal loss is compared against; like
    :class:`~segfocal.losses.FocalLoss` it keeps the weights of the last batch in :attr:`last_class_weights`.
    """

    def __init__(self, weight: WeightArg = "enet", ignore_index: int = 255, enet_c: float = 1.10,
                 effective_beta: float = 0.9999, sync_histogram: bool = False):
        super().__init__()
        check_ignore_index(ignore_index)
        check_class_factors(weight=weight, alpha=None)
        keep_class_weight(self, weight, enet_c, effective_beta)
        self.ignore_index = ignore_index
        self.sync_histogram = sync_histogram
        self.last_class_weights: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.scheme is not None:
            weight = self.scheme.of_batch(target, logits.shape[1], self.ignore_index, self.sync_histogram)
            self.last_class_weights = weight
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        weight = None if weight is None else weight.to(logits.dtype)
        return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=self.ignore_index)
