"""A split of paired image/mask folders as a torch Dataset, matched by file stem.

Layouts: ``root/{split}/images`` + ``root/{split}/masks`` (the synthetic set) or ``root/{split}`` +
``root/{split}annot`` (CamVid as downloaded), and the standard datasets' (:mod:`.layouts`). Every
problem with the files raises :class:`DataError` naming the path, or, with ``bad_samples="skip"``,
skips the sample.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config.schema import BAD_SAMPLE_MODES, VERIFY_MODES, BadSamples, Layout, Verify
from ..text import counted
from .errors import DataError
from .images import IMAGE_SUFFIXES, check_image, pipeline_image, read_image
from .labels import LabelRemap
from .layouts import cityscapes_samples
from .masks import add_value_counts, check_mask_values, class_histogram, read_mask

MASK_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix != ".npy")
_SHOWN = 5  # how many stems/files an error message lists

Sample = Tuple[Path, Path]


def check_same_size(mask_path: Path, mask_size: Sequence[int], image_path: Path, image_size: Sequence[int]) -> None:
    """Raise DataError naming the mask unless its (height, width) equals its image's."""
    if tuple(mask_size) != tuple(image_size):
        raise DataError(
            f"{mask_path}: mask size {mask_size[1]}x{mask_size[0]} differs from the size "
            f"{image_size[1]}x{image_size[0]} of its image {image_path}", mask_path
        )


def index_folder(folder: Path, suffixes: Sequence[str], kind: str) -> Dict[str, Path]:
    """Stem → file for the files of ``folder`` with one of ``suffixes`` (case-insensitive)."""
    if not folder.is_dir():
        raise DataError(f"{kind} folder not found: {folder}", folder)
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if not (path.is_file() or (path.suffix.lower() == ".zarr" and path.is_dir())):  # a Zarr array is a folder
            continue
        if path.stem in found:
            raise DataError(f"two {kind} files share the stem '{path.stem}': {found[path.stem]} and {path}", path)
        found[path.stem] = path
    return found


def listed(stems: Sequence[str]) -> str:
    """The first few of ``stems`` and how many more: for a message."""
    more = f" and {len(stems) - _SHOWN} more" if len(stems) > _SHOWN else ""
    return ", ".join(stems[:_SHOWN]) + more


class SegmentationFolder(Dataset):
    """Images and label masks of one split, paired by file stem.

    ``image_dir``, ``mask_dir`` and ``split_file`` are relative to ``root`` with ``{split}``
    replaced by ``split``. ``split_file`` lines are a stem (or file name), or an "image mask" pair
    of paths such as CamVid's ``/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png``, of
    which only the file stems are used to find the files in the folders. ``transform`` is an
    albumentations pipeline called with ``image=`` and ``mask=``; it gets images as
    :func:`~segfocal.data.images.pipeline_image` makes them with ``scale``. ``layout="cityscapes"``
    pairs ``*_leftImg8bit.png`` with ``*_gtFine_labelIds.png`` in the city folders instead.

    Images must have ``channels`` channels (``model.in_channels``); masks are remapped by
    ``remap`` (a :class:`~segfocal.data.labels.LabelRemap`) as they are read.
    Items are ``(image float32 [channels, H, W], mask int64 [H, W])``. With ``num_classes`` (and
    ``ignore_index``) set, every loaded mask's values are checked too. ``bad_samples="skip"``
    replaces a sample that cannot be used by the next good one and records it in ``skipped``
    as ``(path, reason)``; in DataLoader workers that list is the worker's own copy, so call
    :meth:`validate` first for a complete account. ``verify`` is how closely :meth:`validate`
    reads the images: ``"header"`` or ``"full"`` (decode every pixel).
    """

    image_suffixes: Tuple[str, ...] = IMAGE_SUFFIXES
    mask_suffixes: Tuple[str, ...] = MASK_SUFFIXES

    def __init__(
        self,
        root: Union[str, Path],
        split: str,
        image_dir: str = "{split}/images",
        mask_dir: str = "{split}/masks",
        split_file: Optional[str] = None,
        color_map: Optional[Sequence[Sequence[int]]] = None,
        transform: Optional[Any] = None,
        bad_samples: BadSamples = "error",
        num_classes: Optional[int] = None,
        ignore_index: Optional[int] = None,
        verify: Verify = "header",
        channels: int = 3,
        scale: Optional[float] = None,
        remap: Optional[LabelRemap] = None,
        layout: Layout = "folder",
    ) -> None:
        if bad_samples not in BAD_SAMPLE_MODES:
            raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_MODES}, got {bad_samples!r}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.root = Path(root)
        self.split = split
        self.image_folder = self.root / image_dir.format(split=split)
        self.mask_folder = self.root / mask_dir.format(split=split)
        self.split_file = self.root / split_file.format(split=split) if split_file else None
        self.color_map = color_map
        self.transform = transform
        self.bad_samples = bad_samples
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.verify = verify
        self.channels = channels
        self.scale = scale
        self.remap = remap
        self.layout = layout
        self.skipped: List[Tuple[str, str]] = []
        self._bad: Set[Path] = set()
        self.samples: List[Sample] = self._find_samples()

    # -- discovery -------------------------------------------------------------------------
    def _find_samples(self) -> List[Sample]:
        if self.layout == "cityscapes":
            return cityscapes_samples(self.image_folder, self.mask_folder)
        images = index_folder(self.image_folder, self.image_suffixes, "image")
        masks = index_folder(self.mask_folder, self.mask_suffixes, "mask")
        if self.split_file is not None:
            return self._samples_from_split_file(images, masks)
        if not images:
            raise DataError(f"no images ({', '.join(self.image_suffixes)}) found in {self.image_folder}", self.image_folder)
        unmatched = [stem for stem in images if stem not in masks]
        if unmatched:
            raise DataError(
                f"{counted(len(unmatched), 'image')} in {self.image_folder} without a mask in {self.mask_folder}: "
                f"{listed(unmatched)}", images[unmatched[0]]
            )
        return [(images[stem], masks[stem]) for stem in images]

    def _samples_from_split_file(self, images: Dict[str, Path], masks: Dict[str, Path]) -> List[Sample]:
        path = self.split_file
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise DataError(f"cannot read split file {path}: {error}", path) from None
        samples: List[Sample] = []
        missing_images: List[str] = []
        missing_masks: List[str] = []
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise DataError(f"{path}:{number}: expected a stem or an 'image mask' pair, got {line.strip()!r}", path)
            image_stem = Path(fields[0]).stem
            mask_stem = Path(fields[-1]).stem
            if image_stem not in images:
                missing_images.append(image_stem)
            elif mask_stem not in masks:
                missing_masks.append(mask_stem)
            else:
                samples.append((images[image_stem], masks[mask_stem]))
        if missing_images:
            raise DataError(f"{counted(len(missing_images), 'image')} listed in {path} not in {self.image_folder}: "
                            f"{listed(missing_images)}", path)
        if missing_masks:
            raise DataError(f"{counted(len(missing_masks), 'mask')} listed in {path} not in {self.mask_folder}: "
                            f"{listed(missing_masks)}", path)
        if not samples:
            raise DataError(f"split file {path} lists no samples", path)
        return samples

    # -- loading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        count = len(self.samples)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} samples")
        if self.bad_samples == "error":
            return self._load(self.samples[index])
        index %= count
        for offset in range(count):
            sample = self.samples[(index + offset) % count]
            if sample[0] in self._bad:
                continue
            try:
                return self._load(sample)
            except DataError as error:
                self._skip(sample, error)
        raise DataError(f"every sample of split '{self.split}' in {self.image_folder} is bad "
                        f"(bad_samples='skip'); first: {self.skipped[0][1] if self.skipped else '?'}",
                        self.image_folder)

    def _load(self, sample: Sample) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = sample
        image = read_image(image_path, self.channels)
        mask = self.read_mask(mask_path)
        check_same_size(mask_path, mask.shape, image_path, image.shape[:2])
        if self.num_classes is not None:
            check_mask_values(mask, mask_path, self.num_classes, _ignore(self.ignore_index))
        if self.transform is not None:
            out = self.transform(image=pipeline_image(image, self.scale, image_path), mask=mask)
            image, mask = out["image"], out["mask"]
        return image_tensor(image), mask_tensor(mask)

    def read_mask(self, path: Path) -> np.ndarray:
        """The mask at ``path`` in train ids: decoded with ``color_map``, then remapped."""
        mask = read_mask(path, self.color_map)
        return mask if self.remap is None else self.remap(mask)

    def _skip(self, sample: Sample, error: DataError) -> None:
        self._bad.add(sample[0])
        path = error.path or str(sample[0])
        self.skipped.append((path, str(error)))
        warnings.warn(f"skipping a bad sample (data.bad_samples='skip'): {error}", stacklevel=3)

    # -- whole-split passes ----------------------------------------------------------------
    def validate(self, num_classes: int, ignore_index: int) -> List[Tuple[str, str]]:
        """Check every mask's values and readability, and every image's channel count and size.

        Reads each mask once and, with ``verify="header"``, only the header of each image (a
        truncated or corrupt image then fails when loaded); ``verify="full"`` decodes every image
        too, so that such an image fails here. With ``bad_samples="error"`` the
        first problem raises :class:`DataError` naming the file (and the bad values); with
        ``"skip"`` the bad samples are dropped from the split, recorded in ``skipped`` and returned.
        Afterwards, loaded masks are checked against ``num_classes``/``ignore_index`` too.
        """
        self.num_classes, self.ignore_index = num_classes, ignore_index
        good: List[Sample] = []
        problems: List[Tuple[str, str]] = []
        pixels: Dict[Sample, int] = {}
        for sample in self.samples:
            try:
                mask = self.read_mask(sample[1])
                check_mask_values(mask, sample[1], num_classes, ignore_index)
                size = check_image(sample[0], decode=self.verify == "full", channels=self.channels)
                check_same_size(sample[1], mask.shape, sample[0], size)
                good.append(sample)
                pixels[sample] = size[0] * size[1]
            except DataError as error:
                if self.bad_samples == "error":
                    raise
                problems.append((error.path or str(sample[1]), str(error)))
        if problems:
            self.samples = good
            self.skipped.extend(problems)
            warnings.warn(f"split '{self.split}': dropped {len(problems)} bad samples (data.bad_samples='skip'); "
                          f"first: {problems[0][1]}", stacklevel=2)
            if not good:
                raise DataError(f"every sample of split '{self.split}' in {self.image_folder} is bad; "
                                f"first: {problems[0][1]}", problems[0][0])
        if self.transform is not None:
            self._rehearse_transform(min(good, key=pixels.__getitem__))
        return problems

    def _rehearse_transform(self, sample: Sample) -> None:
        """Load ``sample`` (the smallest image) through the transform once, so that a pipeline that
        cannot take the data (a crop larger than the images) fails at start-up, not mid-epoch."""
        try:
            self._load(sample)
        except DataError:
            raise
        except Exception as error:  # albumentations raises several types; the message says what
            height, width = check_image(sample[0], channels=self.channels)
            raise DataError(f"the augmentation pipeline of split '{self.split}' fails on {sample[0]} ({width}x"
                            f"{height}, its smallest image): {type(error).__name__}: {str(error).splitlines()[0]}. "
                            f"Pad (PadIfNeeded) or resize before cropping, or crop smaller", sample[0]) from None

    def class_pixel_counts(self, num_classes: int) -> torch.Tensor:
        """Pixels per class (int64 ``[num_classes]``) over all masks of the split, untransformed.

        Labels outside ``0..num_classes-1`` and ``ignore_index`` (when set) are not counted.
        """
        counts = np.zeros(num_classes, dtype=np.int64)
        for sample in self.samples:
            try:
                mask = self.read_mask(sample[1])
            except DataError as error:
                if self.bad_samples == "error":
                    raise
                self._skip(sample, error)
                continue
            counts += class_histogram(mask, num_classes, self.ignore_index)
        return torch.from_numpy(counts)

    def stored_value_counts(self) -> Dict[int, int]:
        """Pixels per mask value as the files store it, before the remap (colour masks: after
        ``color_map``), over the split's readable masks, in value order: what a label map maps from."""
        totals: Dict[int, int] = {}
        for _, path in self.samples:
            try:
                add_value_counts(totals, read_mask(path, self.color_map))
            except DataError:
                if self.bad_samples == "error":
                    raise
        return dict(sorted(totals.items()))

    def image_mean_std(self) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of ``x * scale`` over every pixel of the split's images
        (:func:`~segfocal.data.channel_stats.image_mean_std`; bad images skipped with ``bad_samples="skip"``)."""
        from .channel_stats import image_mean_std

        return image_mean_std((image for image, _ in self.samples), channels=self.channels, scale=self.scale,
                              skip_bad=self.bad_samples == "skip")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, images={self.image_folder}, "
                f"masks={self.mask_folder})")


def _ignore(ignore_index: Optional[int]) -> int:
    return -1 if ignore_index is None else ignore_index


def image_tensor(image: Any) -> torch.Tensor:
    """A float32 [C, H, W] tensor from a transform's output (tensor or HWC array; uint8 → [0, 1])."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def mask_tensor(mask: Any) -> torch.Tensor:
    """An int64 [H, W] tensor from a transform's output mask (tensor or array)."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    return mask.long()
