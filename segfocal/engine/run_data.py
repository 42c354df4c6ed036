"""A run's training and validation data: both splits, checked, and their loaders (sharded under DDP)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..config import Config, ConfigError
from ..data import build_loader
from ..data.splits import run_dataset
from .distributed import DistContext


@dataclass
class RunData:
    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader  # this rank's share of the val split
    train_sampler: Optional[DistributedSampler]  # under DDP: re-seeded per epoch with set_epoch


def build_run_data(cfg: Config, dist: DistContext) -> RunData:
    """Both splits of ``cfg.data`` (labels checked against the class count) and their loaders.

    The training loader's workers are not persistent: they are re-seeded every epoch, so a resumed run
    sees the same augmentations as one never stopped.
    """
    data = cfg.data
    train_set = run_dataset(cfg, cfg.augment.train, data.train_split, record=dist.is_main, random_crops=True)
    val_set = run_dataset(cfg, cfg.augment.val, data.val_split)
    for dataset in (train_set, val_set):
        dataset.validate(data.num_classes, data.ignore_index)
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True) if dist.enabled else None
    train_loader = build_loader(train_set, data.batch_size, shuffle=sampler is None, num_workers=data.num_workers,
                                seed=cfg.seed, drop_last=True, sampler=sampler, persistent_workers=False)
    val_loader = val_loader_of(Subset(val_set, range(dist.rank, len(val_set), dist.world_size)), cfg)
    if len(train_loader) == 0:
        unit = "training images" if data.patches is None else "crops of data.patches.per_epoch"
        raise ConfigError(f"data.batch_size={data.batch_size} exceeds the {len(train_set)} {unit} (per rank); lower it")
    return RunData(train_set, val_set, train_loader, val_loader, sampler)


def val_loader_of(dataset: Dataset, cfg: Config) -> DataLoader:
    """The loader evaluation reads ``dataset`` (val images or a rank's share of them) with, in order."""
    return build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers, seed=cfg.seed,
                        drop_last=False)
