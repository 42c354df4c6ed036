"""Segmentation models: any segmentation-models-pytorch architecture and encoder by name."""
from .factory import build_model

__all__ = ["build_model"]
