"""Per-class one-vs-rest AUROC of softmax scores from binned histograms (no stored predictions)."""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from .counts import DeviceCounts, check_positive_int

# Pixels handled per scatter: bounds the temporary index tensor (``chunk * C`` int64 values).
_CHUNK_ELEMENTS = 1 << 22


class BinnedAUROC(DeviceCounts):
    """One-vs-rest AUROC of each class's score, from per-class score histograms on the device.

    A dense evaluation set has far too many pixels to keep their scores, so each ``update`` adds
    them to ``num_bins`` equal-width bins on ``[0, 1]`` (bin ``floor(score * num_bins)``), once
    for every non-ignored pixel and once more for the pixels of the class (positives). Memory is
    ``2 * C * num_bins`` counts whatever the data size, and updates never wait for the device.

    :meth:`compute` is the trapezoidal area under the ROC curve traced by the bin edges, i.e.
    the Mann-Whitney statistic ``P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)`` in which scores
    that share a bin count as ties. It is exact whenever no positive and negative score share a
    bin unless they are equal; otherwise the error is at most half the fraction of positive-
    negative pairs that share a bin (about ``1e-3`` or less with 1000 bins on softmax scores).

    Pixels whose target is ``ignore_index`` or outside ``[0, num_classes)`` are left out. Scores
    are clamped to ``[0, 1]`` (NaN counts as 0).
    """

    def __init__(self, num_classes: int, num_bins: int = 1000, ignore_index: int = 255,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        check_positive_int("num_classes", num_classes)
        check_positive_int("num_bins", num_bins)
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.ignore_index = int(ignore_index)
        # [all pixels: C x bins][positives: C x bins][one bin for excluded pixels]
        super().__init__(2 * num_classes * num_bins + 1, device)

    @property
    def histograms(self) -> torch.Tensor:
        """``int64 [2, C, num_bins]``: score histograms of the positives (0) and negatives (1) of each class."""
        hist = self._counts[:-1].view(2, self.num_classes, self.num_bins)
        return torch.stack([hist[1], hist[0] - hist[1]])

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs [B, C, ...]`` class scores in ``[0, 1]`` (softmax), ``target [B, ...]`` labels."""
        num_classes, num_bins = self.num_classes, self.num_bins
        if probs.ndim < 2 or probs.shape[1] != num_classes:
            raise ValueError(f"probs must be [B, {num_classes}, ...], got shape {tuple(probs.shape)}")
        if probs.shape[:1] + probs.shape[2:] != target.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match probs {tuple(probs.shape)} "
                             f"without its class dimension")
        if not probs.is_floating_point():
            raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        self._follow(probs)
        device = self.device
        scores = probs.to(device, non_blocking=True).movedim(1, -1).reshape(-1, num_classes)
        labels = target.to(device, non_blocking=True).reshape(-1).long()
        excluded_bin = self._counts.numel() - 1
        offsets = torch.arange(num_classes, device=device) * num_bins
        chunk = max(1, _CHUNK_ELEMENTS // num_classes)
        for start in range(0, labels.numel(), chunk):
            score = scores[start:start + chunk]
            score = score.to(torch.promote_types(score.dtype, torch.float32)).nan_to_num(0.0).clamp(0, 1)
            label = labels[start:start + chunk]
            valid = (label >= 0) & (label < num_classes) & (label != self.ignore_index)
            bins = (score * num_bins).long().clamp_(max=num_bins - 1)  # floor; a score of 1 joins the top bin
            every = torch.where(valid.unsqueeze(1), offsets + bins, excluded_bin)
            safe_label = torch.where(valid, label, 0)
            positive_bin = bins.gather(1, safe_label.unsqueeze(1)).squeeze(1)
            positive = torch.where(valid, num_classes * num_bins + safe_label * num_bins + positive_bin, excluded_bin)
            index = torch.cat([every.reshape(-1), positive])
            self._counts.scatter_add_(0, index, torch.ones((), dtype=torch.int64, device=device).expand_as(index))

    def compute(self) -> List[float]:
        """AUROC of each class (one-vs-rest); NaN for a class without positive or without negative pixels."""
        positives, negatives = self.histograms.to("cpu", torch.float64)
        num_pos = positives.sum(dim=1)
        num_neg = negatives.sum(dim=1)
        # Each positive in bin b beats the negatives of lower bins and ties with those of bin b.
        below = negatives.cumsum(dim=1) - negatives
        wins = (positives * (below + 0.5 * negatives)).sum(dim=1)
        auroc = wins / (num_pos * num_neg)
        defined = (num_pos > 0) & (num_neg > 0)
        return torch.where(defined, auroc, torch.tensor(float("nan"), dtype=torch.float64)).tolist()

    def _layout(self) -> Dict[str, int]:
        return {"num_classes": self.num_classes, "num_bins": self.num_bins}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, num_bins={self.num_bins}, "
                f"ignore_index={self.ignore_index}, device={self.device})")
