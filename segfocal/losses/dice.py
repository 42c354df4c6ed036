"""Softmax multi-class soft Dice loss, the overlap term nnU-Net and MONAI pair with cross-entropy or focal.

With softmax probabilities ``p`` and one-hot labels ``g`` over the counted (non-ignored) pixels of one
sample (or of the whole batch with ``batch=True``), per class ``c``::

    L_c = 1 - (2 sum(p_c g_c) + smooth_nr) / (sum(p_c) + sum(g_c) + smooth_dr)

MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)`` convention (sums over the spatial dimensions, and the
batch with ``batch=True``). Class weights ``w_c`` make the ``"mean"`` a weighted mean over classes,
``sum w_c L_c / sum w_c`` (averaged over samples), as ``CrossEntropyLoss(weight=)`` does for pixels; with
weights that average 1 this is MONAI's ``mean(w_c L_c)``.

A class absent from the target with (next to) no predicted mass gives ``L_c = 1 - smooth_nr / smooth_dr``,
0 with the default equal smoothing: it neither helps nor hurts. Predicted mass ``P`` on an absent class
gives ``1 - smooth_nr / (P + smooth_dr)``, close to 1 once ``P`` is well above the smoothing. The weight
schemes give classes absent from the batch weight 0 (except ``"enet"``), which drops them from the mean.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .class_weights import WeightScheme, keep_class_weight, weight_of
from .focal import check_inputs
from .labels import not_ignored
from .layout import flat_labels, flat_logits
from .options import (REDUCTIONS, Reduction, WeightArg, check_choice, check_class_factors, check_ignore_index,
                      option_attribute, per_class)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: WeightArg = None,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    enet_c: float = 1.10,
    effective_beta: float = 0.9999,
    sync_histogram: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Soft Dice loss for logits ``[N, C]``, ``[B, C, H, W]`` or ``[B, C, D, H, W]`` and integer labels.

    Args:
        logits: unnormalised scores, class dimension 1, any float dtype (``[N, C]`` is one sample of
            ``N`` pixels).
        target: class indices, the shape of ``logits`` without dimension 1.
        weight: ``None`` (every class counts alike, MONAI's default); a scheme of ``WEIGHT_SCHEMES``
            (a name or a :class:`~segfocal.losses.WeightScheme`) computed from this batch's label
            histogram as the focal loss does; or ``C`` fixed weights (e.g. 0 for a background).
        ignore_index: label whose pixels count in neither the intersection nor the denominators.
        reduction: ``"mean"`` (weighted mean over classes, then mean over samples), ``"sum"`` (of
            ``w_c L_c``) or ``"none"`` (``w_c L_c`` as ``[B, C]``, or ``[C]`` with ``batch=True``).
        smooth_nr, smooth_dr: added to the numerator and the denominator; ``smooth_dr > 0`` keeps a
            sample without counted pixels finite.
        batch: sum over the whole batch before dividing (one Dice per class) instead of per sample.
            Under DDP the sums are this rank's: only the class-weight histogram is synced.
        enet_c, effective_beta, sync_histogram: as in :func:`segfocal.losses.focal_loss`.
        validate: check shapes, dtypes and labels (one host synchronisation).

    fp16/bf16 logits are upcast: softmax and every sum run in float32 (float64 stays float64), so
    large images neither overflow nor lose the sums to fp16 rounding.
    """
    options = DiceOptions.of(weight=weight, ignore_index=ignore_index, reduction=reduction, smooth_nr=smooth_nr,
                             smooth_dr=smooth_dr, batch=batch, enet_c=enet_c, effective_beta=effective_beta,
                             sync_histogram=sync_histogram, validate=validate)
    return _dice_loss(logits, target, options)[0]


@dataclass(frozen=True, eq=False)
class DiceOptions:
    """Every option of the Dice loss (see :func:`dice_loss`) as one value, checked when it is made.

    ``weight`` is a :class:`WeightScheme`, fixed per-class weights or ``None``.
    """

    weight: Union[WeightScheme, torch.Tensor, Sequence[float], None] = None
    ignore_index: int = 255
    reduction: Reduction = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    batch: bool = False
    sync_histogram: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        check_ignore_index(self.ignore_index)
        check_choice("reduction", self.reduction, REDUCTIONS)
        if not (isinstance(self.smooth_nr, (int, float)) and math.isfinite(self.smooth_nr) and self.smooth_nr >= 0):
            raise ValueError(f"smooth_nr must be a finite number >= 0, got {self.smooth_nr!r}")
        if not (isinstance(self.smooth_dr, (int, float)) and math.isfinite(self.smooth_dr) and self.smooth_dr > 0):
            raise ValueError(f"smooth_dr must be a finite number > 0, got {self.smooth_dr!r}")

    @classmethod
    def of(cls, *, weight: WeightArg = None, enet_c: float = 1.10, effective_beta: float = 0.9999,
           **options) -> "DiceOptions":
        """The options of the public keywords, checked: a scheme name and its parameters become one
        :class:`WeightScheme`."""
        check_class_factors(weight=weight, alpha=None)
        return cls(weight=weight_of(weight, enet_c, effective_beta), **options)

    @property
    def scheme(self) -> Optional[WeightScheme]:
        """The on-the-fly weight scheme, or ``None`` (fixed weights or none)."""
        return self.weight if isinstance(self.weight, WeightScheme) else None


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`, with the same arguments.

    Fixed weights are a buffer (saved in the state dict); with a weight scheme, the weights of the
    last forward are kept in :attr:`last_class_weights` (detached) for logging.
    """

    def __init__(
        self,
        *,
        weight: WeightArg = None,
        ignore_index: int = 255,
        reduction: Reduction = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        enet_c: float = 1.10,
        effective_beta: float = 0.9999,
        sync_histogram: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.options = DiceOptions.of(weight=weight, ignore_index=ignore_index, reduction=reduction,
                                      smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, enet_c=enet_c,
                                      effective_beta=effective_beta, sync_histogram=sync_histogram, validate=validate)
        keep_class_weight(self, self.options.weight)
        self.last_class_weights: Optional[torch.Tensor] = None

    ignore_index, reduction = option_attribute("ignore_index"), option_attribute("reduction")
    smooth_nr, smooth_dr, batch = option_attribute("smooth_nr"), option_attribute("smooth_dr"), option_attribute("batch")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the buffer (which follows .to()) stands for fixed weights
        weight = self.weight if self.weight is not None else self.scheme
        loss, class_weight = _dice_loss(logits, target, dataclasses.replace(self.options, weight=weight))
        if self.scheme is not None:
            self.last_class_weights = class_weight.detach()
        return loss

    def extra_repr(self) -> str:
        weight = self.weight_scheme if self.weight_scheme is not None else ("fixed" if self.weight is not None else None)
        return (f"weight={weight}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"smooth_nr={self.smooth_nr}, smooth_dr={self.smooth_dr}, batch={self.batch}")


def _dice_loss(logits: torch.Tensor, target: torch.Tensor,
               options: DiceOptions) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The loss and the class weights in use (``None`` without weights)."""
    weight, ignore_index, reduction, batch = options.weight, options.ignore_index, options.reduction, options.batch
    smooth_nr, smooth_dr = options.smooth_nr, options.smooth_dr
    if options.validate:
        check_inputs(logits, target, ignore_index)
    num_classes = logits.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores, _ = flat_logits(logits)  # [B, C, S]; [N, C] is one sample of N pixels
    labels = flat_labels(target)[0]  # [B, S]
    probs = torch.softmax(scores, dim=1, dtype=dtype)
    counted = not_ignored(labels, ignore_index).unsqueeze(1)  # [B, 1, S]
    classes = torch.arange(num_classes, device=logits.device).view(1, -1, 1)
    one_hot = (labels.unsqueeze(1) == classes) & counted  # [B, C, S]
    sums_over = (0, 2) if batch else (2,)
    intersection = torch.where(one_hot, probs, 0.0).sum(sums_over)
    predicted = torch.where(counted, probs, 0.0).sum(sums_over)
    truth = one_hot.sum(sums_over, dtype=dtype)
    class_loss = 1.0 - (2.0 * intersection + smooth_nr) / (predicted + truth + smooth_dr)  # [B, C] or [C]

    class_weight = None
    if isinstance(weight, WeightScheme):
        class_weight = weight.of_batch(target, num_classes, ignore_index, options.sync_histogram, dtype)
    elif weight is not None:
        class_weight = per_class(weight, num_classes, "weight", dtype, logits.device)
    weighted = class_loss if class_weight is None else class_loss * class_weight
    if reduction == "none":
        return weighted, class_weight
    total = weighted.sum()
    if reduction == "sum":
        return total, class_weight
    samples = 1 if batch else class_loss.shape[0]
    per_sample_weight = num_classes if class_weight is None else class_weight.sum()
    denominator = torch.as_tensor(per_sample_weight * samples, dtype=dtype, device=logits.device)
    mean = total / denominator.clamp_min(torch.finfo(dtype).tiny)
    return torch.where(denominator > 0, mean, 0.0), class_weight  # 0 when every weight is 0 (or no sample)
