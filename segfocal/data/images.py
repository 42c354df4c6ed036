"""Images of any channel count and bit depth as (H, W, C) arrays, and their scaling for the pipeline.

PIL reads PNG, JPEG, BMP, WebP and TIFF (8-bit, 16-bit ``I;16``, 32-bit ``I`` and float ``F`` modes); a
multi-page TIFF of single-band pages is read as one image with a channel per page. A TIFF whose page
holds bands PIL cannot read in full (several 16-bit or float bands, as GIS tools write 4-band or
multispectral imagery) is read by tifffile, its band axis last. NumPy ``.npy`` files hold (H, W) or
(H, W, C) arrays. Values keep their type: nothing is clipped to 8 bits.

Every decoder has one pixel limit, :func:`pixel_limit` (PIL's decompression-bomb limit): an image whose
header claims more pixels, or (for tifffile, ``.npy`` and multi-page TIFFs, whose headers tell it)
another channel count than the model's, is refused from its header, before anything is decoded.

For a 3-channel model (``channels=3``), 8-bit images are converted to RGB as before (grey
repeated, palette colours looked up, alpha dropped), so RGB datasets load exactly as they did.

albumentations takes uint8 images (0..255) and float32 images (0..1 by its pixel-level
transforms' convention), nothing else. :func:`pipeline_image` therefore leaves uint8 images as
they are (``Normalize``'s ``max_pixel_value`` is then ``1 / scale``) and turns any other image into
float32 ``value * scale``; ``scale`` (``data.scale``) defaults to the type's full range:
1/255 for uint8, 1/65535 for uint16, 1 for float.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageMode, ImageSequence
from PIL.TiffImagePlugin import BITSPERSAMPLE, SAMPLESPERPIXEL

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy")
DEFAULT_SCALES = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535}
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_EIGHT_BIT = ("|u1", "|b1")
# 8-bit modes read as other modes when the channels are kept: bits as grey, palettes as their colours
_KEPT_AS = {"1": "L", "P": "RGB", "PA": "RGBA"}

PathLike = Union[str, Path]

# PIL logs an error for every TIFF page of more than 6 bands it gives up on (to stderr when logging is not
# set up): tifffile reads those, so the message would repeat for every image of a multispectral dataset
logging.getLogger("PIL.TiffImagePlugin").addFilter(
    lambda record: not record.getMessage().startswith("More samples per pixel than can be decoded"))


def read_image(path: PathLike, channels: Optional[int] = 3) -> np.ndarray:
    """The image at ``path`` as an (H, W, C) array of its own type.

    ``channels`` is the model's ``in_channels``: an image with another channel count raises
    :class:`DataError` naming the file and both counts (``None``: any count). Unreadable files
    raise DataError too.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            _check_npy_header(path, channels)
            array = _hwc(np.load(path, allow_pickle=False), path)
        else:
            image = _open(path)
            if image is None:
                array = _tiff_series(path, channels, decode=True)
            else:
                with image:
                    array = pil_array(image, channels, path)
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
    check_channels(path, array.shape[2], channels)
    return array.astype(array.dtype.newbyteorder("="), copy=False)  # torch needs native byte order


def check_image(path: PathLike, decode: bool = False, channels: Optional[int] = 3) -> Tuple[int, int]:
    """(height, width) of the image at ``path``, raising DataError for an image unfit to load.

    By default only the header is read: that catches a missing or unrecognised file and a wrong
    channel count, but not truncated or corrupt pixel data, which ``decode=True`` catches by
    decoding every pixel.
    """
    path = Path(path)
    if decode:
        return read_image(path, channels).shape[:2]
    try:
        if path.suffix.lower() == ".npy":
            _check_npy_header(path, channels)
            array = _hwc(np.load(path, mmap_mode="r", allow_pickle=False), path)  # the header only
            height, width, count = array.shape
        else:
            image = _open(path)
            if image is None:
                height, width, count = _tiff_series(path, channels, decode=False).shape
            else:
                with image:
                    (width, height), count = image.size, _channel_count(image, channels)
                    if _is_multipage(image):
                        _check_pages(image, channels, path)
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
    check_channels(path, count, channels)
    return height, width


def check_channels(path: PathLike, count: int, channels: Optional[int]) -> None:
    """Raise DataError naming ``path`` unless the image's ``count`` channels are the model's ``channels``."""
    if channels is not None and count != channels:
        raise DataError(f"{path}: the image has {count} channel{'s' * (count != 1)} but model.in_channels="
                        f"{channels} (and data.mean/data.std have {channels} values); every image must have "
                        f"model.in_channels channels", path)


def pixel_limit() -> Optional[int]:
    """The most pixels (height x width) an image may have: twice ``PIL.Image.MAX_IMAGE_PIXELS``, where PIL
    refuses to open an image as a decompression bomb (it warns from once), for every decoder alike.
    Read at each call, so a program that sets PIL's limit sets this one; None (PIL's None): no limit."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_pixels(path: PathLike, height: int, width: int) -> None:
    """Raise DataError naming ``path`` and its claimed size if ``height x width`` exceeds :func:`pixel_limit`."""
    limit = pixel_limit()
    if limit is not None and height * width > limit:
        raise DataError(f"{path}: its header claims a {width}x{height} image ({height * width} pixels), more than "
                        f"the {limit} pixels an image may have (twice PIL.Image.MAX_IMAGE_PIXELS, PIL's guard "
                        f"against decompression bombs); nothing was decoded. Cut an image this large into tiles", path)


def pipeline_image(image: np.ndarray, scale: Optional[float], path: PathLike = "image") -> np.ndarray:
    """``image`` as albumentations takes it: uint8 as it is, anything else float32 ``value * scale``."""
    if image.dtype == np.uint8:
        return image
    return image.astype(np.float32) * np.float32(value_scale(image.dtype, scale, path))


def value_scale(dtype: np.dtype, scale: Optional[float], path: PathLike = "image") -> float:
    """The factor from stored values to the units of ``data.mean``/``data.std``: ``scale`` (``data.scale``)
    or, when None, the type's full range; a type without one (e.g. int32) raises DataError naming
    ``path`` and ``data.scale``."""
    if scale is not None:
        return scale
    if dtype.kind == "f":
        return 1.0
    if dtype not in DEFAULT_SCALES:
        raise DataError(f"{path}: {dtype} image values have no default scale; set data.scale (the factor that "
                        f"brings them to the units of data.mean/data.std)", path)
    return DEFAULT_SCALES[dtype]


def uint8_max_pixel_value(scale: Optional[float]) -> float:
    """``Normalize``'s ``max_pixel_value`` for uint8 images: 255 by default, else ``1 / data.scale``."""
    return 255.0 if scale is None else 1.0 / scale


def pil_array(image: Image.Image, channels: Optional[int], path: PathLike = "PIL image") -> np.ndarray:
    """The (H, W, C) array :func:`read_image` makes of an open PIL ``image`` (channels checked only where
    they are pages, before those are decoded)."""
    if _is_multipage(image):
        return _pages(image, channels, path)
    if ImageMode.getmode(image.mode).typestr in _EIGHT_BIT:
        if channels == 3:
            return np.array(image.convert("RGB"))
        if image.mode in _KEPT_AS:
            image = image.convert(_KEPT_AS[image.mode])
    return _hwc(np.array(image), path)


def _unreadable(path: Path, error: Exception) -> DataError:
    """The DataError for a file PIL, tifffile or NumPy cannot read."""
    return DataError(f"cannot read image {path}: {error}", path)


def _open(path: Path) -> Optional[Image.Image]:
    """``path`` opened by PIL, or None for a TIFF whose pixels PIL cannot read in full: tifffile reads those.

    PIL reads TIFF pages of one band (at any depth it knows) and of 8-bit bands it has a mode for (RGB,
    RGBA, CMYK); it cannot identify most pages of several 16-bit or float bands, and it misreads others
    (planar 16-bit bands as one, 16-bit RGB as 8-bit, 2 bands as grey), which its tags tell apart. Only
    those go to tifffile: the TIFFs PIL reads keep its conversions (palettes, RGB for 3-channel models),
    its multi-page reading and its codecs (tifffile decodes LZW and JPEG only with imagecodecs).
    """
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError:
        if path.suffix.lower() in (".tif", ".tiff"):
            return None
        raise
    if image.format == "TIFF":
        samples = image.tag_v2.get(SAMPLESPERPIXEL, 1)
        if samples > 1 and (samples != len(image.getbands()) or image.tag_v2.get(BITSPERSAMPLE) != (8,) * samples):
            image.close()
            return None
    return image


def _tiff_series(path: Path, channels: Optional[int], decode: bool) -> np.ndarray:
    """The TIFF at ``path`` read by tifffile as (H, W, C): its first series' Y and X axes, then its other axis
    (samples, contiguous or planar, or pages) as channels; with ``decode=False`` the header only, as a
    read-only stand-in of the image's shape and type that holds no pixels. The size and channel count
    (``channels``: the model's) are checked from the header first."""
    try:
        import tifffile
    except ImportError:
        raise DataError(f"cannot read image {path}: PIL cannot read this TIFF in full (several 16-bit or float "
                        f"bands in one page?) and tifffile, which reads it, is not installed: pip install tifffile",
                        path) from None
    try:
        with tifffile.TiffFile(path) as tiff:
            if not tiff.series:
                raise DataError(f"cannot read image {path}: tifffile finds no image in this TIFF", path)
            series = tiff.series[0]
            axes = series.axes
            bands = [index for index, axis in enumerate(axes) if axis not in "YX"]
            if len(bands) > 1 or len(axes) - len(bands) != 2:
                raise DataError(f"{path}: this TIFF holds a {'x'.join(map(str, series.shape))} {axes} image (tifffile "
                                f"axes); expected Y, X and at most one band axis", path)
            order = [axes.index("Y"), axes.index("X"), *bands]
            shape = [series.shape[index] for index in order]
            _check_header(path, shape, channels)
            if decode:
                array = np.ascontiguousarray(series.asarray().transpose(order))
            else:
                array = np.broadcast_to(np.zeros((), series.dtype), shape)
    except tifffile.TiffFileError as error:  # a ValueError only since tifffile 2025.9.20
        raise _unreadable(path, error) from None
    return _hwc(array, path)


def _pages(image: Image.Image, channels: Optional[int], path: Path) -> np.ndarray:
    """The pages of a multi-page TIFF stacked as channels; each page must be one band of one size and type.

    The pages' headers are checked (:func:`_check_pages`) before any page is decoded."""
    _check_pages(image, channels, path)
    pages = []
    for number, page in enumerate(ImageSequence.Iterator(image)):
        array = np.array(page)
        if array.ndim != 2 or (pages and (array.shape, array.dtype) != (pages[0].shape, pages[0].dtype)):
            raise DataError(f"{path}: page {number} of this multi-page TIFF is {page.mode} {page.size[0]}x"
                            f"{page.size[1]}; pages are read as channels, so each must be a single band of "
                            f"the first page's size and type", path)
        pages.append(array)
    return np.stack(pages, axis=-1)


def _check_pages(image: Image.Image, channels: Optional[int], path: Path) -> None:
    """Check a multi-page TIFF's page count against ``channels`` (the model's) and each page's size against
    :func:`pixel_limit`, from the headers: PIL checks only the first page's size when it opens the file."""
    check_channels(path, image.n_frames, channels)
    for page in ImageSequence.Iterator(image):
        check_pixels(path, page.size[1], page.size[0])


def _check_npy_header(path: Path, channels: Optional[int]) -> None:
    """Check the shape an ``.npy`` file's header declares (:func:`_check_header`) without reading its data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)  # 3.0 differs from 2.0 only in the header's text encoding
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    _check_header(path, _hwc(np.broadcast_to(np.zeros((), dtype), shape), path).shape, channels)  # holds no pixels


def _check_header(path: Path, shape, channels: Optional[int]) -> None:
    """Raise DataError unless the (H, W) or (H, W, C) ``shape`` a header claims has at most :func:`pixel_limit`
    pixels and ``channels`` channels (None: any count)."""
    check_pixels(path, shape[0], shape[1])
    check_channels(path, shape[2] if len(shape) > 2 else 1, channels)


def _channel_count(image: Image.Image, channels: Optional[int]) -> int:
    """How many channels :func:`read_image` gives ``image``, from its header."""
    if _is_multipage(image):
        return image.n_frames
    if ImageMode.getmode(image.mode).typestr in _EIGHT_BIT and channels == 3:
        return 3
    return len(ImageMode.getmode(_KEPT_AS.get(image.mode, image.mode)).bands)


def _is_multipage(image: Image.Image) -> bool:
    """Whether ``image`` is a TIFF of several pages, read as one channel per page."""
    return image.format == "TIFF" and getattr(image, "n_frames", 1) > 1


def _hwc(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` as (H, W, C): an (H, W) one gets a channel axis; other shapes raise DataError."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape or array.dtype.kind not in "uif":
        raise DataError(f"{path}: expected an (H, W) or (H, W, C) array of numbers, got {array.dtype} of shape "
                        f"{array.shape}", path)
    return array
