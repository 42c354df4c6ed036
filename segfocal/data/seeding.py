"""Seeding of the augmentation pipeline: per DataLoader worker, and in the main process."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_augmentation_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's own albumentations pipeline.

    albumentations keeps a random state per ``Compose``, copied unchanged into every worker;
    without this, all workers would draw the same augmentations. ``torch.initial_seed()`` in a
    worker is the loader's per-epoch base seed plus the worker id, so runs stay reproducible.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    dataset = torch.utils.data.get_worker_info().dataset
    reseed_transform(dataset, seed)


def reseed_transform(dataset: object, seed: int) -> None:
    """Give the dataset's albumentations pipeline (if any) a fresh random state."""
    dataset = getattr(dataset, "dataset", dataset)  # unwrap torch.utils.data.Subset
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
