"""Regions of images and masks larger than memory, read without decoding the rest of the file.

:func:`open_region` opens a file for region reads with one interface, :class:`Region`: ``shape``
(height, width), ``channels``, ``dtype``, ``chunks`` (the rows and columns stored together, which a
read decodes whole) and ``read(y0, y1, x0, x1)``, an (h, w, channels) array of the file's own type.

* TIFF (``.tif``, ``.tiff``; BigTIFF, GeoTIFF, OME-TIFF): tifffile's Zarr store (``aszarr``) of the
  first series, pyramid level 0, opened with ``zarr``: a read decodes only the tiles (or strips) it
  touches. The axes are tifffile's: Y, X and at most one band axis of more than one element.
* Zarr (a ``.zarr`` folder): an (H, W) or (H, W, C) array, or an OME-Zarr image (its first multiscale
  level, axes by name: y, x, c, others of length 1).
* NumPy ``.npy``: memory-mapped (``numpy.load(mmap_mode="r")``), (H, W) or (H, W, C).
* Anything else :func:`~segfocal.data.images.read_image` or :func:`~segfocal.data.masks.read_mask`
  reads (PNG, JPEG, ...) is decoded whole at the first read and kept: fine for small files only.

A file is opened anew in every process that reads it (a DataLoader worker forked from the main
process must not share its file offset), so a :class:`Region` may be handed to workers.
Problems raise :class:`~segfocal.data.DataError` naming the file and the fix: a missing optional
package (``pip install "segfocal[large]"``), a header claiming more pixels than the limit, an axis
layout that is not an image.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DataError

# The most pixels a header may claim (2^36, 262144 x 262144); a corrupt or foreign header claiming more
# would make every size-proportional step (the class index, a tiled prediction) allocate without bound.
MAX_PIXELS = 2 ** 36
# Files above this many pixels are scored (segfocal eval --pred) block by block rather than read whole:
# what segfocal predict writes tile by tile by default (its --max-pixels).
WHOLE_READ_PIXELS = 2048 * 2048
# A crop that decodes more than this many times its own pixels (chunks much larger than the crop) warns.
WASTE_WARNING = 16
_INSTALL = 'pip install "segfocal[large]"'

PathLike = Union[str, Path]
Box = Tuple[int, int, int, int]  # y0, y1, x0, x1


class Region:
    """An image or mask file opened for region reads (see the module docstring)."""

    def __init__(self, path: PathLike, max_pixels: int = MAX_PIXELS) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        self._pid: Optional[int] = None
        self._array: Any = None
        self._closers: list = []
        self._open()
        height, width = self.shape
        if height * width > max_pixels:
            self.close()
            raise DataError(f"{self.path}: its header claims {width}x{height} = {height * width} pixels, more than "
                            f"the limit of {max_pixels} (data.patches.max_pixels); a corrupt or foreign file? If the "
                            f"image is real, raise data.patches.max_pixels", self.path)

    # -- what every format provides --------------------------------------------------------
    shape: Tuple[int, int]
    channels: int
    dtype: np.dtype
    chunks: Optional[Tuple[int, int]]  # None: memory-mapped or in memory, any region reads only itself

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1`` and columns ``x0:x1`` as an (h, w, channels) array in native byte order."""
        height, width = self.shape
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"{self.path}: region rows {y0}:{y1}, columns {x0}:{x1} outside its {width}x{height} pixels")
        try:
            array = np.asarray(self._read(self._opened(), y0, y1, x0, x1))
        except DataError:
            raise
        except Exception as error:  # a truncated chunk, a codec tifffile lacks (its message names imagecodecs), ...
            message = str(error).splitlines()[0] if str(error) else ""
            raise DataError(f"cannot read rows {y0}:{y1}, columns {x0}:{x1} of {self.path}: {type(error).__name__}: "
                            f"{message}", self.path) from None
        if array.ndim == 2:
            array = array[..., None]
        return array.astype(array.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers, self._array, self._pid = [], None, None

    # -- per format ------------------------------------------------------------------------
    def _open(self) -> None:
        """Open the file (in this process), setting ``_array`` and, the first time, the attributes above."""
        raise NotImplementedError

    def _read(self, array: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    # -- per process -----------------------------------------------------------------------
    def _opened(self) -> Any:
        if self._pid != os.getpid():
            self._closers, self._array = [], None  # a forked copy: the parent's handles are not ours to use
            self._open()
        return self._array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _array=None, _closers=[])
        return state

    def __repr__(self) -> str:
        height, width = self.shape
        return f"{type(self).__name__}({str(self.path)!r}, {width}x{height}x{self.channels} {self.dtype})"


class _AxesRegion(Region):
    """A region of a stored array whose axes are named by ``self.axes``: Y, X, C (the band) and 1 (length one)."""

    axes: str

    def _read(self, array: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        index = tuple({"Y": slice(y0, y1), "X": slice(x0, x1), "C": slice(None), "1": 0}[axis] for axis in self.axes)
        kept = [axis for axis in self.axes if axis != "1"]
        return np.transpose(array[index], [kept.index(axis) for axis in "YXC" if axis in kept])

    def _describe(self, shape: Sequence[int], axes: str, dtype: Any, chunks: Optional[Sequence[int]]) -> None:
        """Set the attributes from the stored array's ``shape`` and ``axes`` (Y, X, C, 1)."""
        self.axes = axes
        size = dict(zip(axes, shape))
        self.shape = (int(size["Y"]), int(size["X"]))
        self.channels = int(size.get("C", 1))
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.chunks = None if chunks is None else (int(chunks[axes.index("Y")]), int(chunks[axes.index("X")]))
        if 0 in self.shape or self.channels == 0 or self.dtype.kind not in "uifb":
            raise DataError(f"{self.path}: expected an image of numbers, got {self.dtype} of shape "
                            f"{tuple(shape)}", self.path)


class TiffRegion(_AxesRegion):
    """A TIFF's first series (pyramid level 0) through tifffile's Zarr store."""

    def _open(self) -> None:
        tifffile, zarr = require_module("tifffile", self.path), require_module("zarr", self.path)
        try:
            tiff = tifffile.TiffFile(self.path)
        except (OSError, ValueError) as error:  # TiffFileError is a ValueError since tifffile 2025.9.20
            raise DataError(f"cannot read image {self.path}: {error}", self.path) from None
        self._closers.append(tiff.close)
        if not tiff.series:
            raise DataError(f"cannot read image {self.path}: tifffile finds no image in this TIFF", self.path)
        series = tiff.series[0]
        _check_chunk_count(series, self.path)
        store = series.aszarr(level=0)
        self._closers.append(store.close)
        self._array = zarr.open(store, mode="r")
        self._pid = os.getpid()
        if not hasattr(self, "axes"):
            self._describe(series.shape, _tiff_axes(series.axes, series.shape, self.path), series.dtype,
                           self._array.chunks)


class ZarrRegion(_AxesRegion):
    """A Zarr array, or the first level of an OME-Zarr image."""

    def _open(self) -> None:
        zarr = require_module("zarr", self.path)
        try:
            node = zarr.open(str(self.path), mode="r")
        except Exception as error:  # zarr raises several types for a folder that is not a store
            raise DataError(f"cannot read {self.path} as Zarr: {type(error).__name__}: {error}", self.path) from None
        axes = None
        if isinstance(node, zarr.Group):
            node, axes = _ome_level(node, self.path)
        self._array = node
        self._pid = os.getpid()
        if not hasattr(self, "axes"):
            axes = axes or _plain_axes(node.shape, self.path)
            self._describe(node.shape, axes, node.dtype, node.chunks)


class NpyRegion(_AxesRegion):
    """A memory-mapped ``.npy`` array: a region reads the pages it covers only."""

    def _open(self) -> None:
        try:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {self.path}: {error}", self.path) from None
        self._pid = os.getpid()
        if not hasattr(self, "axes"):
            self._describe(self._array.shape, _plain_axes(self._array.shape, self.path), self._array.dtype, None)


class DecodedRegion(Region):
    """A file of another format, decoded whole by ``decode`` (its first read, in each process) and kept."""

    def __init__(self, path: PathLike, decode: Callable[[Path], np.ndarray], max_pixels: int = MAX_PIXELS) -> None:
        self.decode = decode
        super().__init__(path, max_pixels)

    def _open(self) -> None:
        array = self.decode(self.path)
        self._array = array if array.ndim == 3 else array[..., None]
        self._pid = os.getpid()
        self.shape = self._array.shape[:2]
        self.channels = self._array.shape[2]
        self.dtype = self._array.dtype
        self.chunks = None

    def _read(self, array: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return array[y0:y1, x0:x1]

    def __getstate__(self) -> dict:
        return dict(self.__dict__)  # the decoded pixels travel: nothing to reopen


def sliding_windows(size: int, crop: int, stride: int) -> List[int]:
    """Start offsets of windows of length ``crop`` every ``stride`` covering ``[0, size)``, the last at the end."""
    if size <= crop:
        return [0]
    count = -(-(size - crop) // stride) + 1  # ceil
    return [min(index * stride, size - crop) for index in range(count)]


def open_region(path: PathLike, decode: Callable[[Path], np.ndarray], max_pixels: int = MAX_PIXELS) -> Region:
    """``path`` opened for region reads: lazily for TIFF, Zarr and ``.npy``, else through ``decode`` (e.g.
    :func:`~segfocal.data.images.read_image`), whole."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tif", ".tiff"):
        return TiffRegion(path, max_pixels)
    if suffix == ".zarr":
        return ZarrRegion(path, max_pixels)
    if suffix == ".npy":
        return NpyRegion(path, max_pixels)
    return DecodedRegion(path, decode, max_pixels)


class ImageRegion:
    """An image file's regions as the model takes them: ``channels`` (``model.in_channels``) channels of its own
    type, 8-bit grey repeated and 8-bit alpha dropped for a 3-channel model, as whole-image reading does."""

    def __init__(self, path: PathLike, channels: Optional[int], max_pixels: int = MAX_PIXELS) -> None:
        from .images import check_channels, read_image

        self.region = open_region(path, lambda file: read_image(file, channels), max_pixels)
        self.path, self.shape, self.chunks, self.dtype = self.region.path, self.region.shape, self.region.chunks, self.region.dtype
        stored = self.region.channels
        self._grey_to_rgb = channels == 3 and stored == 1 and self.dtype == np.uint8
        self._drop_alpha = channels == 3 and stored == 4 and self.dtype == np.uint8
        check_channels(self.path, 3 if self._grey_to_rgb or self._drop_alpha else stored, channels)
        self.channels = stored if channels is None else channels

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        array = self.region.read(y0, y1, x0, x1)
        if self._grey_to_rgb:
            return np.repeat(array, 3, axis=2)
        return array[..., :3] if self._drop_alpha else array


class MaskRegion:
    """A mask file's regions as (h, w) stored label values: one band as it is, RGB(A) through ``color_map``
    (or its grey value), as :func:`~segfocal.data.masks.read_mask` reads whole masks."""

    def __init__(self, path: PathLike, color_map: Optional[Sequence[Sequence[int]]] = None,
                 max_pixels: int = MAX_PIXELS) -> None:
        from .masks import read_mask

        self.region = open_region(path, lambda file: read_mask(file, color_map), max_pixels)
        self.path, self.shape, self.chunks, self.dtype = self.region.path, self.region.shape, self.region.chunks, self.region.dtype
        self.color_map = color_map
        if self.region.channels not in (1, 3, 4) or self.dtype.kind not in "uib":
            raise DataError(f"{self.path}: a mask must hold one band of integer labels (or RGB colours), got "
                            f"{self.region.channels} bands of {self.dtype}", self.path)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from .masks import colour_mask_classes

        array = self.region.read(y0, y1, x0, x1)
        if array.shape[2] == 1:
            return array[..., 0]
        return colour_mask_classes(array, self.color_map, self.path)


def header_pixels(path: PathLike) -> int:
    """Height x width of a TIFF (its first series, by tifffile) or ``.npy`` file, from the header alone (PIL would
    refuse to open an image of more than 179 million pixels as a decompression bomb)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return int(np.prod(shape[:2]))
        tifffile = require_module("tifffile", path)
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            return int(np.prod([length for axis, length in zip(series.axes, series.shape) if axis in "YX"]))
    except (OSError, ValueError, IndexError) as error:
        raise DataError(f"cannot read image {path}: {error}", path) from None


def read_in_blocks(path: PathLike) -> bool:
    """Whether a whole-image pass over ``path`` should go block by block: a Zarr or ``.npy`` file, or a TIFF of
    more than :data:`WHOLE_READ_PIXELS` pixels (by its header)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".zarr", ".npy"):
        return True
    return suffix in (".tif", ".tiff") and header_pixels(path) > WHOLE_READ_PIXELS


def blocks(region: Union[Region, ImageRegion, MaskRegion], pixels: int = 2 ** 22) -> Iterator[Box]:
    """Boxes ``(y0, y1, x0, x1)`` that tile ``region`` in reading order, aligned to its chunks, each about
    ``pixels`` pixels (at least one chunk): the pieces in which a whole image is scanned."""
    height, width = region.shape
    rows, cols = region.chunks or (1, width)
    cols = min(width, cols * max(1, math.isqrt(pixels) // cols))
    rows = min(height, rows * max(1, pixels // (cols * rows)))
    for y0 in range(0, height, rows):
        for x0 in range(0, width, cols):
            yield y0, min(y0 + rows, height), x0, min(x0 + cols, width)


def check_chunking(region: Union[Region, ImageRegion, MaskRegion], crop: Sequence[int]) -> None:
    """Warn, with the chunk shape, when a ``crop`` (height, width) decodes over :data:`WASTE_WARNING` times its
    pixels because the file's chunks are much larger than the crop (a striped or untiled TIFF, a Zarr array in
    a few large chunks)."""
    if region.chunks is None:
        return
    read = [min(size, (-(-(length - 1) // chunk) + 1) * chunk)  # the chunks a crop spans at worst
            for size, length, chunk in zip(region.shape, crop, region.chunks)]
    ratio = read[0] * read[1] / (crop[0] * crop[1])
    if ratio > WASTE_WARNING:
        warnings.warn(f"{region.path}: stored in chunks of {region.chunks[0]}x{region.chunks[1]} pixels (rows x "
                      f"columns), so each {crop[0]}x{crop[1]} crop decodes about {read[0]}x{read[1]} pixels ({ratio:.0f}x "
                      f"the crop); store it tiled for fast crops, e.g. tifffile.imwrite(path, image, tile=(256, 256)) "
                      f"or a Zarr array with chunks of 256x256", stacklevel=2)


# -- helpers ---------------------------------------------------------------------------------

def require_module(module: str, path: Path) -> Any:
    """``import module``, or a DataError naming ``path`` and the install command."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"{path}: reading it in regions needs the '{module}' package, which is not installed: "
                        f"{_INSTALL}", path) from None


def _check_chunk_count(series: Any, path: Path) -> None:
    """``DataError`` naming ``path`` unless each page of ``series`` lists the tiles or strips its header's size
    needs: a header edited or damaged to claim a larger image would read as zeros, or scan for hours."""
    for page in series.pages:
        if page is None:
            continue
        needed, listed = int(np.prod(page.keyframe.chunked)), len(page.dataoffsets)
        if listed != needed:
            raise DataError(f"cannot read image {path}: its header gives {page.keyframe.imagewidth}x"
                            f"{page.keyframe.imagelength} pixels, which take {needed} tiles or strips, but it lists "
                            f"{listed}: a corrupt or edited file", path)


def _tiff_axes(axes: str, shape: Sequence[int], path: Path) -> str:
    """tifffile's series ``axes`` as Y, X, C (the one band axis of more than one element) and 1 (length one)."""
    named = "".join(axis if axis in "YX" else ("1" if length == 1 else "C") for axis, length in zip(axes, shape))
    if sorted(named.replace("1", "")) not in (["X", "Y"], ["C", "X", "Y"]):
        raise DataError(f"{path}: this TIFF holds a {'x'.join(map(str, shape))} {axes} image (tifffile axes); "
                        f"expected Y, X and at most one band axis", path)
    return named


def _plain_axes(shape: Sequence[int], path: Path) -> str:
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: expected an (H, W) or (H, W, C) array, got shape {tuple(shape)}", path)
    return "YXC"[:len(shape)]


def _ome_level(group: Any, path: Path) -> Tuple[Any, str]:
    """The first multiscale level of an OME-Zarr image group (v0.4 ``multiscales`` or v0.5 ``ome``) and its axes."""
    attributes = dict(group.attrs)
    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not multiscales:
        raise DataError(f"{path}: a Zarr group without OME-Zarr multiscales metadata; point to the array itself "
                        f"(e.g. {path}/0) or store the image as one (H, W) or (H, W, C) array", path)
    scale = multiscales[0]
    level = group[scale["datasets"][0]["path"]]
    names = [axis["name"] if isinstance(axis, dict) else axis for axis in scale.get("axes", [])] or list("tczyx")[-level.ndim:]
    axes = ""
    for name, length in zip(names, level.shape):
        axes += {"y": "Y", "x": "X", "c": "C"}.get(name.lower(), "1" if length == 1 else "?")
    if "?" in axes or sorted(axes.replace("1", "")) not in (["X", "Y"], ["C", "X", "Y"]):
        raise DataError(f"{path}: OME-Zarr axes {names} of shape {tuple(level.shape)}; expected y, x, at most a "
                        f"channel axis c, and others of length 1", path)
    return level, axes
