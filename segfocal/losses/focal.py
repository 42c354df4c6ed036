"""Dense softmax focal loss with on-the-fly class weights and a Poly-1 term.

Per non-ignored pixel with label ``y`` and softmax probability ``p_t`` of that label::

    loss = -w[y] * a[y] * (1 - p_t)^gamma * log(p_t)  +  poly_epsilon * (1 - p_t)^(gamma + 1)

``w`` are class weights (by default ENet weights from the batch's own label histogram), ``a`` the
focal ``alpha`` per class. ``gamma = 0``, ``alpha = None``, ``poly_epsilon = 0`` is cross-entropy.
This is the composite reference implementation: plain PyTorch ops, autograd for the gradient.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .class_weights import WEIGHT_SCHEMES, class_weights

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("pixels", "weights")

WeightArg = Union[str, torch.Tensor, Sequence[float], None]
AlphaArg = Union[float, torch.Tensor, Sequence[float], None]


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: AlphaArg = None,
    weight: WeightArg = "enet",
    ignore_index: int = 255,
    reduction: str = "mean",
    normalize: str = "pixels",
    poly_epsilon: float = 0.0,
    enet_c: float = 1.10,
    effective_beta: float = 0.9999,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax focal loss for logits ``[N, C]``, ``[B, C, H, W]`` or ``[B, C, D, H, W]``.

    Args:
        logits: unnormalised scores, class dimension 1, any float dtype and memory layout
            (contiguous, channels_last or other strides; never copied to ``[N, C]``).
        target: integer class indices, the shape of ``logits`` without dimension 1.
        gamma: focusing parameter, ``>= 0``.
        alpha: ``None``; a float (class 0 gets ``alpha``, every other class ``1 - alpha``, the
            RetinaNet/background convention of the source write-ups); or one value per class.
        weight: ``"enet"`` (default), ``"inverse"``, ``"median"`` or ``"effective"`` compute class
            weights from this batch's histogram of non-ignored labels (see
            :mod:`segfocal.losses.class_weights`); a tensor or sequence of ``C`` fixed weights; ``None``.
        ignore_index: label that contributes nothing (loss, gradient, histogram, normaliser).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-pixel map with 0 at ignored pixels).
        normalize: for ``"mean"``: ``"pixels"`` divides by the number of non-ignored pixels (the
            source write-ups' convention); ``"weights"`` divides by the sum of the pixels' weights
            ``w[y] * a[y]``, as ``torch.nn.CrossEntropyLoss(weight=...)`` does.
        poly_epsilon: coefficient of the Poly-1 term (Leng et al. 2022); 0 disables it.
        enet_c, effective_beta: parameters of the ``"enet"`` and ``"effective"`` schemes.
        validate: check shapes, dtypes and label range (one host synchronisation for the range
            check). Pass ``False`` under CUDA graphs or ``torch.compile``.

    The loss is computed in float32 whatever the logits' dtype (float64 stays float64), from
    ``log_softmax``, with ``1 - p_t`` as the sum of the other classes' probabilities and
    ``-log p_t = -log1p(-(1 - p_t))`` where ``p_t > 1/2``, so fp16/bf16 logits and confidently
    correct pixels stay accurate to relative rounding. A batch whose pixels are all ignored gives
    0 with a zero gradient.
    """
    if validate:
        check_inputs(logits, target, ignore_index)
        check_options(gamma=gamma, reduction=reduction, normalize=normalize, poly_epsilon=poly_epsilon)
    num_classes = logits.shape[1]
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    valid = _not_ignored(target, ignore_index)
    safe_target = torch.where(valid, target, 0).long()
    index = safe_target.unsqueeze(1)
    log_p = F.log_softmax(logits, dim=1, dtype=compute_dtype)
    log_pt = log_p.gather(1, index).squeeze(1)
    # As p_t -> 1, log p_t rounds to 0 (and -expm1(log p_t) with it) once 1 - p_t is below the
    # rounding of 1. Accurate values: 1 - p_t as the sum of the other classes' probabilities and
    # -log p_t = -log1p(-(1 - p_t)) where p_t > 1/2. They enter as values only (no [B, C, ...]
    # tensor kept for backward); the gradient flows through log p_t with the exact derivatives
    # d(1 - p_t) = -p_t d(log p_t) and d(-log p_t) = -d(log p_t); the added terms are exactly 0.
    with torch.no_grad():
        others = log_p.scatter(1, index, -torch.inf).exp_().sum(1)
        neg_log_pt_value = torch.where(others < 0.5, -torch.log1p(-others.clamp_max(0.5)), -log_pt)
    p_t_term = torch.expm1(log_pt)
    one_minus_pt = others + (p_t_term.detach() - p_t_term)
    neg_log_pt = neg_log_pt_value + (log_pt.detach() - log_pt)
    # clamped above 0 so (1 - p_t)^gamma has a finite gradient for 0 < gamma < 1 on saturated
    # pixels (the clamp passes no gradient there, and the term is ~0).
    one_minus_pt = one_minus_pt.clamp_min(torch.finfo(compute_dtype).tiny)

    pixel_loss = neg_log_pt if gamma == 0 else one_minus_pt.pow(gamma) * neg_log_pt
    # the histogram counts only non-ignored pixels, also when ignore_index lies in [0, C)
    histogram_target = torch.where(valid, safe_target, -1)
    pixel_weight = _pixel_weight(
        histogram_target, safe_target, num_classes, weight, alpha, enet_c, effective_beta, compute_dtype, logits.device
    )
    if pixel_weight is not None:
        pixel_loss = pixel_weight * pixel_loss
    if poly_epsilon != 0:
        pixel_loss = pixel_loss + poly_epsilon * one_minus_pt.pow(gamma + 1)
    pixel_loss = torch.where(valid, pixel_loss, 0.0)

    if reduction == "none":
        return pixel_loss
    total = pixel_loss.sum()
    if reduction == "sum":
        return total
    if normalize == "weights" and pixel_weight is not None:
        denominator = torch.where(valid, pixel_weight, 0.0).sum()
    else:
        denominator = valid.sum().to(compute_dtype)
    return total / denominator.clamp_min(torch.finfo(compute_dtype).tiny)


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`, with the same arguments.

    Fixed ``weight`` and per-class ``alpha`` tensors are buffers, so they follow ``.to(device)``
    and are saved in the state dict. With a weight scheme, the weights computed in the last
    forward are kept in :attr:`last_class_weights` (detached) for logging.
    """

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: AlphaArg = None,
        weight: WeightArg = "enet",
        ignore_index: int = 255,
        reduction: str = "mean",
        normalize: str = "pixels",
        poly_epsilon: float = 0.0,
        enet_c: float = 1.10,
        effective_beta: float = 0.9999,
        validate: bool = True,
    ) -> None:
        super().__init__()
        check_options(gamma=gamma, reduction=reduction, normalize=normalize, poly_epsilon=poly_epsilon)
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize = normalize
        self.poly_epsilon = float(poly_epsilon)
        self.enet_c = enet_c
        self.effective_beta = effective_beta
        self.validate = validate
        self.weight_scheme = weight if isinstance(weight, str) else None
        if self.weight_scheme is not None and self.weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight {weight!r}; expected one of {WEIGHT_SCHEMES}, a tensor, or None")
        fixed_weight = None if weight is None or isinstance(weight, str) else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", fixed_weight)
        self.alpha_scalar = float(alpha) if isinstance(alpha, (int, float)) else None
        alpha_tensor = None if alpha is None or self.alpha_scalar is not None else torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha_tensor)
        self.last_class_weights: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.weight_scheme is not None:
            if self.validate:
                check_inputs(logits, target, self.ignore_index)
            weight = class_weights(
                torch.where(_not_ignored(target, self.ignore_index), target.long(), -1),
                logits.shape[1],
                self.weight_scheme,
                enet_c=self.enet_c,
                effective_beta=self.effective_beta,
                dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
            )
            self.last_class_weights = weight.detach()
        return focal_loss(
            logits,
            target,
            gamma=self.gamma,
            alpha=self.alpha if self.alpha is not None else self.alpha_scalar,
            weight=weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            normalize=self.normalize,
            poly_epsilon=self.poly_epsilon,
            validate=self.validate and self.weight_scheme is None,
        )

    def extra_repr(self) -> str:
        weight = self.weight_scheme if self.weight_scheme is not None else ("fixed" if self.weight is not None else None)
        alpha = self.alpha_scalar if self.alpha is None else "per-class"
        return (
            f"gamma={self.gamma}, alpha={alpha}, weight={weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, normalize={self.normalize!r}, poly_epsilon={self.poly_epsilon}"
        )


def check_options(*, gamma: float, reduction: str, normalize: str, poly_epsilon: float) -> None:
    """Raise ``ValueError`` naming the first invalid scalar option."""
    if not (isinstance(gamma, (int, float)) and 0 <= gamma < float("inf")):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not (isinstance(poly_epsilon, (int, float)) and abs(poly_epsilon) < float("inf")):
        raise ValueError(f"poly_epsilon must be a finite number, got {poly_epsilon!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def check_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Raise ``ValueError`` for bad shapes, dtypes or labels outside ``[0, C)`` other than ``ignore_index``.

    Run before any indexing, so bad labels never reach a CUDA kernel (no device-side assert).
    """
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have a class dimension: [N, C], [B, C, H, W] or [B, C, D, H, W]; got shape {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected target shape {expected} (logits without the class dimension 1)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    num_classes = logits.shape[1]
    bad = _not_ignored(target, ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = torch.unique(target[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"target contains label(s) {shown} outside [0, {num_classes}) that are not ignore_index={ignore_index}"
        )


def _not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target != ignore_index``, all true where ``ignore_index`` does not fit ``target``'s dtype.

    (A plain comparison casts the index to the dtype: ``uint8 != -100`` would treat 156 as ignored.)
    """
    if not target.is_floating_point() and target.dtype != torch.bool:
        info = torch.iinfo(target.dtype)
        if not info.min <= ignore_index <= info.max:
            return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _per_class(
    values: Union[torch.Tensor, Sequence[float]], num_classes: int, name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype, device=device)
    if tensor.shape != (num_classes,):
        raise ValueError(f"{name} must have one value per class ({num_classes}), got shape {tuple(tensor.shape)}")
    return tensor


def _pixel_weight(
    target: torch.Tensor,
    safe_target: torch.Tensor,
    num_classes: int,
    weight: WeightArg,
    alpha: AlphaArg,
    enet_c: float,
    effective_beta: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Per-pixel product ``w[y] * a[y]``, or ``None`` when neither is set."""
    per_class = None
    if isinstance(weight, str):
        if weight not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight {weight!r}; expected one of {WEIGHT_SCHEMES}, a tensor, or None")
        per_class = class_weights(target, num_classes, weight, enet_c=enet_c, effective_beta=effective_beta, dtype=dtype)
    elif weight is not None:
        per_class = _per_class(weight, num_classes, "weight", dtype, device)
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            alpha_per_class = torch.full((num_classes,), 1.0 - float(alpha), dtype=dtype, device=device)
            alpha_per_class[0] = float(alpha)
        else:
            alpha_per_class = _per_class(alpha, num_classes, "alpha", dtype, device)
        per_class = alpha_per_class if per_class is None else per_class * alpha_per_class
    return None if per_class is None else per_class[safe_target]
