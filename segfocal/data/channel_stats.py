"""Per-channel mean and std of a split's images, in the units of ``data.mean``/``data.std``.

A stored value ``x`` is normalised as ``(x * scale - mean) / std`` (``data.scale``, by default the
type's full range: 1/255 for 8-bit images), so the statistics are of ``x * scale``: fractions of
255 for 8-bit RGB, as before. They are over pixels (a large image weighs more than a small one),
with the population std (ddof=0), of the untransformed images, for any channel count.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np

from .errors import DataError
from .images import read_image, value_scale


class Moments:
    """Running per-channel pixel count, mean and sum of squared deviations (float64).

    Each image is summarised in two passes (mean, then squared deviations) and merged with Chan et
    al.'s pairwise update, so no sum of squares is subtracted and nothing cancels, however many pixels.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None

    def add(self, values: np.ndarray) -> None:
        """Fold in ``values`` (N pixels x C channels)."""
        mean = values.mean(axis=0)
        self.merge(len(values), mean, ((values - mean) ** 2).sum(axis=0))

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Fold in the summary of ``count`` more pixels."""
        if self.mean is None:
            self.count, self.mean, self.m2 = count, np.asarray(mean, np.float64), np.asarray(m2, np.float64)
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * (count / total))
        self.count = total

    def mean_std(self) -> Tuple[List[float], List[float]]:
        if not self.count:
            raise DataError("no pixels to compute the image mean/std from: every image of the split is bad")
        return self.mean.tolist(), np.sqrt(self.m2 / self.count).tolist()


def image_mean_std(paths: Iterable[Path], channels: Optional[int] = 3, scale: Optional[float] = None,
                   skip_bad: bool = False) -> Tuple[List[float], List[float]]:
    """Per-channel mean and population std of ``x * scale`` over every pixel of the images at ``paths``.

    ``channels`` is ``model.in_channels`` (images are read as training reads them). Streaming: one
    image in memory at a time. With ``skip_bad`` an unreadable image is left out with a warning
    (``data.bad_samples: skip``); otherwise its :class:`DataError` propagates.
    """
    moments = Moments()
    for path in paths:
        try:
            image = read_image(path, channels)
            factor = value_scale(image.dtype, scale, path)
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"skipping a bad image (data.bad_samples='skip'): {error}", stacklevel=2)
            continue
        moments.add(image.reshape(-1, image.shape[2]).astype(np.float64) * factor)
    return moments.mean_std()
