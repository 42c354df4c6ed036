"""A configured dataset split and its DataLoader: the two calls the trainer and tools make.

Images of one batch must share a size, so a training pipeline that feeds batches of more than one
image must crop or resize to a fixed size (e.g. ``PadIfNeeded`` + ``RandomCrop``, or ``Resize``)
unless all images already have one size, as in CamVid and the synthetic set.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig
from .folder import SegmentationFolder
from .labels import LabelRemap
from .layouts import layout_folders
from .patches import LargeImageFolder, PatchDataset
from .seeding import reseed_transform, seed_augmentation_worker
from .synthetic import ensure_synthetic_dataset
from .transforms import build_transform


def build_dataset(data: DataConfig, augment_items: List[Dict[str, Any]], split: str, seed: int = 0,
                  random_crops: bool = False) -> Union[SegmentationFolder, PatchDataset]:
    """The ``split`` (a folder split name such as ``data.train_split``) of ``data``, with
    ``augment_items`` + normalisation as its transform; the synthetic set is generated first
    when ``data.synthetic`` is set and ``data.root`` does not hold it yet. With ``data.patches``, a
    :class:`PatchDataset` of the split: ``random_crops`` drawn from ``seed`` (training), else its tiles.

    Loaded masks are remapped by ``data.label_map``/``data.reduce_zero_label`` and checked against
    ``data.num_classes``/``data.ignore_index``; ``data.verify`` sets how closely the dataset's
    ``validate`` reads the images. Images must have one channel per ``data.mean`` value, which the
    config loader has checked to be ``model.in_channels``.
    """
    if data.synthetic is not None:
        ensure_synthetic_dataset(Path(data.root), data.synthetic, data.num_classes, data.ignore_index)
    transform = build_transform(augment_items, data.mean, data.std, ignore_index=data.ignore_index, scale=data.scale)
    image_dir, mask_dir, split_file = layout_folders(data.layout, data.image_dir, data.mask_dir, data.split_file)
    folder = (SegmentationFolder if data.patches is None else LargeImageFolder)(
        data.root, split, image_dir=image_dir, mask_dir=mask_dir, split_file=split_file,
        color_map=data.color_map, transform=transform, bad_samples=data.bad_samples,
        num_classes=data.num_classes, ignore_index=data.ignore_index, verify=data.verify,
        channels=len(data.mean), scale=data.scale, layout=data.layout,
        remap=LabelRemap(data.label_map, data.reduce_zero_label, data.ignore_index),
    )
    return folder if data.patches is None else PatchDataset(folder, data.patches, seed, random_crops)


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore Ctrl-C, which the terminal sends to the workers too (the main
    process decides when to stop and shuts them down), then seed the worker's augmentations."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed_augmentation_worker(worker_id)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    sampler: Optional[Sampler] = None,
    persistent_workers: Optional[bool] = None,
) -> DataLoader:
    """A reproducible DataLoader over ``dataset``.

    Its ``generator`` (seeded with ``seed``; reseed it per epoch with ``loader.generator.manual_seed``)
    decides the shuffle order and the workers' base seed; each worker seeds ``random``, NumPy and
    its copy of the albumentations pipeline from it. Memory is pinned only when CUDA is available.
    With a ``sampler`` (e.g. DistributedSampler) the sampler decides the order and ``shuffle`` is
    ignored.

    ``persistent_workers`` (default: ``num_workers > 0``) keeps workers across epochs: cheaper,
    but workers are seeded once, so reseeding ``loader.generator`` later re-orders the samples
    without re-seeding the workers' augmentations. Pass ``False`` where an epoch must be exactly
    reproducible from its seed (resuming mid-run with ``num_workers > 0``).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers == 0:
        reseed_transform(dataset, seed)  # the main process runs the pipeline: make it reproducible too
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=init_worker if num_workers > 0 else None,
        persistent_workers=bool(persistent_workers) and num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
