"""Data: paired image/mask folders and the standard layouts (images of any channel count and bit depth),
label masks and their remapping, albumentations pipelines, the synthetic set, loaders.

Problems with the user's files raise :class:`DataError`, whose message names the path at fault.
"""
from .build import build_dataset, build_loader
from .errors import DataError
from .folder import MASK_SUFFIXES, SegmentationFolder
from .images import IMAGE_SUFFIXES, check_image, pipeline_image, read_image
from .labels import LabelRemap
from .masks import check_mask_values, default_palette, read_mask, rgb_to_classes, write_palette_mask
from .synthetic import SYNTHETIC_CLASS_NAMES, ensure_synthetic_dataset, synthetic_class_names
from .transforms import build_transform

__all__ = [
    "DataError", "SegmentationFolder", "read_image", "read_mask", "rgb_to_classes", "check_mask_values",
    "default_palette", "write_palette_mask", "build_transform", "ensure_synthetic_dataset",
    "SYNTHETIC_CLASS_NAMES", "synthetic_class_names", "build_dataset", "build_loader",
    "IMAGE_SUFFIXES", "MASK_SUFFIXES", "check_image", "pipeline_image", "LabelRemap",
]
