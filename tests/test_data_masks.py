"""Reading masks (grey, palette, RGB + color_map), checking label values, writing palette PNGs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segfocal.data import DataError, check_mask_values, default_palette, read_mask, write_palette_mask

COLOURS = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]]


def _labels() -> np.ndarray:
    return np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]], dtype=np.uint8)


def test_grey_png_gives_values_as_they_are(tmp_path):
    labels = _labels().copy()
    labels[0, 0] = 255
    Image.fromarray(labels).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.shape == (3, 4) and np.issubdtype(mask.dtype, np.integer)
    np.testing.assert_array_equal(mask, labels)
    assert mask.flags.writeable


def test_palette_png_gives_indices_not_colours(tmp_path):
    labels = _labels()
    image = Image.fromarray(labels)
    # a palette whose colours differ from the indices in every channel
    image.putpalette([200, 100, 50, 10, 220, 30, 40, 50, 240, 7, 7, 7] + [0] * (768 - 12))
    image.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), labels)


def test_write_palette_mask_round_trips_indices_and_colours(tmp_path):
    labels = _labels()
    palette = default_palette(4)
    write_palette_mask(tmp_path / "pred.png", labels, palette)
    with Image.open(tmp_path / "pred.png") as image:
        assert image.mode == "P"
        rgb = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(read_mask(tmp_path / "pred.png"), labels)
    np.testing.assert_array_equal(rgb, np.asarray(palette, dtype=np.uint8)[labels])


def test_write_palette_mask_rejects_values_a_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        write_palette_mask(tmp_path / "x.png", np.array([[0, 300]]), default_palette(2))


@pytest.mark.parametrize("count", [2, 11, 12, 40])
def test_default_palette_colours_are_distinct(count):
    palette = default_palette(count)
    assert len(palette) == count
    assert len({tuple(c) for c in palette}) == count
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)


def test_rgb_mask_with_color_map_maps_each_colour_to_its_class(tmp_path):
    labels = _labels()
    Image.fromarray(np.asarray(COLOURS, dtype=np.uint8)[labels]).save(tmp_path / "rgb.png")
    mask = read_mask(tmp_path / "rgb.png", color_map=COLOURS)
    np.testing.assert_array_equal(mask, labels)


def test_rgba_mask_uses_the_colour_channels(tmp_path):
    labels = _labels()
    rgba = np.concatenate([np.asarray(COLOURS, dtype=np.uint8)[labels], np.full((3, 4, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png", color_map=COLOURS), labels)


def test_unknown_colours_raise_naming_the_file_and_the_colours(tmp_path):
    rgb = np.asarray(COLOURS, dtype=np.uint8)[_labels()]
    rgb[0, 0] = [1, 2, 3]
    rgb[2, 3] = [250, 251, 252]
    path = tmp_path / "odd.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as info:
        read_mask(path, color_map=COLOURS)
    message = str(info.value)
    assert str(path) in message
    assert "(1, 2, 3)" in message and "(250, 251, 252)" in message
    assert info.value.path == str(path)


def test_unknown_colours_listed_are_at_most_five(tmp_path):
    rgb = np.zeros((1, 8, 3), dtype=np.uint8)
    rgb[0, :, 0] = np.arange(100, 108)
    Image.fromarray(rgb).save(tmp_path / "many.png")
    with pytest.raises(DataError, match=r"and 3 more") as info:
        read_mask(tmp_path / "many.png", color_map=[[0, 0, 0]])
    assert str(info.value).count("(") == 5


def test_grey_saved_as_rgb_reads_without_color_map(tmp_path):
    labels = _labels()
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey_rgb.png"), labels)


def test_coloured_rgb_mask_without_color_map_is_an_error(tmp_path):
    Image.fromarray(np.asarray(COLOURS, dtype=np.uint8)[_labels()]).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="color_map") as info:
        read_mask(tmp_path / "c.png")
    assert str(tmp_path / "c.png") in str(info.value)


def test_sixteen_bit_mask_keeps_large_values(tmp_path):
    labels = np.array([[0, 300], [1000, 7]], dtype=np.uint16)
    Image.fromarray(labels).save(tmp_path / "m16.png")
    mask = read_mask(tmp_path / "m16.png")
    np.testing.assert_array_equal(mask, labels)
    assert mask.dtype.isnative


def test_unreadable_mask_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as info:
        read_mask(path)
    assert str(path) in str(info.value)


def test_check_mask_values_accepts_classes_and_ignore():
    check_mask_values(np.array([[0, 5, 255]]), "m.png", num_classes=6, ignore_index=255)


def test_check_mask_values_names_file_and_bad_values():
    mask = np.array([[0, 6, 7, 255], [9, 1, 6, 0]], dtype=np.uint8)
    with pytest.raises(DataError) as info:
        check_mask_values(mask, "/data/masks/0001.png", num_classes=6, ignore_index=255)
    message = str(info.value)
    assert "/data/masks/0001.png" in message
    assert "[6, 7, 9]" in message and "4 pixels" in message
    assert info.value.path == "/data/masks/0001.png"


def test_check_mask_values_treats_ignore_as_bad_when_it_is_another_value():
    with pytest.raises(DataError, match=r"\[255\]"):
        check_mask_values(np.array([[0, 255]], dtype=np.uint8), "m.png", num_classes=11, ignore_index=11)
