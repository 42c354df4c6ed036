"""SegmentationFolder: pairing by stem, split files, error messages naming files, skip mode, statistics."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.data import DataError, SegmentationFolder


def _write_sample(root: Path, split: str, stem: str, size=(12, 16), labels=None, image_ext=".png",
                  mask_ext=".png", mask_size=None) -> None:
    height, width = size
    rng = np.random.default_rng(abs(hash(stem)) % 2**32)
    images, masks = root / split / "images", root / split / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / f"{stem}{image_ext}")
    mh, mw = mask_size or size
    mask = labels if labels is not None else (np.arange(mh * mw).reshape(mh, mw) % 3).astype(np.uint8)
    Image.fromarray(mask).save(masks / f"{stem}{mask_ext}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for stem in ("a", "b", "c"):
        _write_sample(tmp_path, "train", stem)
    return tmp_path


def test_items_are_float_image_and_int64_mask(root):
    dataset = SegmentationFolder(root, "train")
    assert len(dataset) == 3
    assert [p[0].stem for p in dataset.samples] == ["a", "b", "c"]
    image, mask = dataset[1]
    assert image.dtype == torch.float32 and image.shape == (3, 12, 16)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert mask.dtype == torch.int64 and mask.shape == (12, 16)
    expected = np.asarray(Image.open(root / "train" / "masks" / "b.png"))
    np.testing.assert_array_equal(mask.numpy(), expected)
    pixels = np.asarray(Image.open(root / "train" / "images" / "b.png"))
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), pixels / 255.0, atol=1e-6)


def test_transform_is_applied_to_image_and_mask(root):
    calls = []

    def transform(image, mask):
        calls.append((image.shape, mask.shape))
        return {"image": image[:, ::-1], "mask": mask[:, ::-1]}

    dataset = SegmentationFolder(root, "train", transform=transform)
    _, mask = dataset[0]
    expected = np.asarray(Image.open(root / "train" / "masks" / "a.png"))[:, ::-1]
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert calls == [((12, 16, 3), (12, 16))]


def test_jpeg_images_pair_with_png_masks(tmp_path):
    for stem in ("x1", "x2"):
        _write_sample(tmp_path, "val", stem, image_ext=".jpg")
    dataset = SegmentationFolder(tmp_path, "val")
    assert [(i.suffix, m.suffix) for i, m in dataset.samples] == [(".jpg", ".png"), (".jpg", ".png")]
    assert dataset[0][0].shape == (3, 12, 16)


def test_camvid_style_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "train" / "f1.png")
    Image.fromarray(np.full((6, 8), 11, np.uint8)).save(tmp_path / "trainannot" / "f1.png")
    dataset = SegmentationFolder(tmp_path, "train", image_dir="{split}", mask_dir="{split}annot")
    assert len(dataset) == 1
    assert dataset.validate(num_classes=11, ignore_index=11) == []


def test_missing_image_folder_names_it(tmp_path):
    with pytest.raises(DataError, match="image folder not found") as info:
        SegmentationFolder(tmp_path, "train")
    assert str(tmp_path / "train" / "images") in str(info.value)


def test_missing_mask_folder_names_it(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="mask folder not found") as info:
        SegmentationFolder(tmp_path, "train")
    assert str(tmp_path / "train" / "masks") in str(info.value)


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir(parents=True)
    (tmp_path / "train" / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images") as info:
        SegmentationFolder(tmp_path, "train")
    assert str(tmp_path / "train" / "images") in str(info.value)


def test_images_without_masks_are_listed(root):
    for stem in ("d", "e"):
        Image.new("RGB", (16, 12)).save(root / "train" / "images" / f"{stem}.png")
    with pytest.raises(DataError) as info:
        SegmentationFolder(root, "train")
    message = str(info.value)
    assert "2 images" in message and "d, e" in message
    assert str(root / "train" / "masks") in message


def test_two_images_with_one_stem_are_an_error(root):
    Image.new("RGB", (16, 12)).save(root / "train" / "images" / "a.jpg")
    with pytest.raises(DataError, match="share the stem 'a'"):
        SegmentationFolder(root, "train")


def test_corrupt_image_names_the_file(root):
    bad = root / "train" / "images" / "b.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    dataset = SegmentationFolder(root, "train")
    with pytest.raises(DataError) as info:
        dataset[1]
    assert str(bad) in str(info.value)


def test_mask_size_mismatch_names_both_files(root):
    _write_sample(root, "train", "b", size=(12, 16), mask_size=(12, 15))
    dataset = SegmentationFolder(root, "train")
    with pytest.raises(DataError, match="15x12") as info:
        dataset[1]
    assert str(root / "train" / "masks" / "b.png") in str(info.value)
    assert str(root / "train" / "images" / "b.png") in str(info.value)
    with pytest.raises(DataError, match="differs"):
        dataset.validate(num_classes=3, ignore_index=255)


def test_validate_names_first_bad_mask_and_its_values(root):
    labels = np.zeros((12, 16), np.uint8)
    labels[0, :3] = [7, 9, 255]
    _write_sample(root, "train", "b", labels=labels)
    _write_sample(root, "train", "c", labels=labels + 1)
    dataset = SegmentationFolder(root, "train")
    with pytest.raises(DataError) as info:
        dataset.validate(num_classes=3, ignore_index=255)
    message = str(info.value)
    assert str(root / "train" / "masks" / "b.png") in message
    assert "[7, 9]" in message
    assert str(root / "train" / "masks" / "c.png") not in message  # the first bad file only
    assert dataset.validate(num_classes=11, ignore_index=255) == []  # labels 0..10 + 255 (wrapped to 0)


def test_validate_passes_clean_split(root):
    assert SegmentationFolder(root, "train").validate(num_classes=3, ignore_index=255) == []


def test_loading_checks_labels_once_num_classes_is_known(root):
    labels = np.full((12, 16), 5, np.uint8)
    _write_sample(root, "train", "c", labels=labels)
    dataset = SegmentationFolder(root, "train", num_classes=3, ignore_index=255)
    dataset[0]
    with pytest.raises(DataError, match=r"\[5\]") as info:
        dataset[2]
    assert str(root / "train" / "masks" / "c.png") in str(info.value)


def test_skip_mode_substitutes_the_next_good_sample_and_records_it(root):
    bad = root / "train" / "images" / "b.png"
    bad.write_bytes(b"garbage")
    dataset = SegmentationFolder(root, "train", bad_samples="skip")
    with pytest.warns(UserWarning, match="skipping a bad sample"):
        image, mask = dataset[1]
    expected = np.asarray(Image.open(root / "train" / "masks" / "c.png"))
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert [path for path, _ in dataset.skipped] == [str(bad)]
    assert "cannot read image" in dataset.skipped[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad sample is neither re-read nor re-reported
        dataset[1]
    assert len(dataset.skipped) == 1
    assert len(dataset) == 3


def test_skip_mode_wraps_around_at_the_end(root):
    (root / "train" / "images" / "c.png").write_bytes(b"garbage")
    dataset = SegmentationFolder(root, "train", bad_samples="skip")
    with pytest.warns(UserWarning):
        _, mask = dataset[2]
    np.testing.assert_array_equal(mask.numpy(), np.asarray(Image.open(root / "train" / "masks" / "a.png")))


def test_skip_mode_with_every_sample_bad_raises(root):
    for stem in ("a", "b", "c"):
        (root / "train" / "images" / f"{stem}.png").write_bytes(b"garbage")
    dataset = SegmentationFolder(root, "train", bad_samples="skip")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="every sample"):
        dataset[0]
    assert len(dataset.skipped) == 3


def test_validate_in_skip_mode_drops_bad_samples(root):
    labels = np.full((12, 16), 9, np.uint8)
    _write_sample(root, "train", "a", labels=labels)
    _write_sample(root, "train", "c", size=(12, 16), mask_size=(10, 16))
    dataset = SegmentationFolder(root, "train", bad_samples="skip")
    with pytest.warns(UserWarning, match="dropped 2 bad samples"):
        problems = dataset.validate(num_classes=3, ignore_index=255)
    assert [Path(p).name for p, _ in problems] == ["a.png", "c.png"]
    assert [image.stem for image, _ in dataset.samples] == ["b"]
    assert dataset.skipped == problems
    assert len(dataset) == 1 and dataset[0][1].shape == (12, 16)


def test_split_file_of_stems(root):
    (root / "train.txt").write_text("# chosen\nc\n\nb.png\n")
    dataset = SegmentationFolder(root, "train", split_file="{split}.txt")
    assert [image.stem for image, _ in dataset.samples] == ["c", "b"]


def test_split_file_of_camvid_style_path_pairs(tmp_path):
    for split in ("train", "trainannot"):
        (tmp_path / split).mkdir()
    for stem in ("0001TP_006690", "0001TP_006720", "Seq05VD_f00000"):
        Image.new("RGB", (8, 6)).save(tmp_path / "train" / f"{stem}.png")
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "trainannot" / f"{stem}.png")
    (tmp_path / "train.txt").write_text(
        "/SegNet/CamVid/train/0001TP_006720.png /SegNet/CamVid/trainannot/0001TP_006720.png\n"
        "/SegNet/CamVid/train/Seq05VD_f00000.png /SegNet/CamVid/trainannot/Seq05VD_f00000.png\n"
    )
    dataset = SegmentationFolder(tmp_path, "train", image_dir="{split}", mask_dir="{split}annot",
                                 split_file="{split}.txt")
    assert [(i.name, m.parent.name) for i, m in dataset.samples] == [
        ("0001TP_006720.png", "trainannot"), ("Seq05VD_f00000.png", "trainannot")]


def test_split_file_pair_may_name_a_mask_with_another_stem(root):
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "train" / "masks" / "a_label.png")
    (root / "list.txt").write_text("images/a.png masks/a_label.png\n")
    dataset = SegmentationFolder(root, "train", split_file="list.txt")
    assert dataset.samples[0][1].name == "a_label.png"


def test_split_file_naming_missing_files(root):
    (root / "train.txt").write_text("a\nzz\nyy\n")
    with pytest.raises(DataError, match="zz, yy") as info:
        SegmentationFolder(root, "train", split_file="{split}.txt")
    assert str(root / "train.txt") in str(info.value)


def test_missing_split_file_names_it(root):
    with pytest.raises(DataError, match="split file") as info:
        SegmentationFolder(root, "train", split_file="{split}.txt")
    assert str(root / "train.txt") in str(info.value)


def test_split_file_line_with_three_fields(root):
    (root / "train.txt").write_text("a\na b c\n")
    with pytest.raises(DataError, match=r"train.txt:2"):
        SegmentationFolder(root, "train", split_file="{split}.txt")


def test_class_pixel_counts_ignores_out_of_range_and_ignore(root):
    first = np.zeros((12, 16), np.uint8)
    first[0, :4] = [1, 2, 255, 7]
    _write_sample(root, "train", "a", labels=first)
    _write_sample(root, "train", "b", labels=np.full((12, 16), 2, np.uint8))
    _write_sample(root, "train", "c", labels=np.full((12, 16), 255, np.uint8))
    counts = SegmentationFolder(root, "train").class_pixel_counts(3)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [12 * 16 - 4, 1, 1 + 12 * 16]


def test_class_pixel_counts_leaves_out_an_in_range_ignore_index(root):
    dataset = SegmentationFolder(root, "train", num_classes=3, ignore_index=0)
    counts = dataset.class_pixel_counts(3)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0


def test_color_map_masks_through_the_dataset(tmp_path):
    colours = [[0, 0, 0], [200, 10, 10]]
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "masks").mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(tmp_path / "s" / "images" / "k.jpg")
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[1, 2] = colours[1]
    Image.fromarray(rgb).save(tmp_path / "s" / "masks" / "k.png")
    dataset = SegmentationFolder(tmp_path, "s", color_map=colours)
    assert dataset[0][1].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]
    assert dataset.class_pixel_counts(2).tolist() == [7, 1]
