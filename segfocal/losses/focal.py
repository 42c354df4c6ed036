"""Dense softmax focal loss with on-the-fly class weights and a Poly-1 term.

Per non-ignored pixel with label ``y`` and softmax probability ``p_t`` of that label::

    loss = -w[y] * a[y] * (1 - p_t)^gamma * log(p_t)  +  poly_epsilon * (1 - p_t)^(gamma + 1)

``w`` are class weights (by default ENet weights from the batch's own label histogram), ``a`` the
focal ``alpha`` per class. ``gamma = 0``, ``alpha = None``, ``poly_epsilon = 0`` is cross-entropy.

Two implementations compute it: the fused one (:mod:`.fused`, a custom autograd function, used
for ``"mean"`` and ``"sum"``) and the composite reference here (plain PyTorch ops and autograd,
used for ``"none"`` and kept as the oracle the fused one is tested against).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .class_weights import class_histogram, keep_class_weight
from .fused import fused_focal_loss
from .labels import mean_denominator, not_ignored, per_class_factor, sum_over_ranks
from .options import AlphaArg, FocalOptions, Implementation, Normalization, Reduction, WeightArg, option_attribute


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: AlphaArg = None,
    weight: WeightArg = "enet",
    ignore_index: int = 255,
    reduction: Reduction = "mean",
    normalize: Normalization = "pixels",
    poly_epsilon: float = 0.0,
    enet_c: float = 1.10,
    effective_beta: float = 0.9999,
    sync_histogram: bool = False,
    implementation: Implementation = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Softmax focal loss for logits ``[N, C]``, ``[B, C, H, W]`` or ``[B, C, D, H, W]``.

    Args:
        logits: unnormalised scores, class dimension 1, any float dtype and memory layout
            (contiguous, channels_last or other strides; never copied to ``[N, C]``).
        target: integer class indices, the shape of ``logits`` without dimension 1.
        gamma: focusing parameter, ``>= 0``.
        alpha: ``None``; a float (class 0 gets ``alpha``, every other class ``1 - alpha``, the
            convention of the source write-ups; MONAI's and kornia's softmax focal losses give class 0
            ``1 - alpha`` and the others ``alpha``); or one value per class.
        weight: a scheme of ``WEIGHT_SCHEMES`` (``"enet"`` by default), by name or as a
            :class:`~segfocal.losses.WeightScheme`, computes class weights from this batch's histogram of
            non-ignored labels (see :mod:`segfocal.losses.class_weights`); a tensor or sequence of ``C``
            fixed weights; ``None``.
        ignore_index: label that contributes nothing (loss, gradient, histogram, normaliser).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-pixel map with 0 at ignored pixels).
        normalize: for ``"mean"``: ``"pixels"`` divides by the number of non-ignored pixels (the
            source write-ups' convention); ``"weights"`` divides by the sum of the pixels' weights
            ``w[y] * a[y]``, as ``torch.nn.CrossEntropyLoss(weight=...)`` does. The Poly-1 term is
            not weighted but shares the denominator.
        poly_epsilon: coefficient of the Poly-1 term (Leng et al. 2022); 0 disables it.
        enet_c, effective_beta: parameters of the ``"enet"`` and ``"effective"`` schemes.
        sync_histogram: under ``torch.distributed``, sum the label histogram over all ranks, so
            every rank uses the weights (and the mean's denominator) of the global batch; with
            DistributedDataParallel's gradient averaging, training then follows the loss of the
            global batch exactly. Each rank's returned value is its share of that loss (their
            average is the global loss). No effect without an initialised process group.
        implementation: ``"auto"`` (fused for ``"mean"``/``"sum"``, reference for ``"none"``),
            ``"fused"`` or ``"reference"``.
        validate: check shapes, dtypes and label range (one host synchronisation for the range
            check). Pass ``False`` under CUDA graphs or ``torch.compile``.

    The loss is computed in float32 whatever the logits' dtype (float64 stays float64). ``1 - p_t``
    is the sum of the other classes' probabilities, ``-log p_t = -log1p(-(1 - p_t))`` where
    ``p_t > 1/2`` and ``(1 - p_t)^gamma = exp(gamma log1p(-p_t))`` where ``p_t < 1/2``, so fp16/bf16
    logits and confidently right or wrong pixels stay accurate to relative rounding at any
    ``gamma``. A batch whose pixels are all ignored gives 0 with a zero gradient. The fused
    implementation has no second derivative (it raises under ``create_graph=True``).
    """
    options = FocalOptions.of(
        gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index, reduction=reduction, normalize=normalize,
        poly_epsilon=poly_epsilon, enet_c=enet_c, effective_beta=effective_beta, sync_histogram=sync_histogram,
        implementation=implementation, validate=validate,
    )
    return _focal_loss(logits, target, options)[0]


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`, with the same arguments.

    Fixed ``weight`` and per-class ``alpha`` tensors are buffers, so they follow ``.to(device)``
    and are saved in the state dict. With a weight scheme, the weights computed in the last
    forward are kept in :attr:`last_class_weights` (detached) for logging.

    ``histogram_momentum`` (module only, needs ``num_classes``) smooths the on-the-fly weights
    across steps: they come from a running average of the batches' label histograms,
    ``h <- m h + (1 - m) h_batch`` (the first batch sets it), kept in the buffer
    ``running_histogram`` so it is saved and restored with the state dict.
    """

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: AlphaArg = None,
        weight: WeightArg = "enet",
        ignore_index: int = 255,
        reduction: Reduction = "mean",
        normalize: Normalization = "pixels",
        poly_epsilon: float = 0.0,
        enet_c: float = 1.10,
        effective_beta: float = 0.9999,
        sync_histogram: bool = False,
        implementation: Implementation = "auto",
        validate: bool = True,
        histogram_momentum: Optional[float] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.options = FocalOptions.of(
            gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index, reduction=reduction,
            normalize=normalize, poly_epsilon=poly_epsilon, enet_c=enet_c, effective_beta=effective_beta,
            sync_histogram=sync_histogram, implementation=implementation, validate=validate,
        )
        keep_class_weight(self, self.options.weight)
        per_class_alpha = alpha is not None and not isinstance(alpha, (int, float))
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32) if per_class_alpha else None)
        self.last_class_weights: Optional[torch.Tensor] = None
        self.histogram_momentum = histogram_momentum
        if histogram_momentum is not None:
            if not (isinstance(histogram_momentum, (int, float)) and 0.0 <= histogram_momentum < 1.0):
                raise ValueError(f"histogram_momentum must lie in [0, 1), got {histogram_momentum!r}")
            if self.scheme is None or num_classes is None:
                raise ValueError("histogram_momentum needs a weight scheme (e.g. weight='enet') and num_classes")
            if not (isinstance(num_classes, int) and num_classes > 0):
                raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
            self.register_buffer("running_histogram", torch.zeros(num_classes, dtype=torch.float64))
            self.register_buffer("histogram_updates", torch.zeros((), dtype=torch.int64))

    gamma, ignore_index = option_attribute("gamma"), option_attribute("ignore_index")
    reduction, normalize = option_attribute("reduction"), option_attribute("normalize")
    poly_epsilon = option_attribute("poly_epsilon")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the buffers (which follow .to()) stand for the fixed weights and per-class alpha
        weight = self.weight if self.weight is not None else self.scheme
        if self.histogram_momentum is not None:
            weight = self._running_weights(logits, target)
        alpha = self.alpha if self.alpha is not None else self.options.alpha
        loss, class_weight = _focal_loss(logits, target, dataclasses.replace(self.options, weight=weight, alpha=alpha))
        if self.scheme is not None:
            self.last_class_weights = class_weight.detach()
        return loss

    @torch.no_grad()
    def _running_weights(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Fold this batch's label histogram into the running one; the weights of the result."""
        options = self.options
        if options.validate:
            check_inputs(logits, target, options.ignore_index)
        if logits.dim() < 2 or logits.shape[1] != self.running_histogram.numel():
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not have num_classes="
                             f"{self.running_histogram.numel()} classes (dimension 1) of the running histogram")
        counts = class_histogram(target, logits.shape[1], options.ignore_index).to(torch.float64)
        if options.sync_histogram:
            counts, _ = sum_over_ranks(counts)
        momentum = (self.histogram_updates > 0).to(torch.float64) * self.histogram_momentum  # 0 on the first batch
        self.running_histogram.mul_(momentum).add_((1.0 - momentum) * counts)
        self.histogram_updates += 1
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return self.scheme.weights(self.running_histogram, dtype)

    def extra_repr(self) -> str:
        options = self.options
        weight = self.weight_scheme if self.scheme is not None else ("fixed" if self.weight is not None else None)
        alpha = options.alpha if self.alpha is None else "per-class"
        return (
            f"gamma={options.gamma}, alpha={alpha}, weight={weight}, ignore_index={options.ignore_index}, "
            f"reduction={options.reduction!r}, normalize={options.normalize!r}, poly_epsilon={options.poly_epsilon}"
        )


def _focal_loss(logits: torch.Tensor, target: torch.Tensor,
                options: FocalOptions) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The loss and the class weights in use (``None`` when ``options.weight`` is ``None``)."""
    if options.validate:
        check_inputs(logits, target, options.ignore_index)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    options = options.resolved(logits.shape[1], dtype, logits.device)
    if options.implementation == "fused" and options.reduction == "none":
        raise ValueError("implementation='fused' reduces; use reduction='mean' or 'sum', or implementation='reference'")
    if options.implementation == "fused" or (options.implementation == "auto" and options.reduction != "none"):
        return fused_focal_loss(logits, target, options)
    return _reference_focal_loss(logits, target, options, dtype)


def _reference_focal_loss(logits: torch.Tensor, target: torch.Tensor, options: FocalOptions,
                          dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The composite implementation: ``log_softmax``, ``gather`` and autograd (per-class options resolved)."""
    num_classes, gamma, ignore_index = logits.shape[1], options.gamma, options.ignore_index
    valid = not_ignored(target, ignore_index)
    safe_target = torch.where(valid, target, 0).long()
    index = safe_target.unsqueeze(1)
    log_p = F.log_softmax(logits, dim=1, dtype=dtype)
    log_pt = log_p.gather(1, index).squeeze(1)
    # As p_t -> 1, log p_t rounds to 0 (and -expm1(log p_t) with it) once 1 - p_t is below the
    # rounding of 1. Accurate values: 1 - p_t as the sum of the other classes' probabilities and
    # -log p_t = -log1p(-(1 - p_t)) where p_t > 1/2. They enter as values only (no [B, C, ...]
    # tensor kept for backward); the gradient flows through log p_t with the exact derivatives
    # d(1 - p_t) = -p_t d(log p_t) and d(-log p_t) = -d(log p_t); the added terms are exactly 0.
    with torch.no_grad():
        others = log_p.scatter(1, index, -torch.inf).exp_().sum(1)
        neg_log_pt_value = torch.where(others < 0.5, -torch.log1p(-others.clamp_max(0.5)), -log_pt)
    p_t_term = torch.exp(log_pt)  # only its gradient p_t is used; expm1's (result + 1) loses small p_t
    one_minus_pt = others + (p_t_term.detach() - p_t_term)
    neg_log_pt = neg_log_pt_value + (log_pt.detach() - log_pt)
    # clamped above 0 so (1 - p_t)^gamma has a finite gradient for 0 < gamma < 1 on saturated
    # pixels (the clamp passes no gradient there, and the term is ~0).
    one_minus_pt = one_minus_pt.clamp_min(torch.finfo(dtype).tiny)
    modulated = _modulating_factor(one_minus_pt, p_t_term, others, gamma)
    pixel_loss = modulated * neg_log_pt

    counts = class_histogram(target, num_classes, ignore_index).to(dtype)
    world_size = 1
    if options.sync_histogram:
        counts, world_size = sum_over_ranks(counts)
    scheme = options.scheme
    class_weight = scheme.weights(counts, dtype) if scheme is not None else options.weight
    pixel_factor = per_class_factor(class_weight, options.alpha)
    if pixel_factor is not None:
        pixel_loss = pixel_factor[safe_target] * pixel_loss
    if options.poly_epsilon != 0:
        pixel_loss = pixel_loss + options.poly_epsilon * modulated * one_minus_pt
    pixel_loss = torch.where(valid, pixel_loss, 0.0)

    if options.reduction == "none":
        return pixel_loss, class_weight
    total = pixel_loss.sum()
    if options.reduction == "sum":
        return total, class_weight
    denominator = mean_denominator(counts, pixel_factor, options.normalize, world_size)
    # 0 when the denominator is not positive (as the fused pass), also when a Poly-1 term remains
    mean = total / denominator.clamp_min(torch.finfo(dtype).tiny)
    return torch.where(denominator > 0, mean, 0.0), class_weight


def _modulating_factor(one_minus_pt: torch.Tensor, p_t: torch.Tensor, others: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """``(1 - p_t)^gamma``; where ``p_t < 1/2`` as ``exp(gamma log1p(-p_t))``, since ``1 - p_t`` rounds
    to 1 below ``p_t`` of the dtype's epsilon and ``gamma`` multiplies what is lost."""
    if gamma == 0:
        return torch.ones_like(one_minus_pt)
    near_one = others < 0.5  # p_t near 1
    # each side's input is in (0, 1/2] where unused: a derivative of inf there would give
    # 0 * inf = NaN in backward (and a sum of the others' probabilities may round above 1)
    from_one_minus_pt = torch.where(near_one, one_minus_pt, 0.5).pow(gamma)
    from_p_t = torch.exp(gamma * torch.log1p(-torch.where(near_one, 0.5, p_t)))
    return torch.where(near_one, from_one_minus_pt, from_p_t)


def check_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Raise ``ValueError`` for bad shapes, dtypes or labels outside ``[0, C)`` other than ``ignore_index``.

    Run before any indexing, so bad labels never reach a CUDA kernel (no device-side assert).
    """
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have a class dimension: [N, C], [B, C, H, W] or [B, C, D, H, W]; got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class (dimension 1), got shape {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.dtype in (torch.uint16, torch.uint32, torch.uint64):  # PyTorch has few operations for these
        raise ValueError(f"target dtype {target.dtype} is not supported: convert it with target.long()")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected target shape {expected} (logits without the class dimension 1)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    num_classes = logits.shape[1]
    bad = not_ignored(target, ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = torch.unique(target[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"target contains label(s) {shown} outside [0, {num_classes}) that are not ignore_index={ignore_index}"
        )
