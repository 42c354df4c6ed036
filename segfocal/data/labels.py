"""Stored mask values to train ids: ``data.label_map`` and ``data.reduce_zero_label``, applied once per read mask.

Datasets rarely store train ids: Cityscapes stores its 34 ``labelIds`` of which 19 are trained,
ADE20K stores 0 for "other" and its 150 classes as 1..150. :class:`LabelRemap` turns such values
into ``0..num_classes-1`` or the ignore label with one table lookup.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np


class LabelRemap:
    """``label_map`` (stored value → train id; values it does not list → ``ignore_index``) or
    ``reduce_zero_label`` (0 → ``ignore_index``, v → v - 1; a stored ``ignore_index`` stays ignored,
    as in mmsegmentation). Neither: masks are returned unchanged.
    """

    def __init__(self, label_map: Optional[Mapping[int, int]], reduce_zero_label: bool, ignore_index: int) -> None:
        self.label_map = dict(label_map) if label_map else None
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index

    @property
    def active(self) -> bool:
        return self.label_map is not None or self.reduce_zero_label

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if not self.active or mask.size == 0:
            return mask
        top = int(mask.max())
        if self.label_map is not None:
            table = np.full(max(top, *self.label_map) + 1, self.ignore_index, dtype=np.int64)
            table[list(self.label_map)] = list(self.label_map.values())
        else:
            table = np.arange(-1, top, dtype=np.int64)
            table[0] = self.ignore_index
            if self.ignore_index <= top:
                table[self.ignore_index] = self.ignore_index
        table = table.astype(np.uint8 if 0 <= table.min() and table.max() <= 255 else np.int32)
        if int(mask.min()) >= 0:
            return table[mask]
        remapped = table[np.clip(mask, 0, None)]  # a signed (32-bit "I") mask: negative values are ignored
        remapped[mask < 0] = self.ignore_index
        return remapped
