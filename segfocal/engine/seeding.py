"""Seeds for every random number generator a run touches, and optional deterministic kernels."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


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


def rng_state() -> dict:
    """The state of torch's CPU and CUDA generators (what the model's dropout draws from), for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back a state from :func:`rng_state` (CUDA states only where the same devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
