"""Losses for dense prediction; importing this package needs torch alone."""
from .class_weights import WEIGHT_SCHEMES, WeightScheme, class_histogram, class_weights, weights_from_histogram
from .cross_entropy import CrossEntropy
from .dice import DiceLoss, DiceOptions, dice_loss
from .focal import FocalLoss, focal_loss
from .options import FocalOptions

__all__ = [
    "FocalLoss",
    "focal_loss",
    "FocalOptions",
    "WeightScheme",
    "CrossEntropy",
    "DiceLoss",
    "DiceOptions",
    "dice_loss",
    "class_weights",
    "class_histogram",
    "weights_from_histogram",
    "WEIGHT_SCHEMES",
]
