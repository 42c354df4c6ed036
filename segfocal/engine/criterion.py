"""The training loss chosen in the config: segfocal's focal loss, PyTorch's cross-entropy, or a weighted
sum of terms among those and the Dice loss (``loss.terms``)."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import ConfigError, LossConfig
from ..losses import CrossEntropy, DiceLoss, FocalLoss


class WeightedSum(nn.Module):
    """``sum_i weight_i * term_i(logits, target)``: the loss of ``loss.terms``.

    The terms are a ``ModuleList`` (their buffers save as ``terms.<i>.<name>``).
    :attr:`last_class_weights` is that of the first term with on-the-fly class weights, so the
    trainer logs one set of weights as for a single loss.
    """

    def __init__(self, terms: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.weights: List[float] = [float(weight) for weight in weights]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(weight * term(logits, target) for weight, term in zip(self.weights, self.terms))

    @property
    def last_class_weights(self) -> Optional[torch.Tensor]:
        return next((term.last_class_weights for term in self.terms if term.last_class_weights is not None), None)

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def build_criterion(cfg: LossConfig, num_classes: int, ignore_index: int) -> nn.Module:
    """The loss module for ``cfg``: ``focal`` or ``cross_entropy`` by ``loss.name``, or the
    :class:`WeightedSum` of ``loss.terms`` when there are any."""
    if not cfg.terms:
        return _loss(cfg.name, cfg, cfg.weight, cfg, num_classes, ignore_index, "loss")
    terms = []
    for index, term in enumerate(cfg.terms):
        class_weight = term.class_weight
        if class_weight == "auto":  # each loss's own default
            class_weight = None if term.name == "dice" else "enet"
        terms.append(_loss(term.name, term, class_weight, cfg, num_classes, ignore_index, f"loss.terms[{index}]"))
    return WeightedSum(terms, [term.weight for term in cfg.terms])


def _loss(name: str, options: Any, class_weight: Union[str, list, None], cfg: LossConfig, num_classes: int,
          ignore_index: int, key: str) -> nn.Module:
    """One loss: ``options`` holds its own options (the loss section or a term), ``cfg`` the options
    shared by every term (how class weights are computed and synced)."""
    if name == "cross_entropy" and options.histogram_momentum is not None:
        raise ConfigError(f"{key}.histogram_momentum applies to focal losses only")
    try:
        if name == "cross_entropy":
            return CrossEntropy(weight=class_weight, ignore_index=ignore_index, enet_c=cfg.enet_c,
                                effective_beta=cfg.effective_beta, sync_histogram=cfg.sync_histogram)
        if name == "dice":
            return DiceLoss(weight=class_weight, ignore_index=ignore_index, smooth_nr=options.smooth_nr,
                            smooth_dr=options.smooth_dr, batch=options.batch, enet_c=cfg.enet_c,
                            effective_beta=cfg.effective_beta, sync_histogram=cfg.sync_histogram)
        return FocalLoss(gamma=options.gamma, alpha=options.alpha, weight=class_weight, ignore_index=ignore_index,
                         normalize=options.normalize, poly_epsilon=options.poly_epsilon, enet_c=cfg.enet_c,
                         effective_beta=cfg.effective_beta, sync_histogram=cfg.sync_histogram,
                         histogram_momentum=options.histogram_momentum, num_classes=num_classes)
    except ValueError as error:  # an option the loss rejects: name the config section
        raise ConfigError(f"{key}: {error}") from None
