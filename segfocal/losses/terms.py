"""The losses a config may name (``loss.name``, ``loss.terms[i].name``), by name: one table, from
which the config's term names and the options each term takes (its constructor's keywords) come."""
from __future__ import annotations

import inspect
from typing import Dict, Type

from torch import nn

from .cross_entropy import CrossEntropy
from .dice import DiceLoss
from .focal import FocalLoss

TERM_LOSSES: Dict[str, Type[nn.Module]] = {"focal": FocalLoss, "cross_entropy": CrossEntropy, "dice": DiceLoss}


def takes(name: str, option: str) -> bool:
    """Whether the loss ``name`` takes the keyword ``option``."""
    return option in inspect.signature(TERM_LOSSES[name]).parameters
