"""The synthetic dataset: layout, determinism, strong imbalance, ignore pixels, safe (re)generation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfocal.config import ConfigError, SyntheticConfig
from segfocal.data import SYNTHETIC_CLASS_NAMES, DataError, SegmentationFolder, ensure_synthetic_dataset
from segfocal.data import synthetic as synthetic_module

SMALL = SyntheticConfig(num_train=12, num_val=4, num_test=3, image_size=48, seed=0)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    """The default-size set (192 + 48 + 48 images of 96x96), generated once for this module."""
    root = tmp_path_factory.mktemp("synthetic") / "synthetic"
    ensure_synthetic_dataset(root, SyntheticConfig(), num_classes=6, ignore_index=255)
    return root


def test_layout_and_file_formats(default_set):
    for split, count in (("train", 192), ("val", 48), ("test", 48)):
        images = sorted((default_set / split / "images").iterdir())
        masks = sorted((default_set / split / "masks").iterdir())
        assert [p.name for p in images] == [f"{i:04d}.png" for i in range(count)]
        assert [p.name for p in masks] == [p.name for p in images]
    with Image.open(default_set / "train" / "images" / "0000.png") as image:
        assert image.mode == "RGB" and image.size == (96, 96)
    with Image.open(default_set / "train" / "masks" / "0000.png") as mask:
        assert mask.mode == "L" and mask.size == (96, 96)
    meta = json.loads((default_set / "meta.json").read_text())
    assert meta["class_names"] == list(SYNTHETIC_CLASS_NAMES[:6])
    assert meta["params"]["seed"] == 0 and meta["params"]["num_classes"] == 6


def test_default_set_is_strongly_imbalanced_with_ignore_pixels(default_set):
    dataset = SegmentationFolder(default_set, "train")
    assert dataset.validate(num_classes=6, ignore_index=255) == []
    counts = dataset.class_pixel_counts(6).numpy().astype(float)
    total = 192 * 96 * 96
    shares = counts / total
    assert counts.min() > 0, "every class must occur"
    assert counts.min() / counts.max() < 1 / 30
    assert np.argmax(counts) == 0, "background is the most common class"
    assert np.all(np.diff(counts) < 0), f"shares fall class by class: {shares}"
    assert 0.10 < shares[1] < 0.30 and shares[5] < 0.006
    ignored = 1.0 - counts.sum() / total
    assert 0.01 < ignored < 0.05
    recorded = json.loads((default_set / "meta.json").read_text())["pixel_counts"]["train"]
    assert recorded == counts.astype(int).tolist()


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    ensure_synthetic_dataset(tmp_path / "a", SMALL, 6, 255)
    ensure_synthetic_dataset(tmp_path / "b", SMALL, 6, 255)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 2 * (12 + 4 + 3)
    assert first == second
    other = SyntheticConfig(**{**SMALL.__dict__, "seed": 1})
    ensure_synthetic_dataset(tmp_path / "c", other, 6, 255)
    third = _files(tmp_path / "c")
    assert third.keys() == first.keys()
    assert all(third[name] != first[name] for name in first if "/masks/" in name)


def test_splits_are_different_images(tmp_path):
    ensure_synthetic_dataset(tmp_path / "s", SMALL, 6, 255)
    files = _files(tmp_path / "s")
    assert files["train/masks/0000.png"] != files["val/masks/0000.png"] != files["test/masks/0000.png"]


def test_existing_set_with_same_parameters_is_kept(tmp_path, monkeypatch):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, SMALL, 6, 255)
    stamp = (root / "train" / "images" / "0000.png").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the parameters did not change")

    monkeypatch.setattr(synthetic_module, "_generate", fail)
    ensure_synthetic_dataset(root, SMALL, 6, 255)
    assert (root / "train" / "images" / "0000.png").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", [{"num_train": 5}, {"image_size": 40}, {"seed": 3}, "classes", "ignore"])
def test_changed_parameters_regenerate(tmp_path, change):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, SMALL, 6, 255)
    config, classes, ignore = SMALL, 6, 255
    if change == "classes":
        classes = 4
    elif change == "ignore":
        ignore = 200
    else:
        config = SyntheticConfig(**{**SMALL.__dict__, **change})
    ensure_synthetic_dataset(root, config, classes, ignore)
    meta = json.loads((root / "meta.json").read_text())["params"]
    assert (meta["num_classes"], meta["ignore_index"], meta["num_train"], meta["image_size"], meta["seed"]) == (
        classes, ignore, config.num_train, config.image_size, config.seed)
    assert len(list((root / "train" / "images").iterdir())) == config.num_train
    with Image.open(root / "train" / "images" / "0000.png") as image:
        assert image.size == (config.image_size, config.image_size)
    masks = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "train" / "masks").iterdir())])
    assert set(np.unique(masks).tolist()) <= set(range(classes)) | {ignore}
    assert ignore in masks
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.") and p.is_dir()], "no leftovers"


def test_crash_mid_generation_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "s"
    real_sample = synthetic_module.make_sample
    calls = {"n": 0}

    def crash_after_a_few(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(synthetic_module, "make_sample", crash_after_a_few)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(root, SMALL, 6, 255)
    assert not root.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(synthetic_module, "make_sample", real_sample)
    ensure_synthetic_dataset(root, SMALL, 6, 255)
    assert len(SegmentationFolder(root, "train")) == 12


def test_crash_while_replacing_keeps_the_old_set(tmp_path, monkeypatch):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, SMALL, 6, 255)
    before = _files(root)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic_module, "_replace", crash)
    with pytest.raises(OSError):
        ensure_synthetic_dataset(root, SyntheticConfig(**{**SMALL.__dict__, "seed": 9}), 6, 255)
    assert _files(root) == before
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 0


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    (root / "train" / "precious.png").write_bytes(b"user data")
    with pytest.raises(DataError, match="refusing to overwrite") as info:
        ensure_synthetic_dataset(root, SMALL, 6, 255)
    assert str(root) in str(info.value)
    assert (root / "train" / "precious.png").read_bytes() == b"user data"


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "s").mkdir()
    ensure_synthetic_dataset(tmp_path / "s", SMALL, 6, 255)
    assert (tmp_path / "s" / "meta.json").is_file()


@pytest.mark.parametrize("classes", [2, 3, 7, 8])
def test_other_class_counts_use_every_class(tmp_path, classes):
    config = SyntheticConfig(num_train=24, num_val=1, num_test=1, image_size=64, seed=0)
    ensure_synthetic_dataset(tmp_path / "s", config, classes, 255)
    counts = SegmentationFolder(tmp_path / "s", "train").class_pixel_counts(classes)
    assert (counts > 0).all(), counts
    assert int(counts.argmax()) == 0


@pytest.mark.parametrize("classes, ignore, pattern", [
    (1, 255, "num_classes=1"), (9, 255, "num_classes=9"), (6, 3, "ignore_index=3"), (6, 256, "ignore_index=256"),
])
def test_invalid_parameters_raise_config_error(tmp_path, classes, ignore, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ensure_synthetic_dataset(tmp_path / "s", SMALL, classes, ignore)
    assert not (tmp_path / "s").exists()


def test_dataset_folder_gets_ordinary_permissions(tmp_path):
    ensure_synthetic_dataset(tmp_path / "s", SMALL, 6, 255)
    assert (tmp_path / "s").stat().st_mode & 0o777 == (tmp_path / "s" / "train").stat().st_mode & 0o777


def _ensure_in_child(root: str) -> None:
    ensure_synthetic_dataset(Path(root), SMALL, 6, 255)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_concurrent_callers_share_one_complete_dataset(tmp_path):
    """As DDP ranks do: several processes ask for the same set at once."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_ensure_in_child, args=(str(tmp_path / "s"),)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    ensure_synthetic_dataset(tmp_path / "a", SMALL, 6, 255)
    assert _files(tmp_path / "s") == _files(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock", ".s.lock", "a", "s"]
