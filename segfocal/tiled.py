"""Prediction of images of any size, tile by tile: windows read lazily, the mask written as it goes.

``segfocal predict`` sends here every Zarr image and every TIFF or ``.npy`` image above ``--max-pixels``.
The image is predicted with the sliding windows of slide mode (``eval.crop_size`` every ``eval.stride``
pixels, the last at the border, overlaps averaged: :func:`~segfocal.data.regions.sliding_windows` and
:func:`~segfocal.evaluation.inference.window_logits`, in the order slide mode adds them, so the mask equals
whole-image slide inference bit for bit), in square blocks of the mask: each block adds the logits of
every window touching it, each window read from the file alone (:mod:`segfocal.data.regions`), and a window
that straddles two blocks is computed for each (the blocks are aligned to the strides where they fit, so
with windows that do not overlap none does). Memory is bounded by one block's float32 logits
(``LOGITS_BYTES``, 256 MiB, or one window's if larger) and one band of the uint8 mask (the block's rows
across the image, 1 byte a pixel), never the image. ``eval.flip`` averages each window with its own mirror.

The mask goes to ``<stem>.tif``, a tiled (256 x 256), Deflate-compressed palette TIFF whose values are the
class indices (colours: the run's palette), or with ``--format zarr`` to ``<stem>.zarr``, a Zarr array in
256 x 256 chunks; either is written beside its final name and renamed onto it when complete.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

# Only the standard library at import: the command line imports this module to build its parser.

FORMATS = {"tiff": ".tif", "zarr": ".zarr"}
ALWAYS_TILED = (".zarr",)  # formats that are never read whole
TILED_ABOVE_LIMIT = (".tif", ".tiff", ".npy")  # formats read lazily when above --max-pixels
TILE = 256  # the output's tiles (TIFF) or chunks (Zarr)
LOGITS_BYTES = 2 ** 28  # the float32 logits of one block of the mask (256 MiB); a larger window takes more

Bands = Iterator["np.ndarray"]  # the mask's rows, a band [n, width] at a time, top to bottom


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``: the file a tiled prediction writes."""
    parser.add_argument("--format", choices=list(FORMATS), default="tiff",
                        help="mask file of an image predicted tile by tile (a Zarr image, or a TIFF or .npy image "
                             "above --max-pixels): <stem>.tif, a tiled palette TIFF, or <stem>.zarr (default: tiff)")


def is_tiled(path: Path, max_pixels: int) -> bool:
    """Whether ``path`` is predicted tile by tile: a Zarr image always, a TIFF or ``.npy`` above ``max_pixels``
    (0: no limit; read from the header). Other formats above the limit go to slide mode whole, as before."""
    from .data.regions import header_pixels

    suffix = path.suffix.lower()
    if suffix in ALWAYS_TILED:
        return True
    return suffix in TILED_ABOVE_LIMIT and bool(max_pixels) and header_pixels(path) > max_pixels


def mask_name(image: Path, fmt: str) -> str:
    return f"{image.stem}{FORMATS[fmt]}"


def predict_tiled(segmenter, path: Path, output: Path, fmt: str = "tiff", palette: Sequence[Sequence[int]] = ()) -> Path:
    """Predict ``path`` tile by tile with ``segmenter`` (a :class:`~segfocal.segmenter.Segmenter`); returns the
    mask's path. The image's header may claim up to ``data.patches.max_pixels`` pixels (else 2^36)."""
    from .data.regions import MAX_PIXELS, ImageRegion

    patches = segmenter.config.data.patches
    region = ImageRegion(path, segmenter.config.model.in_channels, patches.max_pixels if patches else MAX_PIXELS)
    height, width = region.shape
    target = output / mask_name(path, fmt)
    print(f"{path}: {width}x{height} pixels, predicting it tile by tile into {target}", file=sys.stderr)
    dtype = mask_dtype(segmenter.num_classes)
    bands = mask_bands(segmenter, region)
    first = next(bands)  # predicted before anything is created: an image that cannot be read leaves no trace
    output.mkdir(parents=True, exist_ok=True)
    bands = itertools.chain([first], bands)
    if fmt == "zarr":
        _write_zarr(target, bands, (height, width), dtype)
    else:
        _write_tiff(target, bands, (height, width), dtype, palette)
    return target


def mask_dtype(num_classes: int) -> type:
    import numpy as np

    return np.uint8 if num_classes <= 256 else np.uint16


def block_side(num_classes: int, crop: Sequence[int], stride: Sequence[int]) -> int:
    """The side of the square blocks the mask is computed in: as large as ``LOGITS_BYTES`` of float32 logits
    allow, a multiple of the output's tiles (and of the strides when that fits, so that windows do not straddle
    blocks), and at least one window: memory follows the classes and the window, never the image."""
    fits = int(math.sqrt(LOGITS_BYTES / (4 * num_classes)))
    unit = math.lcm(TILE, *stride)
    unit = unit if unit <= fits else TILE
    return max(fits // unit * unit, -(-max(crop) // TILE) * TILE, TILE)


def mask_bands(segmenter, region: ImageRegion) -> Bands:
    """The class-index mask of ``region``, one band of blocks at a time (see the module docstring); every band
    but the last is a whole number of output tiles high (the block side is)."""
    import numpy as np

    from .data.regions import sliding_windows

    ev = segmenter.config.eval
    crop, stride = tuple(ev.crop_size), tuple(ev.stride)
    height, width = region.shape
    tops, lefts = sliding_windows(height, crop[0], stride[0]), sliding_windows(width, crop[1], stride[1])
    side = block_side(segmenter.num_classes, crop, stride)
    dtype = mask_dtype(segmenter.num_classes)
    for top in range(0, height, side):
        bottom = min(top + side, height)
        band = np.empty((bottom - top, width), dtype=dtype)
        for left in range(0, width, side):
            right = min(left + side, width)
            rows, columns = _touching(tops, crop[0], top, bottom), _touching(lefts, crop[1], left, right)
            band[:, left:right] = _block_mask(segmenter, region, (top, bottom, left, right), rows, columns)
        yield band


def _touching(starts: List[int], crop: int, first: int, end: int) -> List[int]:
    """The window starts whose windows overlap ``[first, end)``, in order."""
    return [start for start in starts if start < end and start + crop > first]


def _block_mask(segmenter, region: ImageRegion, block: Tuple[int, int, int, int], tops: List[int],
                lefts: List[int]) -> "np.ndarray":
    """The mask of ``block`` (top, bottom, left, right): every window touching it, in slide mode's order, its
    logits added where they fall inside the block; then averaged, calibrated, argmax."""
    import torch

    from .data.errors import DataError
    from .evaluation.inference import window_logits

    ev, device, classes = segmenter.config.eval, segmenter.device, segmenter.num_classes
    crop = tuple(ev.crop_size)
    height, width = region.shape
    y0, y1, x0, x1 = block
    logits = torch.zeros((classes, y1 - y0, x1 - x0), dtype=torch.float32, device=device)
    count = torch.zeros((y1 - y0, x1 - x0), dtype=torch.float32, device=device)
    for top in tops:
        for left in lefts:
            bottom, right = min(top + crop[0], height), min(left + crop[1], width)
            window = segmenter.preprocess(region.read(top, bottom, left, right))
            if window.shape[-2:] != (bottom - top, right - left):
                raise DataError(f"{region.path}: augment.val changes a window's size ({bottom - top}x{right - left} to "
                                f"{tuple(window.shape[-2:])}); tiled prediction needs a size-preserving augment.val",
                                region.path)
            with torch.inference_mode(), segmenter.precision.autocast():
                out = window_logits(segmenter.model, window.unsqueeze(0).to(device), classes, crop,
                                    flip=segmenter.flip)[0]
            first_row, end_row, first_col, end_col = max(top, y0), min(bottom, y1), max(left, x0), min(right, x1)
            logits[:, first_row - y0:end_row - y0, first_col - x0:end_col - x0] += \
                out[:, first_row - top:end_row - top, first_col - left:end_col - left]
            count[first_row - y0:end_row - y0, first_col - x0:end_col - x0] += 1
    return segmenter.decided((logits / count)[None])[0].argmax(dim=0).cpu().numpy()


def _write_tiff(target: Path, bands: Bands, shape: Tuple[int, int], dtype: type,
                palette: Sequence[Sequence[int]]) -> None:
    import numpy as np
    import tifffile

    from .files import replaced_atomically

    def tiles() -> Iterator[np.ndarray]:  # row-major, each padded to TILE x TILE
        for band in bands:
            for top in range(0, len(band), TILE):
                padded = np.zeros((TILE, -(-shape[1] // TILE) * TILE), dtype=dtype)
                padded[:min(TILE, len(band) - top), :shape[1]] = band[top:top + TILE]
                for left in range(0, shape[1], TILE):
                    yield padded[:, left:left + TILE]

    options = {"photometric": "minisblack"}
    if dtype == np.uint8 and len(palette):
        colours = np.zeros((3, 256), dtype=np.uint16)
        colours[:, :len(palette)] = np.asarray(palette, dtype=np.uint16)[:256].T * 257
        options = {"photometric": "palette", "colormap": colours}
    with replaced_atomically(target) as handle:  # tifffile takes the open file with a name (its own is the fd)
        tifffile.imwrite(tifffile.FileHandle(handle, mode="wb", name=target.name), tiles(), shape=shape, dtype=dtype, tile=(TILE, TILE), compression="zlib",
                         bigtiff=shape[0] * shape[1] * np.dtype(dtype).itemsize > 2 ** 31, **options)


def _write_zarr(target: Path, bands: Bands, shape: Tuple[int, int], dtype: type) -> None:
    """A Zarr array written into a hidden folder beside ``target``, then swapped onto it (a file, folder or link
    there is replaced, never followed)."""
    from .data.regions import require_module

    zarr = require_module("zarr", target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        array = zarr.create_array(store=str(staging / "array.zarr"), shape=shape, chunks=(TILE, TILE), dtype=dtype,
                                  fill_value=0)
        top = 0
        for band in bands:
            array[top:top + len(band)] = band
            top += len(band)
        if target.is_symlink() or target.exists():
            os.replace(target, staging / "replaced")
        os.replace(staging / "array.zarr", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
