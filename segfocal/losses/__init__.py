"""Losses for dense prediction; importing this package needs torch alone."""
from .class_weights import WEIGHT_SCHEMES, class_histogram, class_weights, weights_from_histogram
from .dice import DiceLoss, dice_loss
from .focal import FocalLoss, focal_loss

__all__ = [
    "FocalLoss",
    "focal_loss",
    "DiceLoss",
    "dice_loss",
    "class_weights",
    "class_histogram",
    "weights_from_histogram",
    "WEIGHT_SCHEMES",
]
