"""Images of any channel count and bit depth: 16-bit grey TIFF, 4-band .npy and TIFF (tifffile) and
multi-page TIFF reach the model as ``(x * scale - mean) / std``, unclipped; a wrong channel count names
the file and ``model.in_channels``; stats, TensorBoard and predict handle them."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import struct

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from segfocal.config import load_config
from segfocal.data import DataError, build_dataset, check_image, read_image
from segfocal.data.channel_stats import image_mean_std
from segfocal.engine.trainer import Trainer
from segfocal.visualize import denormalize, display_images

from recipes import load_tool, run_tool, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 64


def grey16(seed: int) -> np.ndarray:
    """A 32x64 uint16 image whose first pixels are 40000 and 65535, far above 8 bits."""
    image = np.random.default_rng(seed).integers(0, 65536, (H, W), dtype=np.uint16)
    image[0, :2] = [40000, 65535]
    return image


def bands4(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (H, W, 4), dtype=np.uint16)


def stripes() -> np.ndarray:
    """Classes 0, 1, 2 in vertical stripes."""
    return np.repeat(np.arange(W)[None] * 3 // W, H, axis=0).astype(np.uint8)


def write_split(root: Path, split: str, images: list, suffix: str) -> list:
    """``images`` as ``root/split/images/i<suffix>`` (.npy via numpy, (H, W, C) TIFF via tifffile, else PIL)
    with stripe masks."""
    for folder in ("images", "masks"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = root / split / "images" / f"{index}{suffix}"
        if suffix == ".npy":
            np.save(path, image)
        elif image.ndim == 3:
            tifffile.imwrite(path, image, photometric="minisblack", planarconfig="contig")
        else:
            Image.fromarray(image).save(path)
        Image.fromarray(stripes()).save(root / split / "masks" / f"{index}.png")
        paths.append(path)
    return paths


def recipe(tmp_path: Path, channels: int, **overrides) -> Path:
    settings = dict(data__synthetic=None, data__num_classes=3, data__class_names=["a", "b", "c"], data__batch_size=2,
                    data__mean=[0.5] * channels, data__std=[0.25] * channels, model__in_channels=channels,
                    train__epochs=1, train__log_images=1)
    return tiny_recipe(tmp_path, **{**settings, **overrides})


def train_capturing_inputs(config: Path) -> list:
    """Train ``config`` one epoch; the model's inputs, batch by batch (training, then validation)."""
    trainer = Trainer(load_config(config), progress=False)
    inputs = []
    trainer.parts.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    trainer.fit()
    return inputs


def test_a_16bit_grey_tiff_dataset_trains_with_one_channel_and_reaches_the_model_unclipped(tmp_path):
    train = [grey16(seed) for seed in range(4)]
    write_split(tmp_path / "data", "train", train, ".tif")
    write_split(tmp_path / "data", "val", [grey16(9)], ".tif")
    with Image.open(tmp_path / "data" / "train" / "images" / "0.tif") as written:
        assert written.mode == "I;16"
    config = recipe(tmp_path, 1, augment__train=[{"__class_fullname__": "HorizontalFlip", "p": 1.0}])
    inputs = train_capturing_inputs(config)

    expected = [(image[:, ::-1] / 65535 - 0.5) / 0.25 for image in train]  # flipped, then normalised
    first_batch = inputs[0]
    assert first_batch.shape == (2, 1, H, W)
    for sample in first_batch[:, 0].double().numpy():
        match = min(expected, key=lambda candidate: np.abs(candidate - sample).max())
        np.testing.assert_allclose(sample, match, rtol=0, atol=1e-5)
        assert sample[0, -1] == pytest.approx((40000 / 65535 - 0.5) / 0.25, abs=1e-6)
        assert sample[0, -2] == pytest.approx(2.0, abs=1e-6)  # 65535: 1.0 scaled, (1 - 0.5) / 0.25
    assert (tmp_path / "run" / "best.pt").is_file()


def test_data_scale_one_takes_mean_and_std_in_the_stored_units(tmp_path):
    write_split(tmp_path / "data", "train", [grey16(0)], ".tif")
    cfg = load_config(recipe(tmp_path, 1, data__scale=1.0, data__mean=[1000.0], data__std=[2000.0]))
    resize = [{"__class_fullname__": "Resize", "height": H, "width": W, "interpolation": 0}]  # float32 through cv2
    image, _ = build_dataset(cfg.data, resize, "train")[0]
    np.testing.assert_allclose(image[0].double().numpy(), (grey16(0) - 1000.0) / 2000.0, rtol=1e-6, atol=1e-6)
    assert float(image[0, 0, 0]) == pytest.approx(19.5) and float(image.max()) > 30  # 65535 → 32.27


@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_a_4band_dataset_trains_and_its_bands_reach_the_model_unclipped(tmp_path, suffix):
    train = [bands4(seed) for seed in range(2)]
    write_split(tmp_path / "data", "train", train, suffix)
    write_split(tmp_path / "data", "val", [bands4(5)], suffix)
    inputs = train_capturing_inputs(recipe(tmp_path, 4, augment__train=[]))
    assert inputs[0].shape == (2, 4, H, W)
    stored = np.stack([image.transpose(2, 0, 1) / 65535 for image in train])
    got = inputs[0].double().numpy() * 0.25 + 0.5
    order = np.argsort(got[:, 0, 0, 0])
    np.testing.assert_allclose(got[order], stored[np.argsort(stored[:, 0, 0, 0])], rtol=0, atol=1e-5)
    assert (tmp_path / "run" / "best.pt").is_file()


def test_multipage_tiff_pages_are_channels(tmp_path):
    pages = [grey16(seed) for seed in range(3)]
    path = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    np.testing.assert_array_equal(read_image(path, channels=3), np.stack(pages, axis=-1))
    rgb_pages = tmp_path / "rgb_pages.tif"
    frame = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    frame.save(rgb_pages, save_all=True, append_images=[frame])
    with pytest.raises(DataError, match="page 0 of this multi-page TIFF is RGB 64x32; pages are read as channels"):
        read_image(rgb_pages, channels=2)


def write_chunky_tiff(path: Path, bands: np.ndarray) -> None:
    """A one-page uncompressed TIFF of an (H, W, S) uint16 array, samples interleaved, as GIS tools write
    4-band imagery (PIL cannot write one). Tags per the TIFF 6.0 baseline, in ascending order."""
    height, width, samples = bands.shape
    pixels = bands.astype("<u2").tobytes()
    per_sample = struct.pack(f"<{samples}H", *[16] * samples) + struct.pack(f"<{samples}H", *[1] * samples)
    arrays_at = 8 + len(pixels)  # BitsPerSample, then SampleFormat, after the pixels (one sample: in the tags)
    bits, formats = (16, 1) if samples == 1 else (arrays_at, arrays_at + 2 * samples)
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, samples, bits), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, 8), (277, 3, 1, samples), (278, 3, 1, height), (279, 4, 1, len(pixels)), (284, 3, 1, 1),
            (339, 3, samples, formats)]
    entries = b"".join(struct.pack("<HHII" if count > 1 or kind == 4 else "<HHIH2x", tag, kind, count, value)
                       for tag, kind, count, value in tags)
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", arrays_at + len(per_sample)) + pixels + per_sample + ifd)


def test_a_one_page_multiband_tiff_pil_cannot_identify_is_read_by_tifffile(tmp_path):
    single = tmp_path / "single.tif"
    write_chunky_tiff(single, grey16(0)[..., None])  # the writer is right: PIL reads its one-band form
    np.testing.assert_array_equal(read_image(single, channels=1)[..., 0], grey16(0))
    path = tmp_path / "bands.tif"
    write_chunky_tiff(path, bands4(0))
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(path)
    np.testing.assert_array_equal(read_image(path, channels=4), bands4(0))
    assert check_image(path, channels=4) == (H, W)


def marked_bands4() -> np.ndarray:
    """bands4(0) with known values at two pixels: band order and (row, column) placement show."""
    image = bands4(0)
    image[0, 0] = [0, 1000, 40000, 65535]
    image[31, 5] = [7, 8, 9, 10]
    return image


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_a_4band_uint16_tiff_reads_as_its_bands_in_either_layout(tmp_path, planarconfig):
    path = tmp_path / "bands.tif"
    image = marked_bands4()
    tifffile.imwrite(path, image if planarconfig == "contig" else image.transpose(2, 0, 1),
                     photometric="minisblack", planarconfig=planarconfig)
    with tifffile.TiffFile(path) as tiff:
        assert (tiff.pages[0].planarconfig, tiff.series[0].axes) == ((1, "YXS") if planarconfig == "contig"
                                                                     else (2, "SYX"))
    array = read_image(path, channels=4)
    assert array.shape == (H, W, 4) and array.dtype == np.uint16
    assert array[0, 0].tolist() == [0, 1000, 40000, 65535] and array[31, 5].tolist() == [7, 8, 9, 10]
    np.testing.assert_array_equal(array, image)
    assert check_image(path, channels=4) == (H, W)  # the header only: PIL reads the planar one as one I;16 band


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_a_13band_float_tiff_reads_unclipped_without_pil_logging_an_error(tmp_path, caplog, planarconfig):
    bands = np.random.default_rng(0).uniform(-200, 5000, (H, W, 13)).astype(np.float32)
    bands[3, 4] = np.arange(13) * 100.5 - 150
    path = tmp_path / "sentinel.tif"
    tifffile.imwrite(path, bands if planarconfig == "contig" else bands.transpose(2, 0, 1),
                     photometric="minisblack", planarconfig=planarconfig)
    array = read_image(path, channels=13)
    assert array.shape == (H, W, 13) and array.dtype == np.float32
    assert array[3, 4].tolist() == [-150, -49.5, 51, 151.5, 252, 352.5, 453, 553.5, 654, 754.5, 855, 955.5, 1056]
    np.testing.assert_array_equal(array, bands)
    assert check_image(path, channels=13) == (H, W)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("PIL")] == []


def test_a_multiband_tiff_with_another_channel_count_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, bands4(0), photometric="minisblack", planarconfig="contig")
    for check in (check_image, read_image):
        with pytest.raises(DataError, match="the image has 4 channels but model.in_channels=3") as info:
            check(path, channels=3)
        assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL, trying the header-only TIFF
def test_tiffs_tifffile_cannot_make_one_image_of_are_refused_naming_the_file(tmp_path):
    stack, empty, text = tmp_path / "stack.tif", tmp_path / "empty.tif", tmp_path / "text.tif"
    tifffile.imwrite(stack, np.stack([bands4(0), bands4(1)]), photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(empty, grey16(0))
    empty.write_bytes(empty.read_bytes()[:8])  # the header alone, no page
    text.write_text("not an image")
    for path, message in [(stack, r"this TIFF holds a 2x32x64x4 QYXS image \(tifffile axes\); expected Y, X and at "
                                  r"most one band axis"),
                          (empty, "cannot read image .*: tifffile finds no image in this TIFF"),
                          (text, "cannot read image .*: not a TIFF file")]:
        for check in (check_image, read_image):
            with pytest.raises(DataError, match=message) as info:
                check(path, channels=4)
            assert str(path) in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("imagecodecs") is not None, reason="imagecodecs decodes LZW")
def test_an_lzw_multiband_tiff_asks_for_imagecodecs_when_decoded(tmp_path):
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, bands4(0), photometric="minisblack", planarconfig="contig")
    uncompressed = struct.pack("<HHIH", 259, 3, 1, 1)  # the Compression tag: 1, none
    assert path.read_bytes().count(uncompressed) == 1
    path.write_bytes(path.read_bytes().replace(uncompressed, struct.pack("<HHIH", 259, 3, 1, 5)))  # 5: LZW
    assert check_image(path, channels=4) == (H, W)  # the header check decodes no pixels
    with pytest.raises(DataError, match=r"cannot read image .*lzw.tif: .*LZW.* requires the 'imagecodecs' package"):
        read_image(path, channels=4)


@pytest.mark.parametrize("image, photometric, pixel", [
    (np.arange(H * W * 3, dtype=np.uint16).reshape(H, W, 3) * 10, "rgb", [1920, 1930, 1940]),  # PIL: 8-bit RGB
    ((np.arange(H * W * 2) % 256).astype(np.uint8).reshape(H, W, 2), "minisblack", [128, 129]),  # PIL: grey
])
def test_tiffs_pil_would_misread_are_read_by_tifffile(tmp_path, image, photometric, pixel):
    path = tmp_path / "misread.tif"
    tifffile.imwrite(path, image, photometric=photometric, planarconfig="contig")
    array = read_image(path, channels=None)
    assert array[1, 0].tolist() == pixel  # row 1 starts at value 64 * bands (times 10 for the RGB one)
    np.testing.assert_array_equal(array, image)


def test_without_tifffile_a_multiband_tiff_asks_for_it_and_pil_tiffs_still_load(tmp_path, monkeypatch):
    bands, rgb, pages = tmp_path / "bands.tif", tmp_path / "rgb.tif", tmp_path / "pages.tif"
    tifffile.imwrite(bands, bands4(0), photometric="minisblack", planarconfig="contig")
    colours = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(colours).save(rgb)
    Image.fromarray(grey16(0)).save(pages, save_all=True, append_images=[Image.fromarray(grey16(1))])
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile raises ImportError
    for check in (check_image, read_image):
        with pytest.raises(DataError, match=re.escape(f"cannot read image {bands}: ") + ".*tifffile, which reads "
                                            "it, is not installed: pip install tifffile"):
            check(bands, channels=4)
    np.testing.assert_array_equal(read_image(rgb), colours)
    np.testing.assert_array_equal(read_image(pages, channels=2), np.stack([grey16(0), grey16(1)], axis=-1))


def test_an_image_with_another_channel_count_is_named_at_start(tmp_path):
    write_split(tmp_path / "data", "train", [bands4(0), bands4(1)], ".npy")
    write_split(tmp_path / "data", "val", [bands4(2)], ".npy")
    odd = tmp_path / "data" / "train" / "images" / "1.npy"
    np.save(odd, bands4(1)[..., :3])
    with pytest.raises(DataError, match="the image has 3 channels but model.in_channels=4") as info:
        Trainer(load_config(recipe(tmp_path, 4)), progress=False)
    assert str(odd) in str(info.value)


def test_an_integer_type_without_a_default_scale_asks_for_data_scale(tmp_path):
    path = write_split(tmp_path / "data", "train", [grey16(0).astype(np.int32)], ".npy")[0]
    dataset = build_dataset(load_config(recipe(tmp_path, 1)).data, [], "train")
    with pytest.raises(DataError, match="int32 image values have no default scale; set data.scale") as info:
        dataset.validate(3, 255)
    assert str(path) in str(info.value)


def test_stats_report_one_mean_and_std_per_channel_in_scaled_units(tmp_path, capsys):
    paths = write_split(tmp_path / "data", "train", [bands4(0), bands4(1)], ".npy")
    pixels = np.concatenate([np.load(path).reshape(-1, 4) / 65535 for path in paths])
    mean, std = image_mean_std(paths, channels=4)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=0, atol=1e-12)
    mean, _ = image_mean_std(paths, channels=4, scale=1.0)
    np.testing.assert_allclose(mean, pixels.mean(0) * 65535, rtol=1e-12)

    result = load_tool("dataset_stats").main(["--config", str(recipe(tmp_path, 4))])
    np.testing.assert_allclose(result["data"]["mean"], pixels.mean(0), rtol=0, atol=1e-12)
    assert result["stored_values"] == {0: 2 * H * 22, 1: 2 * H * 21, 2: 2 * H * 21}  # stripes of 22, 21, 21 columns
    assert "mask values as stored (value: pixels), before data.label_map/reduce_zero_label: 0: 1408, 1: 1344, " \
           "2: 1344\n" in capsys.readouterr().out


def test_display_shows_grey_as_grey_and_the_first_three_bands():
    grey = torch.tensor([[[[0, 65535, 32768]]]], dtype=torch.uint16)  # [1, 1, 1, 3]
    assert display_images(grey, None)[0, :, 0].tolist() == [[0, 255, 128]] * 3
    bands = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 4, 1, 1)
    assert display_images(bands, None).flatten().tolist() == [0, 128, 255]
    normalised = (torch.tensor([0.2, 0.9]).view(1, 1, 1, 2) - 0.5) / 0.25
    assert denormalize(normalised, [0.5], [0.25])[0, :, 0].tolist() == [[51, 230]] * 3


def test_predict_reads_16bit_images_as_training_did(tmp_path, capsys):
    write_split(tmp_path / "data", "train", [grey16(0), grey16(1)], ".tif")
    write_split(tmp_path / "data", "val", [grey16(2)], ".tif")
    Trainer(load_config(recipe(tmp_path, 1, train__log_images=0)), progress=False).fit()
    code, _, err = run_tool(capsys, load_tool("predict"), "--checkpoint", tmp_path / "run" / "best.pt",
                            "--input", tmp_path / "data" / "val" / "images", "--output", tmp_path / "out")
    assert code == 0, err
    with Image.open(tmp_path / "out" / "0.png") as mask, Image.open(tmp_path / "out" / "overlays" / "0.png") as overlay:
        assert mask.size == (W, H) and overlay.mode == "RGB" and overlay.width == W


# -- every decoder has PIL's pixel limit, checked from the header ---------------------------------

CLAIMED = 100_000  # a side: 10^10 pixels, 74.5 GiB as 4-band uint16


def claiming(path: Path, height: int, width: int, page: int = 0) -> Path:
    """``path``, a TIFF, with page ``page``'s header rewritten to claim ``width x height`` (its few bytes of
    data unchanged): a file of a few hundred bytes that would decode to a huge image."""
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        tags = tiff.pages[page].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)
        tags["RowsPerStrip"].overwrite(height)  # one strip, as the file has: tifffile finds the header consistent
    return path


def tiff_bomb(path: Path) -> Path:
    """A 4-band uint16 TIFF of a few hundred bytes whose header claims 100000x100000 (tifffile reads it)."""
    tifffile.imwrite(path, np.zeros((1, 1, 4), np.uint16), photometric="minisblack", planarconfig="contig")
    return claiming(path, CLAIMED, CLAIMED)


def npy_bomb(path: Path) -> Path:
    with open(path, "wb") as handle:  # the header of a (100000, 100000, 4) uint16 array, then 64 bytes
        np.lib.format.write_array_header_1_0(handle, {"descr": "<u2", "fortran_order": False,
                                                      "shape": (CLAIMED, CLAIMED, 4)})
        handle.write(bytes(64))
    return path


def pages_bomb(path: Path) -> Path:
    """A multi-page TIFF of 4 one-band pages (PIL reads it) whose third page claims 100000x100000."""
    pages = [Image.fromarray(np.zeros((1, 1), np.uint16)) for _ in range(4)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return claiming(path, CLAIMED, CLAIMED, page=2)


def assert_refused_from_the_header(path: Path, error: str) -> None:
    assert path.stat().st_size < 1000
    assert error == (f"{path}: its header claims a {CLAIMED}x{CLAIMED} image ({CLAIMED ** 2} pixels), more than the "
                     f"178956970 pixels an image may have (twice PIL.Image.MAX_IMAGE_PIXELS, PIL's guard against "
                     f"decompression bombs); nothing was decoded. Cut an image this large into tiles")


@pytest.mark.parametrize("bomb", [tiff_bomb, npy_bomb, pages_bomb])
def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(tmp_path, bomb):
    import tracemalloc

    path = bomb(tmp_path / ("bomb.npy" if bomb is npy_bomb else "bomb.tif"))
    tracemalloc.start()
    try:
        for check in (check_image, read_image, lambda path, channels: check_image(path, True, channels)):
            with pytest.raises(DataError) as info:
                check(path, channels=4)
            assert_refused_from_the_header(path, str(info.value))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # nothing the size of the image (74.5 GiB) was allocated


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, from MAX_IMAGE_PIXELS on
def test_the_pixel_limit_is_pils_for_every_decoder(tmp_path, monkeypatch):
    """At PIL.Image.MAX_IMAGE_PIXELS = 1000 a 2048-pixel image is refused by PIL (over 2 x 1000) and by the
    decoders of tifffile and .npy alike; at 1024 (limit 2048) each reads."""
    png, tif, npy = tmp_path / "a.png", tmp_path / "a.tif", tmp_path / "a.npy"
    Image.fromarray(grey16(0)).save(png)
    tifffile.imwrite(tif, bands4(0), photometric="minisblack", planarconfig="contig")
    np.save(npy, bands4(0))
    channels = {png: 1, tif: 4, npy: 4}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for path in (png, tif, npy):
        with pytest.raises(DataError, match=r"2048 pixels.*exceeds limit of 2000 pixels|2048 pixels\), more than "
                                            r"the 2000 pixels an image may have") as info:
            read_image(path, channels[path])
        assert str(path) in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024)
    for path in (png, tif, npy):
        assert read_image(path, channels[path]).shape == (H, W, channels[path])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's "no limit" is ours too
    assert read_image(tif, 4).shape == (H, W, 4)


def test_predict_train_and_stats_refuse_the_bomb_in_one_line(tmp_path, capsys):
    """The issue's cases: predict with a 4-channel model, train with data.verify: full, and stats."""
    from segfocal.cli import main
    from segfocal.models import build_model

    write_split(tmp_path / "data", "train", [bands4(0)], ".tif")
    write_split(tmp_path / "data", "val", [bands4(1)], ".tif")
    bomb = tiff_bomb(tmp_path / "data" / "train" / "images" / "1.tif")
    Image.fromarray(stripes()).save(tmp_path / "data" / "train" / "masks" / "1.png")
    config = recipe(tmp_path, 4, data__verify="full")
    weights = tmp_path / "weights.pt"
    torch.save(build_model(load_config(config).model, 3).state_dict(), weights)
    commands = {"predict": ["--config", config, "--checkpoint", weights, "--input", bomb, "--output", tmp_path / "out"],
                "train": ["--config", config], "stats": ["--config", config]}
    for command, argv in commands.items():
        with pytest.raises(SystemExit) as exited:
            main([command, *map(str, argv), *(["--max-pixels", "0"] if command == "predict" else [])])
        assert exited.value.code == 2, command
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ")
        assert_refused_from_the_header(bomb, error.removeprefix("error: "))
    # above --max-pixels a TIFF is read window by window (memory bounded by a window): its one strip fails
    with pytest.raises(SystemExit) as exited:
        main(["predict", *map(str, commands["predict"])])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot read rows 0:512, columns 0:512 of ") and str(bomb) in error
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "out").exists()  # nor an empty overlays/


def test_a_one_band_tiff_only_tifffile_reads_passes_the_header_check(tmp_path):
    """A float64 page PIL cannot identify goes to tifffile with no band axis: one channel, as before."""
    path = tmp_path / "float64.tif"
    tifffile.imwrite(path, np.arange(H * W, dtype=np.float64).reshape(H, W))
    assert check_image(path, channels=1) == (H, W)
    np.testing.assert_array_equal(read_image(path, channels=1)[..., 0], np.arange(H * W).reshape(H, W))
    with pytest.raises(DataError, match="the image has 1 channel but model.in_channels=3"):
        read_image(path, channels=3)
