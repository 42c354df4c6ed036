"""The training loss chosen in the config: segfocal's focal loss, PyTorch's cross-entropy, or a weighted
sum of terms among those and the Dice loss (``loss.terms``)."""
from __future__ import annotations

import inspect
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import ConfigError, LossConfig
from ..config.schema import TERM_OPTIONS
from ..losses.terms import TERM_LOSSES, takes


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
            class_weight = inspect.signature(TERM_LOSSES[term.name]).parameters["weight"].default
        terms.append(_loss(term.name, term, class_weight, cfg, num_classes, ignore_index, f"loss.terms[{index}]"))
    return WeightedSum(terms, [term.weight for term in cfg.terms])


def _loss(name: str, options: Any, class_weight: Union[str, list, None], cfg: LossConfig, num_classes: int,
          ignore_index: int, key: str) -> nn.Module:
    """The loss ``name`` of :data:`TERM_LOSSES`, given the keywords it takes: ``options`` holds its own
    (the loss section or a term), ``cfg`` those shared by every term (how class weights are computed
    and synced)."""
    if not takes(name, "histogram_momentum") and options.histogram_momentum is not None:
        raise ConfigError(f"{key}.histogram_momentum applies to focal losses only")
    own = {option: getattr(options, option) for option in TERM_OPTIONS if option in type(options).model_fields}
    given = {"weight": class_weight, "ignore_index": ignore_index, "num_classes": num_classes, "enet_c": cfg.enet_c,
             "effective_beta": cfg.effective_beta, "sync_histogram": cfg.sync_histogram, **own}
    try:
        return TERM_LOSSES[name](**{keyword: value for keyword, value in given.items() if takes(name, keyword)})
    except ValueError as error:  # an option the loss rejects: name the config section
        raise ConfigError(f"{key}: {error}") from None
