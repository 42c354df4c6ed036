"""Data that must not be lost or silently changed: a user's files in a synthetic root, images cut
short on disk (``data.verify``), and 16-bit images that converting to RGB would clip (they load as they are)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfocal.config import ConfigError, DataConfig, SyntheticConfig, load_config
from segfocal.data import DataError, SegmentationFolder, build_dataset, ensure_synthetic_dataset, read_image

from recipes import tiny_recipe

TINY = SyntheticConfig(num_train=3, num_val=1, num_test=1, image_size=32, seed=0)
RESEEDED = SyntheticConfig(**{**TINY.__dict__, "seed": 1})


def _tree(root: Path) -> dict:
    """Relative path → bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_pair(root: Path, stem: str, image: Image.Image, suffix: str = ".png") -> Path:
    """Save ``image`` as ``root/train/images/<stem><suffix>`` with a matching all-zero mask; returns the image path."""
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "train" / "masks").mkdir(parents=True, exist_ok=True)
    path = root / "train" / "images" / f"{stem}{suffix}"
    image.save(path)
    Image.fromarray(np.zeros(image.size[::-1], np.uint8)).save(root / "train" / "masks" / f"{stem}.png")
    return path


def _noise(size=(40, 48)) -> Image.Image:
    """An RGB image of random pixels, which compresses poorly: cutting its file loses pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))


# -- the synthetic root: regenerated only when the generator owns everything in it -----------------
@pytest.mark.parametrize("extra, named", [
    ("notes.txt", "notes.txt"), ("train/images/extra.png", "train/images/extra.png"), ("runs/exp1/log.txt", "runs/"),
])
def test_user_file_in_a_synthetic_root_stops_regeneration(tmp_path, extra, named):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, TINY, 6, 255)
    (root / extra).parent.mkdir(parents=True, exist_ok=True)
    (root / extra).write_bytes(b"the user's")
    before = _tree(root)
    with pytest.raises(DataError, match="refusing to overwrite") as info:
        ensure_synthetic_dataset(root, RESEEDED, 6, 255)
    assert f"did not write: {named};" in str(info.value) and info.value.path == str(root / named)
    assert str(root) in str(info.value) and "data.root" in str(info.value)
    assert _tree(root) == before, "the user's file and the old dataset are both kept"
    shutil.move(str(root / named), str(tmp_path / "moved"))  # the folder is the generator's again: regenerated
    ensure_synthetic_dataset(root, RESEEDED, 6, 255)
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 1


def test_error_names_a_user_folder_once_and_counts_the_rest(tmp_path):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, TINY, 6, 255)
    (root / "runs" / "exp1").mkdir(parents=True)
    for index in range(3, 10):  # images numbered like the generator's, beyond its num_train=3
        (root / "train" / "images" / f"{index:04d}.png").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        ensure_synthetic_dataset(root, RESEEDED, 6, 255)
    message = str(info.value)
    assert "runs/," in message and "runs/exp1" not in message
    assert "train/images/0003.png" in message and "and 3 more" in message
    assert info.value.path == str(root / "runs")


@pytest.mark.parametrize("meta", [b'{"params": {"generator": "segfocal.data.synth', b"", b"\xff\xfe{"])
def test_corrupt_meta_json_stops_regeneration_and_keeps_everything(tmp_path, meta):
    root = tmp_path / "s"
    ensure_synthetic_dataset(root, TINY, 6, 255)
    (root / "meta.json").write_bytes(meta)
    before = _tree(root)
    with pytest.raises(DataError, match="meta.json is not valid JSON") as info:
        ensure_synthetic_dataset(root, TINY, 6, 255)
    assert info.value.path == str(root / "meta.json")
    assert _tree(root) == before


def test_symlinked_root_is_not_replaced(tmp_path):
    target = tmp_path / "big_disk" / "synthetic"
    ensure_synthetic_dataset(target, TINY, 6, 255)
    before = _tree(target)
    link = tmp_path / "s"
    link.symlink_to(target, target_is_directory=True)
    ensure_synthetic_dataset(link, TINY, 6, 255)  # same parameters: used as it is
    with pytest.raises(DataError, match="symbolic link") as info:
        ensure_synthetic_dataset(link, RESEEDED, 6, 255)
    assert str(target) in str(info.value)
    assert link.is_symlink() and _tree(target) == before


# -- data.verify: header (the default) or full decoding at start-up ---------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_passes_the_header_check_and_fails_full_verification(tmp_path, suffix):
    path = _write_pair(tmp_path, "cut", _noise(), suffix)
    _write_pair(tmp_path, "whole", _noise())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    header = SegmentationFolder(tmp_path, "train")
    assert header.verify == "header" and header.validate(num_classes=3, ignore_index=255) == []
    with pytest.raises(DataError, match="truncated"):  # what the header check misses fails mid-epoch
        header[0]
    with pytest.raises(DataError, match="truncated") as info:
        SegmentationFolder(tmp_path, "train", verify="full").validate(num_classes=3, ignore_index=255)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_full_verification_in_skip_mode_drops_and_records_the_truncated_image(tmp_path):
    path = _write_pair(tmp_path, "cut", _noise())
    _write_pair(tmp_path, "whole", _noise())
    path.write_bytes(path.read_bytes()[:200])
    dataset = SegmentationFolder(tmp_path, "train", bad_samples="skip", verify="full")
    with pytest.warns(UserWarning, match="dropped 1 bad samples"):
        problems = dataset.validate(num_classes=3, ignore_index=255)
    assert [p for p, _ in problems] == [str(path)] and dataset.skipped == problems
    assert [image.stem for image, _ in dataset.samples] == ["whole"]


def test_build_dataset_passes_data_verify_to_the_start_up_check(tmp_path):
    path = _write_pair(tmp_path, "cut", _noise())
    path.write_bytes(path.read_bytes()[:200])
    data = DataConfig(root=str(tmp_path), num_classes=3, verify="full")
    dataset = build_dataset(data, [], "train")
    with pytest.raises(DataError, match="cut.png"):
        dataset.validate(data.num_classes, data.ignore_index)


def test_unknown_verify_mode_is_refused(tmp_path):
    _write_pair(tmp_path, "a", _noise())
    with pytest.raises(ValueError, match="verify must be one of"):
        SegmentationFolder(tmp_path, "train", verify="fast")


def test_data_verify_config_key(tmp_path):
    assert load_config(tiny_recipe(tmp_path / "a", data__verify="full")).data.verify == "full"
    assert load_config(tiny_recipe(tmp_path / "b")).data.verify == "header"
    with pytest.raises(ConfigError, match=r"data.verify must be one of \['header', 'full'\], got 'fast'"):
        load_config(tiny_recipe(tmp_path / "c", data__verify="fast"))


# -- 16-bit and float images keep their values (converting to RGB would clip them to 255) --------------
def _deep_image(mode: str) -> Image.Image:
    """A non-8-bit grey image in PIL ``mode``, with values up to 60000 (1.5 as float): far above 255."""
    return Image.fromarray(_deep_values(mode)) if mode != "I;16B" else Image.frombytes(
        mode, (48, 40), _deep_values(mode).astype(">u2").tobytes())


def _deep_values(mode: str) -> np.ndarray:
    ramp = np.linspace(0, 60000, 40 * 48).reshape(40, 48)
    if mode == "F":
        return (ramp / 40000).astype(np.float32)
    return ramp.astype(np.int32 if mode == "I" else np.uint16)


@pytest.mark.parametrize("case, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif"), ("F", ".tif")])
def test_non_8bit_grey_image_loads_unclipped_for_one_channel_and_is_refused_for_three(tmp_path, case, suffix):
    path = _write_pair(tmp_path, "deep", _deep_image(case), suffix)
    with Image.open(path) as reread:
        assert reread.mode == case, "PIL reads the file back in the mode it was written"
    array = read_image(path, channels=1)
    np.testing.assert_array_equal(array[..., 0], _deep_values(case))
    assert array.shape == (40, 48, 1) and array.dtype.isnative
    assert SegmentationFolder(tmp_path, "train", channels=1, verify="full").validate(3, 255) == []

    with pytest.raises(DataError, match="has 1 channel but model.in_channels=3") as info:
        SegmentationFolder(tmp_path, "train").validate(num_classes=3, ignore_index=255)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="has 1 channel but model.in_channels=3"):
        read_image(path)


@pytest.mark.parametrize("mode, suffix", [
    ("L", ".png"), ("P", ".png"), ("LA", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("1", ".png"),
    ("CMYK", ".jpg"), ("YCbCr", ".tif"),
])
def test_8bit_modes_still_load_and_pass_full_verification(tmp_path, mode, suffix):
    path = _write_pair(tmp_path, "ok", _noise().convert(mode), suffix)
    with Image.open(path) as reread:
        assert reread.mode == mode
        expected = np.asarray(reread.convert("RGB"))
    dataset = SegmentationFolder(tmp_path, "train", verify="full")
    assert dataset.validate(num_classes=3, ignore_index=255) == []
    np.testing.assert_array_equal(read_image(path), expected)
    assert dataset[0][0].shape == (3, 40, 48)
