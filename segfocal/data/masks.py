"""Reading label masks as class-index arrays, checking their values, and writing palette PNGs.

Masks are read with PIL, never cv2: cv2 would turn a palette ("P" mode) PNG into the RGB colours
of its palette, and the class indices would be lost.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .errors import DataError

PathLike = Union[str, Path]

# CamVid's 11 classes + Void, the colours SegNet's tutorial uses; more classes get generated colours.
_CAMVID_COLOURS = [
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0],
]


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
        rgb = array[..., :3]
        if color_map is not None:
            return rgb_to_classes(rgb, color_map, path)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        raise DataError(f"{path}: RGB mask with coloured pixels; set data.color_map to map colours to classes", path)
    raise DataError(f"{path}: unsupported mask image mode {mode!r}; expected grey, palette or RGB", path)


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
        raise DataError(f"{path}: {int((~known).sum())} pixels have colours not in data.color_map: {shown}{more}", path)
    dtype = np.uint8 if len(keys) <= 256 else np.int32
    return order[position].astype(dtype)


def check_mask_values(mask: np.ndarray, path: PathLike, num_classes: int, ignore_index: int) -> None:
    """Raise :class:`DataError` naming ``path`` and the bad values unless every label is a class or ignore."""
    if mask.size == 0 or (int(mask.min()) >= 0 and int(mask.max()) < num_classes):
        return
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(v) for v in values[:10].tolist()) + (" ..." if len(values) > 10 else "")
        raise DataError(
            f"{path}: {int(bad.sum())} pixels have label values [{shown}] outside 0..{num_classes - 1} "
            f"that are not ignore_index={ignore_index}", path
        )


def default_palette(num_classes: int) -> List[List[int]]:
    """``num_classes`` distinct [r, g, b] colours: CamVid's first, then evenly spread hues."""
    colours = [list(c) for c in _CAMVID_COLOURS[:num_classes]]
    extra = num_classes - len(colours)
    for index in range(extra):
        hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours apart
        colours.append(_hsv_to_rgb(hue, 0.75 if index % 2 else 0.95, 0.95 if index % 3 else 0.7))
    return colours


def _hsv_to_rgb(h: float, s: float, v: float) -> List[int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return [round(r * 255), round(g * 255), round(b * 255)]


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
