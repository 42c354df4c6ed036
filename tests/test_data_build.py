"""build_dataset / build_loader: configured splits, reproducible and per-worker-distinct augmentation, CamVid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, SequentialSampler

from segfocal.config import DataConfig, SyntheticConfig
from segfocal.data import SegmentationFolder, build_dataset, build_loader, build_transform

REPO = Path(__file__).resolve().parents[1]
CAMVID_CANDIDATES = (Path("/work/shared/datasets/CamVid"), REPO.parent / "shared" / "datasets" / "CamVid")
AUGMENT = [
    {"__class_fullname__": "HorizontalFlip", "p": 0.5},
    {"__class_fullname__": "RandomCrop", "height": 32, "width": 32},
    {"__class_fullname__": "RandomBrightnessContrast", "p": 0.5},
]


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("build") / "synthetic"
    return DataConfig(root=str(root), synthetic=SyntheticConfig(num_train=16, num_val=4, num_test=4, image_size=48))


def _batches(loader) -> list:
    return [(images.clone(), masks.clone()) for images, masks in loader]


def test_build_dataset_generates_the_synthetic_set_and_loads_batches(synthetic_data):
    dataset = build_dataset(synthetic_data, AUGMENT, synthetic_data.train_split)
    assert isinstance(dataset, SegmentationFolder) and len(dataset) == 16
    assert (Path(synthetic_data.root) / "meta.json").is_file()
    loader = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=0, drop_last=True)
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= set(range(6)) | {255}
    assert float(images.min()) < -0.5, "images are normalised, not in [0, 1]"
    assert build_dataset(synthetic_data, [], "val")[0][0].shape == (3, 48, 48)


def test_same_seed_same_batches_other_seed_other_batches(synthetic_data):
    def run(seed, workers=0):
        dataset = build_dataset(synthetic_data, AUGMENT, "train")
        return _batches(build_loader(dataset, 4, shuffle=True, num_workers=workers, seed=seed, drop_last=True))

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    with_workers, with_workers_again = run(0, workers=2), run(0, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(with_workers, with_workers_again))


def _identical_images(root: Path, count: int) -> SegmentationFolder:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mask = (np.arange(40 * 40).reshape(40, 40) % 5).astype(np.uint8)
    for split_dir in ("images", "masks"):
        (root / "s" / split_dir).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(image).save(root / "s" / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "s" / "masks" / f"{index}.png")
    items = [{"__class_fullname__": "RandomCrop", "height": 16, "width": 16}]
    return SegmentationFolder(root, "s", transform=build_transform(items, [0.5] * 3, [0.2] * 3, seed=0))


def test_workers_draw_different_augmentations(tmp_path):
    dataset = _identical_images(tmp_path, 8)
    loader = build_loader(dataset, batch_size=2, shuffle=False, num_workers=2, seed=0, drop_last=False)
    assert loader.persistent_workers and not loader.pin_memory
    batches = _batches(loader)  # batch 0 from worker 0, batch 1 from worker 1: same images, own crops
    assert not torch.equal(batches[0][1], batches[1][1])
    # control: without the loader's worker seeding, both workers copy one random state
    plain = _batches(DataLoader(dataset, batch_size=2, num_workers=2))
    assert torch.equal(plain[0][1], plain[1][1])


def test_sampler_decides_the_order(synthetic_data):
    dataset = build_dataset(synthetic_data, [], "val")
    loader = build_loader(dataset, 2, shuffle=True, num_workers=0, seed=0, drop_last=False,
                          sampler=SequentialSampler(dataset))
    first_masks = next(iter(loader))[1]
    assert torch.equal(first_masks[0], dataset[0][1])
    assert loader.generator is not None


def _camvid() -> Path:
    for candidate in CAMVID_CANDIDATES:
        if (candidate / "trainannot").is_dir():
            return candidate
    pytest.skip("CamVid is not available at " + " or ".join(map(str, CAMVID_CANDIDATES)))


@pytest.mark.parametrize("split_file", [None, "{split}.txt"])
def test_real_camvid_layout(split_file):
    root = _camvid()
    data = DataConfig(root=str(root), num_classes=11, ignore_index=11, image_dir="{split}", mask_dir="{split}annot",
                      split_file=split_file)
    for split, count in (("train", 367), ("val", 101), ("test", 233)):
        dataset = build_dataset(data, [], split)
        assert len(dataset) == count
        if split_file is None:
            assert dataset.validate(num_classes=11, ignore_index=11) == []
            image, mask = dataset[0]
            assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
            assert int(mask.max()) <= 11


@pytest.mark.parametrize("persistent", [False, True])
def test_reseeding_the_generator_repeats_an_epoch_only_without_persistent_workers(tmp_path, persistent):
    dataset = _identical_images(tmp_path, 8)
    loader = build_loader(dataset, batch_size=2, shuffle=True, num_workers=2, seed=0, drop_last=False,
                          persistent_workers=persistent)
    assert loader.persistent_workers == persistent
    epochs = []
    for _ in range(2):
        loader.generator.manual_seed(7)  # what the trainer does at the start of every epoch
        epochs.append(_batches(loader))
    same = all(torch.equal(a[1], b[1]) for a, b in zip(*epochs))
    assert same != persistent  # persistent workers keep their own random state from epoch to epoch


def test_iterating_a_skip_mode_dataset_stops(synthetic_data):
    data = DataConfig(**{**synthetic_data.__dict__, "bad_samples": "skip"})
    assert len(list(build_dataset(data, [], "test"))) == 4
