"""Readable overlays: a default palette far from grey, ``data.palette``, legends, lossless PNG overlays.

Colour distances are CIELAB ΔE76, computed here from the sRGB formula (not segfocal's own code).
ΔE 2.3 is a just-noticeable difference; for scale, the well-known lists lose much once their greys
and pastels are dropped (HSV saturation < 0.5): Kelly's 22 keep a minimum of 18 over 12 colours,
Trubetskoy's 20 distinct colours 29. The prediction tests use an untrained tiny UNet, as
test_predict_safety.py does.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.config import ConfigError, load_config
from segfocal.data import default_palette
from segfocal.engine.run_logger import RunLogger
from segfocal.models import build_model
from segfocal.visualize import legend, palette_of

from recipes import load_tool, run_tool, tiny_recipe

NAMES = ["background", "slab", "ellipse", "triangle", "line", "square"]
PALETTE = [[200, 30, 30], [30, 160, 30], [40, 40, 220], [230, 200, 0], [190, 0, 190], [0, 180, 200]]
SWATCH_INSIDE = 10 * 10  # a legend swatch is 12x12 pixels with a black outline
PREDICT = load_tool("predict")


def lab(rgb):
    """CIELAB (D65) of 8-bit sRGB values ``(..., 3)``, float64."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                             [0.0193339, 0.1191920, 0.9503041]]).T
    f = xyz / [0.95047, 1.0, 1.08883]
    f = np.where(f > 216 / 24389, np.cbrt(f), (24389 / 27 * f + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def min_pairwise(colours):
    points = lab(colours)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return distances[~np.eye(len(points), dtype=bool)].min()


def saturation_and_value(colours):
    c = np.asarray(colours, dtype=np.float64)
    return (c.max(1) - c.min(1)) / c.max(1), c.max(1) / 255


# -- the default palette -------------------------------------------------------------------------

def test_the_first_default_colours_stay_apart_and_off_grey_even_blended_over_a_grey_image():
    colours = np.asarray(default_palette(12), dtype=np.float64)
    assert min_pairwise(colours) > 40  # measured 46.4; the old default (CamVid's) had a grey and black
    for grey in (32, 128, 224):  # a dark, a mid and a light electron-microscopy image, overlay opacity 0.5
        blended = 0.5 * colours + 0.5 * grey
        assert min_pairwise(blended) > 20  # measured >= 24
        assert np.linalg.norm(lab(blended) - lab([grey] * 3), axis=-1).min() > 20  # measured >= 26


@pytest.mark.parametrize("count", [1, 6, 12, 40, 256])
def test_default_palette_is_saturated_distinct_and_a_prefix_of_longer_ones(count):
    palette = default_palette(count)
    assert len(palette) == count and len({tuple(c) for c in palette}) == count
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)
    saturation, value = saturation_and_value(palette)
    assert saturation.min() >= 0.5 and value.min() >= 0.5
    assert palette == default_palette(256)[:count]  # deterministic: class i keeps its colour in any run


def test_a_default_palette_larger_than_its_candidates_is_refused():
    with pytest.raises(ValueError, match="data.palette"):
        default_palette(100_000)


# -- data.palette --------------------------------------------------------------------------------

def test_data_palette_is_loaded_and_chosen_over_the_default(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path, data__palette=PALETTE))
    assert cfg.data.palette == PALETTE and palette_of(cfg.data) == PALETTE
    assert palette_of(load_config(tiny_recipe(tmp_path)).data) == default_palette(6)


@pytest.mark.parametrize("palette, message", [
    (PALETTE[:5], "data.palette has 5 colours for data.num_classes=6"),
    (PALETTE[:5] + [[0, 256, 0]], r"data.palette\[5\]\[1\] must be an integer in \[0, 255\], got 256"),
    (PALETTE[:5] + [[-1, 0, 0]], r"data.palette\[5\]\[0\] must be an integer in \[0, 255\], got -1"),
    ([[1, 2]] + PALETTE[1:], r"data.palette\[0\] must be 3 items, each an integer in \[0, 255\], got \[1, 2\]"),
], ids=["length", "above-255", "negative", "two-values"])
def test_a_wrong_data_palette_is_refused_at_load_naming_the_key(tmp_path, palette, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_recipe(tmp_path, data__palette=palette))


# -- the legend ----------------------------------------------------------------------------------

def colour_counts(strip, colours):
    return [int((strip == np.asarray(c, dtype=np.uint8)).all(-1).sum()) for c in colours]


@pytest.mark.parametrize("width, scale", [(30, 1), (300, 1), (1300, 2)])
def test_a_legend_has_a_swatch_of_each_colour_and_is_scaled_up_for_a_wide_image(width, scale):
    strip = legend(PALETTE, NAMES, width)
    assert strip.dtype == np.uint8 and strip.shape[1] >= width and strip.shape[2] == 3
    assert all(count >= SWATCH_INSIDE * scale ** 2 for count in colour_counts(strip, PALETTE))
    assert (strip == 255).all(-1).mean() > 0.5  # on white


# -- predict: masks and overlays -----------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A config with data.palette and the state dict of an untrained model for it that predicts
    classes 0 and 2 only (the others' logits lowered by 100), so that a legend can leave some out."""
    root = tmp_path_factory.mktemp("overlays")
    config = tiny_recipe(root, data__palette=PALETTE)
    torch.manual_seed(0)
    state = build_model(load_config(config).model, len(PALETTE)).state_dict()
    state["segmentation_head.0.bias"][[1, 3, 4, 5]] = -100.0
    weights = root / "weights.pt"
    torch.save(state, weights)
    return SimpleNamespace(config=config, weights=weights)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A blocky random 40x24 RGB image, so that predictions vary across it."""
    blocks = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("images") / "cell.png"
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:24, :40]).save(path)
    return path


def predict(capsys, model, image, output, *extra):
    code, _, stderr = run_tool(capsys, PREDICT, "--config", model.config, "--checkpoint", model.weights,
                               "--input", image, "--output", output, *extra)
    assert code == 0, stderr


def test_predict_colours_masks_and_overlays_by_data_palette_with_a_legend_of_the_classes_found(
        capsys, model, image, tmp_path):
    predict(capsys, model, image, tmp_path)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "cell.png", "overlays", "overlays/cell.png"]
    with Image.open(tmp_path / "cell.png") as mask_file:
        assert mask_file.getpalette()[:18] == [v for colour in PALETTE for v in colour]
        mask = np.array(mask_file)
    with Image.open(tmp_path / "overlays" / "cell.png") as overlay_file:
        assert overlay_file.format == "PNG" and overlay_file.mode == "RGB"
        overlay = np.array(overlay_file)
    rgb = np.array(Image.open(image)).astype(np.float32)
    height, width = mask.shape
    assert overlay.shape[0] > height and overlay.shape[1] >= width  # the image, the legend strip below it
    expected = np.round(0.5 * rgb + 0.5 * np.asarray(PALETTE, dtype=np.float32)[mask])  # overlay_masks, opacity 0.5
    np.testing.assert_array_equal(overlay[:height, :width], expected.astype(np.uint8))
    assert set(np.unique(mask).tolist()) == {0, 2}
    counts = colour_counts(overlay[height:], PALETTE)  # a swatch for each class found, none for the others
    assert all(counts[c] >= SWATCH_INSIDE for c in (0, 2)) and all(counts[c] == 0 for c in (1, 3, 4, 5))


def test_predict_writes_a_jpeg_overlay_on_request(capsys, model, image, tmp_path):
    predict(capsys, model, image, tmp_path, "--overlay-format", "jpg")
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "cell.png", "overlays", "overlays/cell.jpg"]
    with Image.open(tmp_path / "overlays" / "cell.jpg") as overlay, Image.open(tmp_path / "cell.png") as mask:
        assert overlay.format == "JPEG" and mask.format == "PNG" and overlay.height > mask.height


# -- TensorBoard ---------------------------------------------------------------------------------

def test_tensorboard_overlays_use_data_palette_and_a_legend_of_every_class_is_logged(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path, data__palette=PALETTE))
    logged = {}
    logger = SimpleNamespace(writer=object(), image_size=0,
                             images=lambda tag, images, step: logged.setdefault(tag, images))
    target = torch.arange(6).repeat_interleave(8).view(6, 8)  # one row per class
    normalised = (torch.full((3, 6, 8), 0.5) - torch.tensor(cfg.data.mean).view(3, 1, 1)) / torch.tensor(
        cfg.data.std).view(3, 1, 1)
    RunLogger.examples(logger, [(normalised, target, target)], cfg.data, NAMES, step=1)
    assert set(logged) == {"val/input", "val/label", "val/prediction", "val/legend"}
    label = logged["val/label"][0].permute(1, 2, 0).numpy().astype(np.float32)
    grey = logged["val/input"][0, :, 0, 0].numpy().astype(np.float32)
    np.testing.assert_array_equal(label[:, 0], np.round(0.5 * grey + 0.5 * np.float32(PALETTE)))
    key = logged["val/legend"][0].permute(1, 2, 0).numpy()
    assert all(count >= SWATCH_INSIDE for count in colour_counts(key, PALETTE))
