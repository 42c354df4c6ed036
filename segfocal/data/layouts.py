"""Where the images and masks of a split are, for ``data.layout``: the standard datasets as unpacked.

* ``folder``: ``data.image_dir`` + ``data.mask_dir`` (+ ``data.split_file``), matched by file stem.
* ``voc``: Pascal VOC 2012 (``VOCdevkit/VOC2012``): ``ImageSets/Segmentation/{split}.txt`` lists the
  stems, ``JPEGImages/`` the images, ``SegmentationClass/`` the palette PNG masks (255 = border).
* ``ade20k``: ADEChallengeData2016: ``images/{split}/*.jpg`` + ``annotations/{split}/*.png``
  (splits ``training`` and ``validation``; stored 0 = other, classes 1..150).
* ``cityscapes``: ``leftImg8bit/{split}/{city}/X_leftImg8bit.png`` +
  ``gtFine/{split}/{city}/X_gtFine_labelIds.png`` (the 34 label ids; ``data.label_map`` picks the 19).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from ..text import counted
from .errors import DataError

# layout: (image_dir, mask_dir, split_file), as data.image_dir/mask_dir/split_file would set them
FOLDERS = {
    "voc": ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/{split}.txt"),
    "ade20k": ("images/{split}", "annotations/{split}", None),
    "cityscapes": ("leftImg8bit/{split}", "gtFine/{split}", None),
}
CITYSCAPES_IMAGE, CITYSCAPES_MASK = "_leftImg8bit.png", "_gtFine_labelIds.png"


def layout_folders(layout: str, image_dir: str, mask_dir: str,
                   split_file: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """(image_dir, mask_dir, split_file) of ``layout``: the ``data`` keys for ``folder``, else the dataset's own."""
    return FOLDERS.get(layout, (image_dir, mask_dir, split_file))


def cityscapes_samples(image_folder: Path, mask_folder: Path) -> List[Tuple[Path, Path]]:
    """(image, labelIds mask) pairs of a Cityscapes split, city by city; DataError if none or a mask is missing."""
    images = sorted(image_folder.glob(f"*/*{CITYSCAPES_IMAGE}"))
    if not images:
        raise DataError(f"no */*{CITYSCAPES_IMAGE} images in {image_folder} (data.layout=cityscapes: data.root "
                        f"must hold leftImg8bit/ and gtFine/)", image_folder)
    pairs = [(image, mask_folder / image.parent.name / (image.name[:-len(CITYSCAPES_IMAGE)] + CITYSCAPES_MASK))
             for image in images]
    missing = [mask for _, mask in pairs if not mask.is_file()]
    if missing:
        raise DataError(f"{counted(len(missing), 'Cityscapes image', 'has/have')} no {CITYSCAPES_MASK} mask; first: "
                        f"{missing[0]}", missing[0])
    return pairs
