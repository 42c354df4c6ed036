"""Class weights computed from a label histogram.

Every scheme maps per-class pixel counts to one weight per class. The functions make no host
synchronisation and have no data-dependent shapes, so they run inside CUDA graphs and
``torch.compile`` and can be applied to a histogram all-reduced across ranks.

Schemes (``f_c`` is the class's share of the counted pixels, ``K`` the number of classes present):

``"enet"``
    ``1 / ln(c + f_c)`` (Paszke et al. 2016, ENet; ``c = 1.10`` by default, ENet used 1.02).
``"inverse"``
    ``1 / (K f_c)``: every present class contributes equally and ``sum_c f_c w_c = 1``,
    so the loss keeps the scale of the unweighted loss.
``"median"``
    ``median(f) / f_c`` over present classes (median-frequency balancing, Eigen & Fergus 2015,
    used by SegNet), computed on the given histogram.
``"effective"``
    ``(1 - beta) / (1 - beta^n_c)`` (effective number of samples, Cui et al. 2019), scaled so the
    present classes' weights sum to ``K``.
``"sqrt_inverse"``
    ``1 / (sqrt(f_c) sum_k sqrt(f_k))`` over present classes: a milder ``"inverse"``, with the same
    normalisation ``sum_c f_c w_c = 1``.

Classes absent from the histogram get weight 0 in every scheme but ``"enet"`` (they have no pixels to
weigh, and their formula would be infinite); ``"enet"`` is finite everywhere and keeps its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .labels import not_ignored, sum_over_ranks

def class_histogram(target: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None) -> torch.Tensor:
    """Pixel count per class, shape ``[num_classes]`` int64.

    Pixels equal to ``ignore_index`` (also when it lies in ``[0, num_classes)``) and labels
    outside ``[0, num_classes)`` are not counted.
    """
    flat = target.reshape(-1)
    in_range = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        in_range &= not_ignored(flat, ignore_index)
    bins = torch.where(in_range, flat, num_classes).long()
    if flat.device.type == "cpu":
        counts = torch.bincount(bins, minlength=num_classes + 1)
    else:  # bincount on CUDA reads the maximum back to the host; scatter_add does not.
        counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[:num_classes]


def _enet(counts, freq, present, num_present, enet_c, effective_beta):
    if not enet_c > 1.0:
        raise ValueError(f"enet_c must be > 1 so that every weight is finite and positive, got {enet_c}")
    return 1.0 / torch.log(enet_c + freq)


def _inverse(counts, freq, present, num_present, enet_c, effective_beta):
    return torch.where(present, 1.0 / (num_present * freq), 0.0)


def _median(counts, freq, present, num_present, enet_c, effective_beta):
    return torch.where(present, _median_of_present(freq, present, num_present) / freq, 0.0)


def _effective(counts, freq, present, num_present, enet_c, effective_beta):
    if not 0.0 < effective_beta < 1.0:
        raise ValueError(f"effective_beta must lie in (0, 1), got {effective_beta}")
    effective_number = -torch.expm1(counts * math.log(effective_beta))  # 1 - beta^n without cancellation
    raw = torch.where(present, (1.0 - effective_beta) / effective_number, 0.0)
    return raw * num_present / raw.sum().clamp_min(torch.finfo(torch.float64).tiny)


def _sqrt_inverse(counts, freq, present, num_present, enet_c, effective_beta):
    root = freq.sqrt()
    return torch.where(present, 1.0 / (root * root.sum()), 0.0)


# name -> formula(counts, freq, present, num_present, enet_c, effective_beta), all float64 [C] but
# num_present (a 0-d tensor); the one list of schemes (the config's loss.weight choices come from it)
_FORMULAS = {"enet": _enet, "inverse": _inverse, "median": _median, "effective": _effective,
             "sqrt_inverse": _sqrt_inverse}
WEIGHT_SCHEMES = tuple(_FORMULAS)


def weights_from_histogram(
    histogram: torch.Tensor,
    scheme: str = "enet",
    *,
    enet_c: float = 1.10,
    effective_beta: float = 0.9999,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Class weights ``[C]`` for per-class pixel counts ``histogram`` (see the module docstring)."""
    if scheme not in _FORMULAS:
        raise ValueError(f"unknown class-weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    counts = histogram.to(torch.float64)
    freq = counts / counts.sum().clamp_min(1.0)
    present = counts > 0
    return _FORMULAS[scheme](counts, freq, present, present.sum(), enet_c, effective_beta).to(dtype)


@dataclass(frozen=True)
class WeightScheme:
    """An on-the-fly weight scheme as one value: its name and parameters (checked when made)."""

    name: str = "enet"
    enet_c: float = 1.10
    effective_beta: float = 0.9999

    def __post_init__(self) -> None:
        if self.name not in _FORMULAS:
            raise ValueError(f"unknown weight {self.name!r}; expected one of {WEIGHT_SCHEMES}, a tensor, or None")

    def weights(self, histogram: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The class weights ``[C]`` of per-class pixel counts ``histogram``."""
        return weights_from_histogram(histogram, self.name, enet_c=self.enet_c, effective_beta=self.effective_beta,
                                      dtype=dtype)

    def of_batch(self, target: torch.Tensor, num_classes: int, ignore_index: int, sync_histogram: bool,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights of ``target``'s label histogram, summed over ranks with ``sync_histogram``."""
        histogram = class_histogram(target, num_classes, ignore_index)
        if sync_histogram:
            histogram, _ = sum_over_ranks(histogram)
        return self.weights(histogram, dtype)


def class_weights(
    target: torch.Tensor,
    num_classes: int,
    scheme: str = "enet",
    *,
    ignore_index: Optional[int] = None,
    enet_c: float = 1.10,
    effective_beta: float = 0.9999,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Class weights ``[num_classes]`` of ``scheme`` for the labels in ``target``.

    The helper the loss uses internally, public so that users can log or precompute weights.
    Pixels equal to ``ignore_index`` and labels outside ``[0, num_classes)`` are not counted.
    """
    return weights_from_histogram(
        class_histogram(target, num_classes, ignore_index), scheme, enet_c=enet_c, effective_beta=effective_beta, dtype=dtype
    )


def weight_of(weight, enet_c: float = 1.10, effective_beta: float = 0.9999):
    """The ``weight`` keyword as a loss holds it: a scheme name with its parameters becomes one
    :class:`WeightScheme`; fixed weights, a scheme and ``None`` stay as they are."""
    return WeightScheme(weight, enet_c=enet_c, effective_beta=effective_beta) if isinstance(weight, str) else weight


def keep_class_weight(module: torch.nn.Module, weight, enet_c: float = 1.10,
                      effective_beta: float = 0.9999) -> Optional[WeightScheme]:
    """Store a loss module's ``weight`` argument: a scheme (a name or a :class:`WeightScheme`) as
    ``module.scheme`` with its name as ``module.weight_scheme``, fixed values as the float32 buffer
    ``module.weight`` (so they follow ``.to()`` and the state dict). Returns the scheme or ``None``."""
    weight = weight_of(weight, enet_c, effective_beta)
    module.scheme = weight if isinstance(weight, WeightScheme) else None
    module.weight_scheme = None if module.scheme is None else module.scheme.name
    fixed = None if weight is None or module.scheme is not None else torch.as_tensor(weight, dtype=torch.float32)
    module.register_buffer("weight", fixed)
    return module.scheme


def _median_of_present(freq: torch.Tensor, present: torch.Tensor, num_present: torch.Tensor) -> torch.Tensor:
    """Median of ``freq`` over the present classes (mean of the two middle values for an even count)."""
    if freq.numel() == 0:  # no classes: nothing to index
        return freq.new_zeros(())
    ordered = torch.where(present, freq, torch.inf).sort().values
    last = freq.numel() - 1
    lower = ((num_present - 1).clamp_min(0) // 2).clamp_max(last)
    upper = (num_present // 2).clamp_max(last)
    return 0.5 * (ordered[lower] + ordered[upper])
