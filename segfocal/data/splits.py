"""A val split carved from the train split (``data.val_fraction``), fixed for the run and recorded in it.

With ``data.val_fraction`` set, the images of ``data.train_split`` are divided once: a fraction,
drawn with the run's ``seed``, becomes the ``data.val_split`` split and the rest is trained on.
The val images are written to ``work_dir/val_split.json`` (paths relative to ``data.root``), which
a resumed run and ``segfocal eval`` read back, so all see the same split; images added to the
train folder later are trained on, never moved into val.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Set, Union

import numpy as np

from ..config import Config, ConfigError
from ..files import replaced_atomically
from ..text import counted
from .build import build_dataset
from .errors import DataError
from .folder import SegmentationFolder
from .layouts import layout_folders
from .patches import PatchDataset

RECORD = "val_split.json"


def run_dataset(cfg: Config, augment_items: List[Dict[str, Any]], split: str, record: bool = False,
                random_crops: bool = False) -> Union[SegmentationFolder, PatchDataset]:
    """:func:`build_dataset` of ``split`` for the run ``cfg``: with ``data.val_fraction``, the train and
    val splits are the two parts of ``data.train_split``. ``record``: write the val part to the run
    directory if it is not there yet (the trainer's main process does). ``random_crops``: with
    ``data.patches``, the training crops drawn from ``cfg.seed`` (else the split's tiles)."""
    data = cfg.data
    if data.val_fraction is None or split not in (data.train_split, data.val_split):
        return build_dataset(data, augment_items, split, cfg.seed, random_crops)
    dataset = build_dataset(data, augment_items, data.train_split, cfg.seed, random_crops)
    val = held_out(dataset, data.val_fraction, cfg.seed, Path(cfg.work_dir) / RECORD, record)
    dataset.samples = [sample for sample in dataset.samples if (sample[0] in val) == (split == data.val_split)]
    dataset.split = split
    return dataset


def has_split(cfg: Config, split: str) -> bool:
    """Whether :func:`run_dataset` finds ``split`` on disk: its image folder (its split file, where the layout
    lists the split's images in one) exists; a val split carved from train, where the train split does."""
    data = cfg.data
    if data.val_fraction is not None and split == data.val_split:
        split = data.train_split
    image_dir, _, split_file = layout_folders(data.layout, data.image_dir, data.mask_dir, data.split_file)
    if split_file:
        return (Path(data.root) / split_file.format(split=split)).is_file()
    return (Path(data.root) / image_dir.format(split=split)).is_dir()


def held_out(dataset: SegmentationFolder, fraction: float, seed: int, path: Path, record: bool) -> Set[Path]:
    """The image paths of ``dataset`` that form the val split: read from ``path``, else drawn with ``seed``."""
    if path.is_file():
        return _read(path, dataset, fraction, seed)
    images = [image for image, _ in dataset.samples]
    count = round(len(images) * fraction)
    if not 0 < count < len(images):
        raise ConfigError(f"data.val_fraction={fraction} of the {counted(len(images), 'image')} of split "
                          f"'{dataset.split}' leaves {'no val' if count == 0 else 'no training'} image; change it")
    picks = np.sort(np.random.default_rng(seed).choice(len(images), size=count, replace=False))
    val = [images[index] for index in picks]
    if record:
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {"val_fraction": fraction, "seed": seed, "from_split": dataset.split,
                   "val": [image.relative_to(dataset.root).as_posix() for image in val]}
        with replaced_atomically(path) as handle:
            handle.write(json.dumps(content, indent=1).encode())
    return set(val)


def _read(path: Path, dataset: SegmentationFolder, fraction: float, seed: int) -> Set[Path]:
    try:
        content = json.loads(path.read_text())
        made_with, listed = (content["val_fraction"], content["seed"]), content["val"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"cannot read the run's val split {path}: {error}; delete it to draw the split again",
                        path) from None
    if made_with != (fraction, seed):
        raise ConfigError(f"{path} holds the val split drawn with data.val_fraction={made_with[0]}, seed="
                          f"{made_with[1]}, but the config has data.val_fraction={fraction}, seed={seed}; use "
                          f"another work_dir, or delete {path.name} to draw a new split")
    val = {dataset.root / name for name in listed}
    missing = sorted(val - {image for image, _ in dataset.samples})
    if missing:
        raise DataError(f"{path}: {len(missing)} val images are no longer in split '{dataset.split}'; first: "
                        f"{missing[0]}", path)
    return val
