"""Augmentation pipelines from albumentations' own serialised form, plus normalisation and tensors.

A config lists transforms as ``A.to_dict(pipeline)["transform"]["transforms"]`` would, for example
``{"__class_fullname__": "HorizontalFlip", "p": 0.5}``; :func:`build_transform` wraps them in a
Compose dict, restores it with ``A.from_dict`` and appends :class:`ScaledNormalize` and ``ToTensorV2``.
The pipeline takes what :func:`~segfocal.data.images.pipeline_image` gives: uint8 images, or float32
images already multiplied by ``data.scale``.

Three segmentation safeguards on top of plain ``A.from_dict``:

* masks are always resampled nearest-neighbour (the Compose's ``mask_interpolation``), and an
  item asking for anything else is an error rather than silently overridden;
* an item without ``p`` gets its transform's own default (``A.from_dict`` would use 0.5, which
  turns e.g. a ``RandomCrop`` without ``p`` into a crop half the time and breaks batching);
* with ``ignore_index``, padding/rotation that leaves ``fill_mask`` unset fills masks with the
  ignore label, not class 0, so padded border pixels are never trained as a real class.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import albumentations as A
import albumentations.pytorch  # noqa: F401  (registers ToTensorV2 for A.from_dict)
import cv2
import numpy as np
from albumentations.core.serialization import SERIALIZABLE_REGISTRY, shorten_class_name

from ..config import ConfigError
from .images import uint8_max_pixel_value

_NEAREST = cv2.INTER_NEAREST
# fill_mask is the value of a dropped object here, not of padding: leave it as configured.
_FILL_MASK_IS_NOT_PADDING = ("MaskDropout",)
_UNKNOWN_ARGUMENT = re.compile(r"Argument\(s\) .* are not valid")


def build_transform(
    items: Optional[Sequence[Mapping[str, Any]]],
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: Optional[int] = None,
    seed: Optional[int] = None,
    scale: Optional[float] = None,
) -> A.Compose:
    """``A.from_dict`` of ``items`` in a Compose, then :class:`ScaledNormalize` and ``ToTensorV2``.

    An image value ``x`` reaches the model as ``(x * scale - mean) / std`` per channel, with ``scale``
    (``data.scale``) 1/255 for uint8 images by default. Invalid items raise :class:`ConfigError`
    naming the item's index and albumentations' message. ``seed`` seeds the Compose's own random
    state (the DataLoader re-seeds it per worker).
    """
    items = [] if items is None else items
    if len(mean) != len(std) or not mean or not all(float(value) > 0 for value in std):
        raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)}: expected one value each per "
                          f"channel, std > 0")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ConfigError(f"augmentation: expected a list of albumentations transform dicts, got {items!r}")
    prepared = [_prepare(item, f"augmentation item {index}", ignore_index) for index, item in enumerate(items)]
    for index, item in enumerate(prepared):
        _instantiate(item, f"augmentation item {index} ({items[index]!r})")
    tail = [
        {"__class_fullname__": ScaledNormalize.get_class_fullname(), "mean": list(mean), "std": list(std),
         "uint8_max": uint8_max_pixel_value(scale), "p": 1.0},
        {"__class_fullname__": "ToTensorV2", "p": 1.0},
    ]
    compose = {"__class_fullname__": "Compose", "p": 1.0, "transforms": prepared + tail,
               "mask_interpolation": _NEAREST, "seed": seed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each item's warnings were shown by _instantiate already
        try:
            return A.from_dict({"transform": compose})
        except Exception as error:  # only the appended Normalize can still fail here
            raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)}: {_message(error)}") from None


class ScaledNormalize(A.ImageOnlyTransform):
    """albumentations' ``Normalize(mean, std)`` for both kinds of pipeline image: uint8 ones with
    ``max_pixel_value=uint8_max`` (``1 / data.scale``, 255 by default: the 8-bit path as it always
    was) and float32 ones, already scaled, with ``max_pixel_value=1`` (nothing clipped)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], uint8_max: float = 255.0, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.mean, self.std, self.uint8_max = list(mean), list(std), uint8_max
        self._uint8 = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=uint8_max, p=1.0)
        self._scaled = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=1.0, p=1.0)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return (self._uint8 if img.dtype == np.uint8 else self._scaled).apply(img)

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("mean", "std", "uint8_max")


def _prepare(item: Any, where: str, ignore_index: Optional[int]) -> Dict[str, Any]:
    """A checked deep copy of ``item`` with segmentation defaults filled in (see the module docstring)."""
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a dict like {{__class_fullname__: HorizontalFlip, p: 0.5}}, got {item!r}")
    name = item.get("__class_fullname__")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: missing '__class_fullname__' (the albumentations class name) in {dict(item)!r}")
    cls = SERIALIZABLE_REGISTRY.get(shorten_class_name(name))
    if cls is None:
        close = difflib.get_close_matches(name, list(SERIALIZABLE_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: unknown albumentations transform {name!r}{hint}")
    prepared = copy.deepcopy(dict(item))
    parameters = inspect.signature(cls.__init__).parameters
    if "p" not in prepared and "p" in parameters and parameters["p"].default is not inspect.Parameter.empty:
        prepared["p"] = parameters["p"].default
    interpolation = prepared.get("mask_interpolation", _NEAREST)
    if interpolation != _NEAREST:
        raise ConfigError(f"{where} ({name}): mask_interpolation={interpolation!r}; masks are always resampled "
                          f"nearest-neighbour (cv2.INTER_NEAREST = 0), so remove it or set it to 0")
    if prepared.get("area_for_downscale") == "image_mask":
        raise ConfigError(f"{where} ({name}): area_for_downscale='image_mask' would average class labels; "
                          f"use 'image' or null")
    fill_mask = parameters.get("fill_mask")
    if (ignore_index is not None and fill_mask is not None and "fill_mask" not in prepared
            and fill_mask.default is not None and name not in _FILL_MASK_IS_NOT_PADDING):
        prepared["fill_mask"] = ignore_index
    if "transforms" in prepared:
        children = prepared["transforms"]
        if not isinstance(children, list):
            raise ConfigError(f"{where} ({name}): 'transforms' must be a list, got {children!r}")
        prepared["transforms"] = [
            _prepare(child, f"{where}, transforms[{index}]", ignore_index) for index, child in enumerate(children)
        ]
    return prepared


def _instantiate(item: Dict[str, Any], where: str) -> Any:
    """``A.from_dict`` of one item; its errors and unknown arguments become ConfigError.

    albumentations only warns about (and drops) unknown arguments, so a misspelt one would pass
    unnoticed; arguments the transform's own ``to_dict`` writes (2.0.8's PadIfNeeded writes
    ``padding``, which its constructor does not take) are accepted, so round trips keep working.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = A.from_dict({"transform": item})
        except Exception as error:
            raise ConfigError(f"{where}: {_message(error)}") from None
    unknown = _unknown_arguments(transform)
    if unknown:
        listed = ", ".join(f"'{arg}' ({name})" for name, arg in unknown)
        raise ConfigError(f"{where}: unknown argument(s) {listed}")
    for warning in caught:
        if not _UNKNOWN_ARGUMENT.search(str(warning.message)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return transform


def _unknown_arguments(transform: Any) -> List[Tuple[str, str]]:
    """(class, argument) for arguments ``transform`` (or a nested one) ignored and would not write back."""
    found: List[Tuple[str, str]] = []
    invalid = getattr(transform, "invalid_args", None) or []
    if invalid:
        try:
            written = set(A.to_dict(transform)["transform"])
        except NotImplementedError:
            written = set()
        found += [(type(transform).__name__, arg) for arg in invalid if arg not in written]
    for child in getattr(transform, "transforms", None) or []:
        found += _unknown_arguments(child)
    return found


def _message(error: Exception) -> str:
    """albumentations' (often pydantic's, multi-line) message on one line, without the URL lines."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not line.startswith("For further information")]
    return f"{type(error).__name__}: " + "; ".join(kept)


__all__: List[str] = ["build_transform", "ScaledNormalize"]
