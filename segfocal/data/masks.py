"""Reading label masks as class-index arrays, checking their values, and writing palette PNGs.

Masks are read with PIL, never cv2: cv2 would turn a palette ("P" mode) PNG into the RGB colours
of its palette, and the class indices would be lost.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .errors import DataError
from ..text import counted

PathLike = Union[str, Path]


def _candidates() -> np.ndarray:
    """The colours the default palette picks from: an sRGB grid in steps of 17 (#rgb shorthand colours)
    whose HSV saturation and value are at least 0.5, so that each stays a colour when blended over grey."""
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 17)] * 3, indexing="ij"), -1).reshape(-1, 3)
    high, low = grid.max(1), grid.min(1)
    return grid[(high - low >= 0.5 * high) & (high >= 0.5 * 255)]


_CANDIDATES = _candidates()
# Greys from black to white, the colours of grey (e.g. electron-microscopy) images, that the palette keeps away from.
_GREYS = np.array([[g, g, g] for g in [*range(0, 256, 32), 255]])


def read_mask(path: PathLike, color_map: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """The mask at ``path`` as an (H, W) integer array of class indices.

    Grey/index PNGs (8 or 16 bit) give their values as they are; palette PNGs give palette
    indices (``color_map`` is not used for them); RGB masks need ``color_map`` (``color_map[i]``
    is the [r, g, b] of class ``i``) unless their three channels are equal. A colour outside
    ``color_map`` raises :class:`DataError` naming the file and up to five of the colours.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)  # a writable copy
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read mask {path}: {error}", path) from None
    if mode in ("L", "P", "I;16", "I;16L", "I;16B", "I"):
        return array.astype(array.dtype.newbyteorder("="), copy=False)  # torch needs native byte order
    if mode == "1":
        return array.astype(np.uint8)
    if mode in ("LA", "PA"):
        return array[..., 0]
    if mode in ("RGB", "RGBA"):
        return colour_mask_classes(array, color_map, path)
    raise DataError(f"{path}: unsupported mask image mode {mode!r}; expected grey, palette or RGB", path)


def colour_mask_classes(array: np.ndarray, color_map: Optional[Sequence[Sequence[int]]], path: PathLike) -> np.ndarray:
    """(H, W) classes of an (H, W, 3 or 4) RGB(A) mask: by ``color_map``, else its grey value if its three
    channels are equal; coloured pixels without a ``color_map`` raise DataError naming ``path``."""
    rgb = array[..., :3]
    if color_map is not None:
        return rgb_to_classes(rgb, color_map, path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    raise DataError(f"{path}: RGB mask with coloured pixels; set data.color_map to map colours to classes", path)


def rgb_to_classes(rgb: np.ndarray, color_map: Sequence[Sequence[int]], path: PathLike) -> np.ndarray:
    """(H, W, 3) colours → (H, W) class indices by ``color_map``; unknown colours raise DataError."""
    table = np.asarray(color_map, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0:
        raise DataError(f"{path}: data.color_map must be a list of [r, g, b] colours, got {color_map!r}", path)
    keys = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    if len(np.unique(keys)) != len(keys):
        raise DataError(f"{path}: data.color_map lists a colour twice: {color_map!r}", path)
    rgb = rgb.astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    position = np.clip(np.searchsorted(sorted_keys, codes), 0, len(keys) - 1)
    known = sorted_keys[position] == codes
    if not known.all():
        unknown = np.unique(codes[~known])
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5].tolist())
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise DataError(f"{path}: {counted(int((~known).sum()), 'pixel', 'has/have')} colours not in data.color_map: "
                        f"{shown}{more}", path)
    dtype = np.uint8 if len(keys) <= 256 else np.int32
    return order[position].astype(dtype)


def class_histogram(labels: np.ndarray, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """Pixels per class (int64 ``[num_classes]``) of ``labels``; values outside ``0..num_classes-1`` and
    ``ignore_index`` (which may lie inside that range) are not counted."""
    values = labels.ravel()
    values = values[(values >= 0) & (values < num_classes)].astype(np.intp)
    counts = np.bincount(values, minlength=num_classes)[:num_classes].astype(np.int64)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        counts[ignore_index] = 0
    return counts


def add_value_counts(totals: dict, mask: np.ndarray) -> None:
    """Add the pixels per value of ``mask`` to ``totals`` (value → pixels)."""
    values, pixels = np.unique(mask, return_counts=True)
    for value, count in zip(values.tolist(), pixels.tolist()):
        totals[value] = totals.get(value, 0) + count


def check_mask_values(mask: np.ndarray, path: PathLike, num_classes: int, ignore_index: int) -> None:
    """Raise :class:`DataError` naming ``path`` and the bad values unless every label is a class or ignore."""
    if mask.size == 0 or (int(mask.min()) >= 0 and int(mask.max()) < num_classes):
        return
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(v) for v in values[:10].tolist()) + (" ..." if len(values) > 10 else "")
        raise DataError(
            f"{path}: {counted(int(bad.sum()), 'pixel', 'has/have')} label values [{shown}] outside "
            f"0..{num_classes - 1} that are not ignore_index={ignore_index}", path
        )


def default_palette(num_classes: int) -> List[List[int]]:
    """``num_classes`` [r, g, b] colours, each far from the others and from grey.

    Glasbey et al.'s construction (Colour displays for categorical images, 2007; ImageJ's "glasbey"
    table): each colour is the candidate farthest in CIELAB from the greys and the colours before it,
    so the first colours are the most distinct (blue, green, red, pink, yellow, ...) and a palette is
    a prefix of any longer one. Deterministic; up to 2820 classes (the candidates).
    """
    if not 0 <= num_classes <= len(_CANDIDATES):
        raise ValueError(f"default_palette makes 0..{len(_CANDIDATES)} colours, not {num_classes}; "
                         f"list the colours in data.palette")
    return [list(colour) for colour in _glasbey(num_classes)]


@functools.lru_cache(maxsize=None)
def _glasbey(count: int) -> Tuple[Tuple[int, ...], ...]:
    """The first ``count`` colours of the farthest-point sequence over the candidates."""
    lab = _srgb_to_lab(_CANDIDATES)
    nearest = ((lab[:, None] - _srgb_to_lab(_GREYS)[None]) ** 2).sum(-1).min(1)  # squared distance to the closest
    chosen = []
    for _ in range(count):
        best = int(nearest.argmax())
        chosen.append(tuple(int(v) for v in _CANDIDATES[best]))
        nearest = np.minimum(nearest, ((lab - lab[best]) ** 2).sum(-1))
    return tuple(chosen)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) 8-bit sRGB → CIELAB (D65), float64."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def write_palette_mask(path: Union[PathLike, BinaryIO], mask: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """Save an (H, W) class-index mask (values 0..255) as a palette PNG coloured by ``palette``.

    ``path`` is a file name or a binary file object (e.g. a temporary file to rename into place).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise ValueError(f"a palette PNG holds indices 0..255; mask values span {mask.min()}..{mask.max()}")
    flat = [int(channel) for colour in list(palette)[:256] for channel in colour]
    image = Image.fromarray(mask.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path, format="PNG")
