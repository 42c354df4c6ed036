"""Test helpers: "large" images (a few hundred pixels, stored in 64x64 tiles, which exercises the same code as
16k x 16k ones) as tiled TIFF, Zarr or .npy, made of the synthetic set's samples, and a tiny recipe training on them."""
from pathlib import Path

import numpy as np
import tifffile

from segfocal.data.synthetic import make_sample

from recipes import tiny_recipe

SIZE, TILE = 300, 64


def mosaic(seed: int, size: int = SIZE) -> tuple:
    """An (RGB uint8 [size, size, 3], mask uint8 [size, size]) pair: synthetic samples of 96x96 side by side."""
    rng = np.random.default_rng(seed)
    cells = -(-size // 96)
    image = np.zeros((cells * 96, cells * 96, 3), np.uint8)
    mask = np.zeros((cells * 96, cells * 96), np.uint8)
    for row in range(cells):
        for col in range(cells):
            image[row * 96:(row + 1) * 96, col * 96:(col + 1) * 96], mask[row * 96:(row + 1) * 96, col * 96:(col + 1) * 96] = \
                make_sample(rng, 96, 6, 255)
    return image[:size, :size], mask[:size, :size]


def write_array(path: Path, array: np.ndarray, tile: int = TILE) -> Path:
    """``array`` as ``path``: a TIFF in tiles of ``tile``, a Zarr array in chunks of ``tile``, or a .npy file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        bands = {"planarconfig": "contig"} if array.ndim == 3 else {}
        tifffile.imwrite(path, array, tile=(tile, tile), photometric="rgb" if array.ndim == 3 and array.shape[2] == 3
                         else "minisblack", **bands)
    elif path.suffix == ".zarr":
        import zarr

        stored = zarr.create_array(str(path), shape=array.shape, dtype=array.dtype,
                                   chunks=(tile, tile) + array.shape[2:])
        stored[...] = array
    else:
        np.save(path, array)
    return path


def write_large_split(root: Path, split: str, seeds, image_suffix: str = ".tif", mask_suffix: str = ".tif",
                      size: int = SIZE) -> list:
    """One mosaic per seed as ``root/split/images/<i><image_suffix>`` and ``root/split/masks/<i><mask_suffix>``."""
    pairs = []
    for index, seed in enumerate(seeds):
        image, mask = mosaic(seed, size)
        pairs.append((write_array(root / split / "images" / f"{index}{image_suffix}", image),
                      write_array(root / split / "masks" / f"{index}{mask_suffix}", mask)))
    return pairs


def large_recipe(tmp_path: Path, image_suffix: str = ".tif", mask_suffix: str = ".tif", **overrides) -> Path:
    """A tiny recipe training on 64x64 crops of two 300x300 train images (one val image), written once per folder."""
    root = tmp_path / "large"
    if not (root / "val").exists():
        write_large_split(root, "train", [1, 2], image_suffix, mask_suffix)
        write_large_split(root, "val", [3], image_suffix, mask_suffix)
    options = dict(data__root=str(root), data__synthetic=None,
                   data__patches={"size": [64, 64], "per_epoch": 16, "index_dir": str(tmp_path / "index")})
    options.update(overrides)
    return tiny_recipe(tmp_path, **options)
