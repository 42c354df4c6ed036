"""The focal loss's options as one value, checked once where it is made.

:class:`FocalOptions` travels unchanged from :class:`~segfocal.losses.FocalLoss` /
:func:`~segfocal.losses.focal_loss` (which build it from their keywords) through the fused autograd
function to the back ends. The option names are ``Literal`` types whose tuples the config schema's
choices reuse.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch

from .class_weights import WeightScheme, weight_of

Reduction = Literal["mean", "sum", "none"]
Normalization = Literal["pixels", "weights"]
Implementation = Literal["auto", "fused", "reference"]
REDUCTIONS = get_args(Reduction)
NORMALIZATIONS = get_args(Normalization)
IMPLEMENTATIONS = get_args(Implementation)

WeightArg = Union[str, WeightScheme, torch.Tensor, Sequence[float], None]
AlphaArg = Union[float, torch.Tensor, Sequence[float], None]


@dataclass(frozen=True, eq=False)
class FocalOptions:
    """Every option of the focal loss (see :func:`segfocal.losses.focal_loss` for their meaning); the
    scalar options are checked when it is made, the class factors by :meth:`of`.

    ``weight`` is a :class:`WeightScheme`, fixed per-class weights or ``None``; ``alpha`` a float,
    per-class values or ``None``. :meth:`resolved` turns both into ``[C]`` tensors for one batch.
    """

    gamma: float = 2.0
    alpha: AlphaArg = None
    weight: Union[WeightScheme, torch.Tensor, Sequence[float], None] = WeightScheme()
    ignore_index: int = 255
    reduction: Reduction = "mean"
    normalize: Normalization = "pixels"
    poly_epsilon: float = 0.0
    sync_histogram: bool = False
    implementation: Implementation = "auto"
    validate: bool = True

    def __post_init__(self) -> None:
        check_options(gamma=self.gamma, reduction=self.reduction, normalize=self.normalize,
                      poly_epsilon=self.poly_epsilon, implementation=self.implementation,
                      ignore_index=self.ignore_index)

    @classmethod
    def of(cls, *, weight: WeightArg = "enet", enet_c: float = 1.10, effective_beta: float = 0.9999,
           **options) -> "FocalOptions":
        """The options of the public keywords, checked: a scheme name and its parameters become one
        :class:`WeightScheme`; fixed weights and alpha are read where that needs no device synchronisation."""
        check_class_factors(weight=weight, alpha=options.get("alpha"))
        return cls(weight=weight_of(weight, enet_c, effective_beta), **options)

    @property
    def scheme(self) -> Optional[WeightScheme]:
        """The on-the-fly weight scheme, or ``None`` (fixed weights or none)."""
        return self.weight if isinstance(self.weight, WeightScheme) else None

    def resolved(self, num_classes: int, dtype: torch.dtype, device: torch.device) -> "FocalOptions":
        """These options with fixed weights and ``alpha`` as ``[C]`` tensors of ``dtype`` on ``device``
        (a float ``alpha`` gives class 0 ``alpha`` and the others ``1 - alpha``)."""
        weight = self.weight
        if weight is not None and self.scheme is None:
            weight = per_class(weight, num_classes, "weight", dtype, device)
        alpha = self.alpha
        if isinstance(alpha, (int, float)):
            alpha = torch.full((num_classes,), 1.0 - float(alpha), dtype=dtype, device=device)
            alpha[0] = float(self.alpha)
        elif alpha is not None:
            alpha = per_class(alpha, num_classes, "alpha", dtype, device)
        return dataclasses.replace(self, weight=weight, alpha=alpha)


def option_attribute(name: str) -> property:
    """A loss module's ``<name>``: its ``options.<name>``, read-only, as ``torch.nn`` losses expose their options."""
    return property(lambda self: getattr(self.options, name), doc=f"``options.{name}`` (read-only).")


def check_options(
    *, gamma: float, reduction: str, normalize: str, poly_epsilon: float, implementation: str = "auto",
    ignore_index: int = -100,
) -> None:
    """Raise ``ValueError`` naming the first invalid scalar option (no tensor is read)."""
    check_ignore_index(ignore_index)
    if not (isinstance(gamma, (int, float)) and 0 <= gamma < float("inf")):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not (isinstance(poly_epsilon, (int, float)) and abs(poly_epsilon) < float("inf")):
        raise ValueError(f"poly_epsilon must be a finite number, got {poly_epsilon!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)


def check_ignore_index(ignore_index: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer label value, got {ignore_index!r}")


def check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_class_factors(*, weight, alpha: AlphaArg) -> None:
    """Raise ``ValueError`` unless fixed class weights and alpha are finite and non-negative (a
    negative one flips that class's gradient). Read only where that costs no device
    synchronisation (lists, numbers, CPU tensors); the module checks its buffers once, when built."""
    if isinstance(alpha, (int, float)) and not 0 <= alpha <= 1:
        raise ValueError(f"alpha as a number must lie in [0, 1] (class 0 gets alpha, the others 1 - alpha), "
                         f"got {alpha!r}")
    for name, values in (("weight", weight), ("alpha", alpha)):
        if values is None or isinstance(values, (str, int, float, WeightScheme)) or (
                isinstance(values, torch.Tensor) and values.device.type != "cpu"):
            continue
        tensor = torch.as_tensor(values, dtype=torch.float64)
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative for every class, got {tensor.tolist()}")


def per_class(values: Union[torch.Tensor, Sequence[float]], num_classes: int, name: str, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``values`` as a ``[num_classes]`` tensor; ``ValueError`` for another shape."""
    tensor = torch.as_tensor(values, dtype=dtype, device=device)
    if tensor.shape != (num_classes,):
        raise ValueError(f"{name} must have one value per class ({num_classes}), got shape {tuple(tensor.shape)}")
    return tensor
