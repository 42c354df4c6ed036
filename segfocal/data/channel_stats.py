"""Per-channel mean and std of a split's images, in the units of ``data.mean``/``data.std``.

``build_transform`` normalises with ``Normalize(mean, std, max_pixel_value=255)``, so both are
fractions of 255. The statistics are over pixels (a large image weighs more than a small one),
with the population std (ddof=0), of the untransformed 8-bit images.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np

from .errors import DataError
from .folder import read_image

_LEVELS = 256  # 8-bit images


def channel_histograms(paths: Iterable[Path], skip_bad: bool = False) -> np.ndarray:
    """Pixel counts per channel and 8-bit value (int64 ``[3, 256]``) of the RGB images at ``paths``.

    Streaming: one image in memory at a time, and exact integer counts however many pixels there
    are. With ``skip_bad`` an unreadable image is left out with a warning (``data.bad_samples:
    skip``); otherwise its :class:`DataError` propagates.
    """
    counts = np.zeros((3, _LEVELS), dtype=np.int64)
    for path in paths:
        try:
            image = read_image(path)
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"skipping a bad image (data.bad_samples='skip'): {error}", stacklevel=2)
            continue
        for channel in range(3):
            counts[channel] += np.bincount(image[..., channel].ravel(), minlength=_LEVELS)
    return counts


def mean_std_from_histograms(counts: np.ndarray) -> Tuple[List[float], List[float]]:
    """Per-channel (mean, std) as fractions of 255 of the pixels that ``counts`` (``[C, 256]``) tallies.

    Computed in float64 from the 256 value frequencies in two passes (mean, then the mean squared
    deviation), so no sum of squares is ever subtracted and nothing cancels, whatever the pixel count.
    """
    pixels = counts.sum(axis=1)
    if not pixels.all():
        raise DataError("no pixels to compute the image mean/std from: every image of the split is bad")
    shares = counts / pixels[:, None].astype(np.float64)
    values = np.arange(counts.shape[1], dtype=np.float64) / (_LEVELS - 1)
    mean = shares @ values
    std = np.sqrt((shares * (values[None, :] - mean[:, None]) ** 2).sum(axis=1))
    return mean.tolist(), std.tolist()


def image_mean_std(paths: Iterable[Path], skip_bad: bool = False) -> Tuple[List[float], List[float]]:
    """Per-channel mean and population std, as fractions of 255, over every pixel of the images at ``paths``."""
    return mean_std_from_histograms(channel_histograms(paths, skip_bad))
