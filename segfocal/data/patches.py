"""Training on crops of images of any size, read without decoding the rest (``data.patches``).

:class:`PatchDataset` holds a split's image/mask pairs (found as :class:`~segfocal.data.folder.SegmentationFolder`
finds them, ``.zarr`` folders and ``.npy`` masks too) opened for region reads (:mod:`.regions`). Its items:

* ``random`` crops (training): item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: its own
  NumPy generator, seeded from the three, picks the image and the crop and seeds the augmentation. So a
  DistributedSampler's split of the indices gives each rank a disjoint, reproducible stream of crops,
  DataLoader workers share no state, and a resumed run re-draws exactly the crops it would have drawn.
  An image is picked in proportion to its crop positions, the crop uniformly among them; with
  ``rare_fraction``, that fraction of crops is instead centred on a pixel of a class drawn with
  probability proportional to a weight scheme of the split's class frequencies (from the
  :mod:`.class_index`), in an image drawn in proportion to its pixels of that class.
* a ``grid`` of tiles (validation, evaluation): every image cut into tiles of the crop size, the last row
  and column aligned to the border and the pixels an earlier tile scored set to ``ignore_index``, so
  every pixel is scored exactly once; an image smaller than a tile is padded (image 0, mask ignored).

Masks are remapped (``label_map``) and checked as they are read; the augmentation runs on the crop.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config.schema import PatchesConfig
from ..files import cache_folder
from ..losses.class_weights import WeightScheme
from .channel_stats import Moments
from .class_index import ClassIndex, build_class_index, cached_class_index
from .errors import DataError
from .folder import SegmentationFolder, check_same_size, image_tensor, mask_tensor
from .images import IMAGE_SUFFIXES, pipeline_image, value_scale
from .masks import add_value_counts, check_mask_values, class_histogram
from .regions import ImageRegion, MaskRegion, blocks, check_chunking, sliding_windows

LARGE_IMAGE_SUFFIXES = IMAGE_SUFFIXES + (".zarr",)


def default_index_dir() -> Path:
    """Where class indexes are cached unless ``data.patches.index_dir`` says: ``class_index`` in segfocal's cache
    (:func:`~segfocal.files.cache_folder`, by default ``~/.cache/segfocal``); never the data's folder."""
    return cache_folder() / "class_index"


class LargeImageFolder(SegmentationFolder):
    """A split's pairs found as :class:`SegmentationFolder` finds them, Zarr folders and ``.npy`` masks included."""

    image_suffixes = LARGE_IMAGE_SUFFIXES
    mask_suffixes = LARGE_IMAGE_SUFFIXES


class _TrainIds:
    """A mask's regions in train ids (remapped), their values checked against the classes."""

    def __init__(self, mask: MaskRegion, dataset: "PatchDataset") -> None:
        self.mask, self.dataset = mask, dataset
        self.shape, self.chunks = mask.shape, mask.chunks

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        labels = self.mask.read(y0, y1, x0, x1)
        remap = self.dataset.remap
        labels = labels if remap is None else remap(labels)
        if self.dataset.num_classes is not None:
            check_mask_values(labels, self.mask.path, self.dataset.num_classes, self.dataset.ignore_index)
        return labels


class PatchDataset(Dataset):
    """Crops of ``patches.size`` from the pairs of ``folder`` (see the module docstring); items are
    ``(image float32 [channels, h, w], mask int64 [h, w])`` as :class:`SegmentationFolder`'s are.

    ``random_crops``: ``patches.per_epoch`` random crops a pass (call :meth:`set_epoch` before each),
    seeded by ``seed``; else the grid of tiles. Call :meth:`validate` before use: it opens every pair
    (headers only), checks them and, for class-aware crops, loads or builds the class index.
    """

    def __init__(self, folder: SegmentationFolder, patches: PatchesConfig, seed: int = 0,
                 random_crops: bool = False) -> None:
        self.root, self.split, self.samples = folder.root, folder.split, folder.samples
        self.image_folder, self.mask_folder = folder.image_folder, folder.mask_folder
        self.transform, self.channels, self.scale = folder.transform, folder.channels, folder.scale
        self.remap = folder.remap if folder.remap is not None and folder.remap.active else None
        self.color_map, self.bad_samples = folder.color_map, folder.bad_samples
        self.num_classes, self.ignore_index = folder.num_classes, folder.ignore_index
        self.size = (int(patches.size[0]), int(patches.size[1]))
        self.patches, self.seed, self.random_crops = patches, seed, random_crops
        self.scheme = WeightScheme(patches.class_weight)  # the scheme's default parameters
        self.index_dir = Path(patches.index_dir) if patches.index_dir else default_index_dir()
        self.epoch = 0
        self.skipped: List[Tuple[str, str]] = []
        self.pairs: Optional[List[Tuple[ImageRegion, MaskRegion]]] = None
        self.class_index: Optional[ClassIndex] = None
        self.class_probabilities: Optional[np.ndarray] = None
        self.tiles: Optional[np.ndarray] = None

    # -- set-up ----------------------------------------------------------------------------
    def validate(self, num_classes: int, ignore_index: int) -> List[Tuple[str, str]]:
        """Open every pair, check channels, sizes and the pixel limit (``bad_samples="skip"``: drop and record
        the bad ones), warn about chunks much larger than a crop; then the class index or the tiles."""
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.pairs = None
        problems = self._open_pairs()
        for image, mask in self.pairs:
            for region in (image, mask):
                check_chunking(region, self.size)
        if self.random_crops and self.patches.rare_fraction > 0:
            self._load_class_index()
        return problems

    def _open_pairs(self) -> List[Tuple[str, str]]:
        pairs, good, problems = [], [], []
        for sample in self.samples:
            try:
                image = ImageRegion(sample[0], self.channels, self.patches.max_pixels)
                mask = MaskRegion(sample[1], self.color_map, self.patches.max_pixels)
                check_same_size(sample[1], mask.shape, sample[0], image.shape)
            except DataError as error:
                if self.bad_samples == "error":
                    raise
                problems.append((error.path or str(sample[0]), str(error)))
                continue
            pairs.append((image, mask))
            good.append(sample)
        if problems:
            self.skipped.extend(problems)
            warnings.warn(f"split '{self.split}': dropped {len(problems)} bad samples (data.bad_samples='skip'); "
                          f"first: {problems[0][1]}", stacklevel=3)
            if not good:
                raise DataError(f"every sample of split '{self.split}' is bad; first: {problems[0][1]}", problems[0][0])
        self.samples, self.pairs = good, pairs
        if not self.random_crops:
            self.tiles = self._grid()
        return problems

    def _opened(self) -> List[Tuple[ImageRegion, MaskRegion]]:
        if self.pairs is None:
            self._open_pairs()
        return self.pairs

    def _load_class_index(self) -> None:
        masks = [_TrainIds(mask, self) for _, mask in self._opened()]
        remap = self.remap
        identity = {"masks": [str(Path(mask).resolve()) for _, mask in self.samples], "classes": self.num_classes,
                    "ignore_index": self.ignore_index, "color_map": self.color_map, "points": self.patches.index_points,
                    "label_map": None if remap is None else sorted((remap.label_map or {}).items()),
                    "reduce_zero_label": bool(remap and remap.reduce_zero_label)}
        self.class_index = cached_class_index(
            self.index_dir, identity, [mask for _, mask in self.samples],
            lambda: build_class_index(masks, self.num_classes, self.patches.index_points, self.ignore_index))
        totals = self.class_index.counts.sum(axis=0)
        weights = self.scheme.weights(torch.from_numpy(totals), dtype=torch.float64).numpy() * (totals > 0)
        self.class_probabilities = weights / weights.sum() if weights.sum() > 0 else None

    def _grid(self) -> np.ndarray:
        """Rows (image, top, left, first unscored row, first unscored column) of the tiles covering every image."""
        rows = []
        height, width = self.size
        for number, (image, _) in enumerate(self.pairs):
            tops, lefts = sliding_windows(image.shape[0], height, height), sliding_windows(image.shape[1], width, width)
            for i, top in enumerate(tops):
                for j, left in enumerate(lefts):
                    rows.append((number, top, left, tops[i - 1] + height if i else 0, lefts[j - 1] + width if j else 0))
        return np.array(rows, dtype=np.int64).reshape(-1, 5)

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of ``epoch`` (random crops only; the grid is fixed)."""
        self.epoch = epoch

    # -- items -----------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.random_crops:
            return self.patches.per_epoch
        if self.tiles is None:
            self._open_pairs()
        return len(self.tiles)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        rng = np.random.default_rng([self.seed % 2 ** 63, self.epoch, index])
        if self.random_crops:
            number, top, left = self._draw(rng)
            image, mask = self._crop(number, top, left)
        else:
            number, top, left, scored_top, scored_left = self.tiles[index].tolist()
            image, mask = self._crop(number, top, left)
            mask[:max(0, scored_top - top)] = self.ignore_index
            mask[:, :max(0, scored_left - left)] = self.ignore_index
        path = self.samples[number][0]
        if self.transform is not None:
            self.transform.set_random_seed(int(rng.integers(2 ** 32)))
            out = self.transform(image=pipeline_image(image, self.scale, path), mask=mask)
            image, mask = out["image"], out["mask"]
        return image_tensor(image), mask_tensor(mask)

    def _draw(self, rng: np.random.Generator) -> Tuple[int, int, int]:
        """(image, top, left) of a random crop: class-aware with probability ``rare_fraction``, else uniform."""
        height, width = self.size
        pairs = self._opened()
        shapes = np.array([image.shape for image, _ in pairs], dtype=np.int64)
        if self.class_probabilities is not None and rng.random() < self.patches.rare_fraction:
            cls = int(rng.choice(len(self.class_probabilities), p=self.class_probabilities))
            counts = self.class_index.counts[:, cls]
            number = int(rng.choice(len(counts), p=counts / counts.sum()))
            positions = self.class_index.positions_of(number, cls)
            row, col = divmod(int(positions[rng.integers(len(positions))]), int(shapes[number, 1]))
            top = min(max(row - height // 2, 0), max(int(shapes[number, 0]) - height, 0))
            left = min(max(col - width // 2, 0), max(int(shapes[number, 1]) - width, 0))
            return number, top, left
        spans = np.maximum(shapes - np.array(self.size), 0) + 1
        positions = spans.prod(axis=1).astype(np.float64)
        number = int(rng.choice(len(pairs), p=positions / positions.sum()))
        return number, int(rng.integers(spans[number, 0])), int(rng.integers(spans[number, 1]))

    def _crop(self, number: int, top: int, left: int) -> Tuple[np.ndarray, np.ndarray]:
        """The image and train-id mask of the crop at (top, left), padded (image 0, mask ignored) past the border."""
        image_region, mask_region = self._opened()[number]
        height, width = self.size
        bottom, right = min(top + height, image_region.shape[0]), min(left + width, image_region.shape[1])
        image = image_region.read(top, bottom, left, right)
        mask = _TrainIds(mask_region, self).read(top, bottom, left, right)
        if image.shape[:2] != (height, width):
            padding = ((0, height - image.shape[0]), (0, width - image.shape[1]))
            image = np.pad(image, padding + ((0, 0),))
            mask = np.pad(mask.astype(np.int64), padding, constant_values=self.ignore_index)
        return image, np.array(mask)  # a writable copy: the grid sets scored pixels to ignore

    # -- whole-split passes, block by block ------------------------------------------------
    def class_pixel_counts(self, num_classes: int) -> torch.Tensor:
        """Pixels per class (int64 ``[num_classes]``) over the split's masks, read block by block."""
        counts = np.zeros(num_classes, dtype=np.int64)
        for _, mask in self._opened():
            labels_of = _TrainIds(mask, self)
            for box in blocks(mask):
                counts += class_histogram(labels_of.read(*box), num_classes, self.ignore_index)
        return torch.from_numpy(counts)

    def stored_value_counts(self) -> Dict[int, int]:
        """Pixels per mask value as stored (before the remap), over the split's masks, block by block."""
        totals: Dict[int, int] = {}
        for _, mask in self._opened():
            for box in blocks(mask):
                add_value_counts(totals, mask.read(*box))
        return dict(sorted(totals.items()))

    def image_mean_std(self) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of ``x * data.scale`` over every pixel, block by block (see :mod:`.channel_stats`)."""
        moments = Moments()
        for image, _ in self._opened():
            factor = value_scale(image.dtype, self.scale, image.path)
            for box in blocks(image):
                moments.add(image.read(*box).reshape(-1, image.channels).astype(np.float64) * factor)
        return moments.mean_std()

    def __repr__(self) -> str:
        kind = f"{self.patches.per_epoch} random crops" if self.random_crops else "tiles"
        return f"{type(self).__name__}(split={self.split!r}, images={len(self.samples)}, {kind} of {self.size})"


__all__: List[str] = ["PatchDataset", "LargeImageFolder", "default_index_dir"]