"""Label remapping (data.label_map, data.reduce_zero_label) and the standard layouts (data.layout:
cityscapes, voc, ade20k) loaded from tiny fake trees with the shipped recipes, against hand-computed masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.config import ConfigError, load_config
from segfocal.config.schema import LAYOUTS
from segfocal.data import DataError, LabelRemap, build_dataset, write_palette_mask
from segfocal.data.layouts import FOLDERS
from segfocal.engine.trainer import Trainer

from recipes import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 64
TINY = ["model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}", "augment.train=[]", "train.epochs=1",
        "train.log_images=0", "schedule.warmup_iters=0", "data.num_workers=0", "data.batch_size=2"]


def recipe(name: str, root: Path, tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml",
                       [f"data.root={root}", f"work_dir={tmp_path / 'run'}", *TINY, *overrides])


def blocks(values) -> np.ndarray:
    """A 32x64 uint8 mask of 2x4 blocks (16x16 pixels each) holding ``values`` row by row."""
    return np.kron(np.asarray(values, np.uint8).reshape(2, 4), np.ones((16, 16), np.uint8))


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def masks_of(dataset) -> list:
    return [dataset[index][1].numpy() for index in range(len(dataset))]


# -- remapping ---------------------------------------------------------------------------------------
def test_the_config_offers_every_layout_the_data_package_knows():
    assert set(LAYOUTS) == {"folder"} | set(FOLDERS)


def test_label_map_sends_listed_values_to_train_ids_and_the_rest_to_ignore():
    remap = LabelRemap({7: 0, 8: 1, 26: 13, 33: 18}, reduce_zero_label=False, ignore_index=255)
    mask = np.array([[7, 8, 0, 300], [33, 255, 26, 9]], np.uint16)
    np.testing.assert_array_equal(remap(mask), [[0, 1, 255, 255], [18, 255, 13, 255]])
    signed = np.array([[-1, 7]], np.int32)  # a 32-bit "I" mask
    np.testing.assert_array_equal(remap(signed), [[255, 0]])


def test_reduce_zero_label_shifts_classes_and_ignores_zero():
    remap = LabelRemap(None, reduce_zero_label=True, ignore_index=255)
    mask = np.array([[0, 1, 150], [255, 2, 0]], np.uint8)
    np.testing.assert_array_equal(remap(mask), [[255, 0, 149], [255, 1, 255]])
    assert remap(mask).dtype == np.uint8
    unchanged = LabelRemap(None, reduce_zero_label=False, ignore_index=255)
    assert unchanged(mask) is mask


@pytest.mark.parametrize("override, message", [
    ("data.label_map={7: 0, 8: 19}", r"data.label_map\[8\]=19: a train id must be a class 0..18 "
                                     r"\(data.num_classes=19\) or data.ignore_index=255"),
    ("data.label_map={-3: 0}", r"data.label_map key must be at least 0, got -3"),
    ("data.reduce_zero_label=true", "data.label_map and data.reduce_zero_label are both set"),
    ("data.image_dir=images", "data.image_dir='images' is not used with data.layout='cityscapes'"),
    ("data.scale=-1", r"data.scale must be a finite number > 0, got -1"),
    ("data.layout=coco", r"data.layout must be one of \['folder', 'cityscapes', 'voc', 'ade20k'\], got 'coco'"),
])
def test_bad_data_keys_are_named_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        recipe("cityscapes_unet_focal", tmp_path, tmp_path, override)


# -- layouts -----------------------------------------------------------------------------------------
def test_cityscapes_tree_loads_label_ids_as_the_19_train_ids(tmp_path):
    stored = {("aachen", "aachen_000000_000019"): [7, 8, 26, 0, 24, 33, 9, 23],
              ("bremen", "bremen_000001_000019"): [11, 21, 1, 31, 32, 255, 17, 20]}
    for (city, prefix), values in stored.items():
        save(tmp_path / "leftImg8bit" / "train" / city / f"{prefix}_leftImg8bit.png", rgb(len(city)))
        save(tmp_path / "gtFine" / "train" / city / f"{prefix}_gtFine_labelIds.png", blocks(values))
        save(tmp_path / "gtFine" / "train" / city / f"{prefix}_gtFine_color.png", rgb(0))  # left alone
    cfg = recipe("cityscapes_unet_focal", tmp_path, tmp_path)
    dataset = build_dataset(cfg.data, [], "train")
    assert [image.name for image, _ in dataset.samples] == [
        "aachen_000000_000019_leftImg8bit.png", "bremen_000001_000019_leftImg8bit.png"]
    np.testing.assert_array_equal(masks_of(dataset), [blocks([0, 1, 13, 255, 11, 18, 255, 10]),
                                                      blocks([2, 8, 255, 16, 17, 255, 5, 7])])
    assert dataset.validate(cfg.data.num_classes, cfg.data.ignore_index) == []

    save(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", rgb(3))
    save(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
         blocks([7, 7, 26, 26, 8, 0, 24, 11]))
    result = Trainer(cfg, progress=False).fit()  # a step, validated on the val city
    assert result is not None and 0 <= result.metrics["miou"] <= 1 and (tmp_path / "run" / "best.pt").is_file()

    (tmp_path / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="1 Cityscapes image has no _gtFine_labelIds.png mask; first: .*bremen_0"):
        build_dataset(cfg.data, [], "train")


def write_voc(root: Path) -> dict:
    """Three JPEGs and palette masks with 255 borders; train.txt lists two, val.txt one. Returns stem → mask."""
    masks = {}
    for index, stem in enumerate(["2007_000032", "2007_000039", "2008_000123"]):
        save(root / "JPEGImages" / f"{stem}.jpg", rgb(index))
        mask = blocks([0, 15, 15, 0, 7, 7, 20, index])
        mask[15:17] = 255  # the border around objects VOC leaves unlabelled
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        write_palette_mask(root / "SegmentationClass" / f"{stem}.png", mask, [[i, 0, 0] for i in range(256)])
        masks[stem] = mask
    save(root / "JPEGImages" / "2012_999999.jpg", rgb(9))  # an image without a mask, in no list
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2008_000123\n")
    (lists / "val.txt").write_text("2007_000039\n")
    return masks


def test_voc_tree_loads_palette_indices_with_ignored_borders_and_trains(tmp_path):
    masks = write_voc(tmp_path / "VOC2012")
    cfg = recipe("voc_unet_focal", tmp_path / "VOC2012", tmp_path)
    train = build_dataset(cfg.data, [], "train")
    assert [image.stem for image, _ in train.samples] == ["2007_000032", "2008_000123"]
    np.testing.assert_array_equal(masks_of(train), [masks["2007_000032"], masks["2008_000123"]])
    assert masks_of(build_dataset(cfg.data, [], "val"))[0][15:17].tolist() == [[255] * W] * 2

    trainer = Trainer(cfg, progress=False)
    _, mask = next(iter(trainer.data.train_loader))
    border = mask == 255
    assert border.any(dim=0)[15:17].all() and not border.any(dim=0)[:15].any()  # the borders reach the loss

    def loss_and_gradient(logits):
        logits = logits.clone().requires_grad_(True)
        loss = trainer.parts.criterion(logits, mask)
        return loss, torch.autograd.grad(loss, logits)[0]

    logits = torch.randn(mask.shape[0], cfg.data.num_classes, H, W, generator=torch.Generator().manual_seed(0))
    loss, gradient = loss_and_gradient(logits)
    changed = logits + 5.0 * border.unsqueeze(1) * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    changed_loss, changed_gradient = loss_and_gradient(changed)
    torch.testing.assert_close(changed_loss, loss, rtol=1e-6, atol=0)  # the borders' logits count for nothing
    torch.testing.assert_close(changed_gradient, gradient, rtol=1e-5, atol=1e-9)
    assert (gradient.permute(0, 2, 3, 1)[border] == 0).all()
    labelled = logits.clone()
    labelled[:, 0, 0, 0] += 5.0  # a labelled pixel's logits do count
    assert not torch.allclose(loss_and_gradient(labelled)[0], loss)

    result = trainer.fit()
    assert result is not None and 0 <= result.metrics["miou"] <= 1 and (tmp_path / "run" / "best.pt").is_file()


def test_ade20k_tree_reduces_zero_label(tmp_path):
    for split, stem, values in [("training", "ADE_train_00000001", [0, 1, 150, 2, 0, 13, 149, 3]),
                                ("validation", "ADE_val_00000001", [5, 0, 0, 0, 1, 1, 1, 1])]:
        save(tmp_path / "images" / split / f"{stem}.jpg", rgb(1))
        save(tmp_path / "annotations" / split / f"{stem}.png", blocks(values))
    cfg = recipe("ade20k_unet_focal", tmp_path, tmp_path)
    np.testing.assert_array_equal(masks_of(build_dataset(cfg.data, [], "training")),
                                  [blocks([255, 0, 149, 1, 255, 12, 148, 2])])
    np.testing.assert_array_equal(masks_of(build_dataset(cfg.data, [], "validation")),
                                  [blocks([4, 255, 255, 255, 0, 0, 0, 0])])
    result = Trainer(recipe("ade20k_unet_focal", tmp_path, tmp_path, "data.batch_size=1"), progress=False).fit()
    assert result is not None and 0 <= result.metrics["miou"] <= 1 and (tmp_path / "run" / "best.pt").is_file()
