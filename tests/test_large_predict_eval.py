"""Predict, eval and stats at any size: a TIFF or .npy above --max-pixels (a Zarr image always) is predicted tile by
tile into a tiled TIFF or a Zarr array identical to whole-image slide inference, each window read alone; eval --pred
scores such masks block by block; stats counts a data.patches split block by block."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from segfocal.config import load_config
from segfocal.data import patches, regions
from segfocal.evaluation import mask_folders
from segfocal.models import build_model
from segfocal.segmenter import Segmenter

from large_data import large_recipe, mosaic, write_array
from recipes import load_tool, run_tool, tiny_recipe

zarr = pytest.importorskip("zarr")
pytestmark = pytest.mark.usefixtures("one_thread")
PREDICT, EVAL, STATS = load_tool("predict"), load_tool("eval"), load_tool("dataset_stats")
CROP, STRIDE = [64, 64], [40, 40]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained tiny UNet with 64x64 windows every 40 pixels, and the slide-mode mask of a 300x300 image."""
    root = tmp_path_factory.mktemp("tiled")
    config = tiny_recipe(root, eval__crop_size=CROP, eval__stride=STRIDE)
    cfg = load_config(config)
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, 6).state_dict(), root / "weights.pt")
    image = mosaic(7)[0]
    slide = Segmenter.from_checkpoint(root / "weights.pt", config=config, mode="slide").predict(image)
    return SimpleNamespace(config=config, weights=root / "weights.pt", image=image, slide=slide)


def predict(capsys, model, source, output, *extra):
    return run_tool(capsys, PREDICT, "--config", model.config, "--checkpoint", model.weights, "--input", source,
                    "--output", output, *extra)


@pytest.mark.parametrize("suffix,fmt", [(".tif", "tiff"), (".npy", "zarr"), (".zarr", "tiff")])
def test_a_large_image_is_predicted_tile_by_tile_as_whole_image_slide_inference_predicts_it(
        capsys, model, tmp_path, monkeypatch, suffix, fmt):
    source = write_array(tmp_path / "in" / f"big{suffix}", model.image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # PIL would refuse it: nothing opens it with PIL
    reads = []
    original = regions.Region.read
    monkeypatch.setattr(regions.Region, "read", lambda self, *box: reads.append(box) or original(self, *box))
    limit = [] if suffix == ".zarr" else ["--max-pixels", 300 * 300 - 1]  # a Zarr image goes tile by tile always
    code, stdout, stderr = predict(capsys, model, source.parent, tmp_path / "out", "--format", fmt, *limit)
    assert code == 0, stderr
    assert "predicting it tile by tile" in stderr
    assert f"wrote 1 mask to {tmp_path / 'out'} (1 mask tile by tile, without an overlay)" in stdout
    target = tmp_path / "out" / f"big{'.tif' if fmt == 'tiff' else '.zarr'}"
    mask = tifffile.imread(target) if fmt == "tiff" else zarr.open(str(target), mode="r")[...]
    np.testing.assert_array_equal(mask, model.slide)
    assert len(set(np.unique(model.slide))) > 2  # an untrained model still predicts several classes here
    assert reads and max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in reads) <= 64 * 64  # one window at a time
    if fmt == "tiff":
        with tifffile.TiffFile(target) as tiff:
            assert tiff.pages[0].is_tiled and tiff.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE


def test_within_the_limit_the_mask_is_a_png_as_before(capsys, model, tmp_path):
    source = write_array(tmp_path / "in" / "small.tif", model.image)
    code, _, stderr = predict(capsys, model, source, tmp_path / "out")
    assert code == 0 and "tile by tile" not in stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["overlays", "small.png"]


def test_a_tiled_mask_that_would_replace_its_input_is_refused(capsys, model, tmp_path):
    source = write_array(tmp_path / "big.tif", model.image)
    before = source.read_bytes()
    code, _, stderr = predict(capsys, model, source, tmp_path, "--max-pixels", 100)
    assert code == 2 and "would overwrite the --input image" in stderr and "\n" not in stderr.strip()
    assert source.read_bytes() == before


def test_eval_scores_large_masks_block_by_block_as_the_whole_masks_score(capsys, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    truth = [mosaic(seed)[1] for seed in (1, 2)]
    predicted = [np.where(rng.random(mask.shape) < 0.2, rng.integers(0, 6, mask.shape), mask).astype(np.uint8)
                 for mask in truth]
    for number, (gt, pred) in enumerate(zip(truth, predicted)):
        write_array(tmp_path / "gt" / f"{number}{('.npy', '.zarr')[number]}", gt)
        write_array(tmp_path / "pred" / f"{number}.tif", np.where(gt == 255, 0, pred).astype(np.uint8))
    monkeypatch.setattr(regions, "WHOLE_READ_PIXELS", 100)  # the TIFFs count as large too
    boxes = []
    original = regions.blocks
    monkeypatch.setattr(mask_folders, "blocks", lambda region, pixels=2 ** 22: boxes.extend(original(region, 64 * 64))
                        or original(region, 64 * 64))
    code, stdout, stderr = run_tool(capsys, EVAL, "--pred", tmp_path / "pred", "--gt", tmp_path / "gt",
                                    "--num-classes", 6, "--ignore-index", 255, "--output", tmp_path / "report")
    assert code == 0, stderr
    areas = [(y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes]
    assert sum(areas) == 2 * 300 * 300 and max(areas) <= 64 * 64  # both pairs, block by block
    gt, pred = np.concatenate([m.ravel() for m in truth]), np.concatenate([m.ravel() for m in predicted])
    scored = gt != 255
    confusion = np.bincount(gt[scored].astype(np.int64) * 6 + pred[scored], minlength=36).reshape(6, 6)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert f"mIoU {100 * iou.mean():.2f}" in " ".join(stdout.split())



def test_a_bad_value_in_a_large_mask_names_the_block_its_count_is_of(capsys, tmp_path, monkeypatch):
    gt = mosaic(1)[1]
    write_array(tmp_path / "gt" / "0.npy", gt)
    write_array(tmp_path / "pred" / "0.npy", np.full(gt.shape, 9, np.uint8))  # every pixel outside 0..5
    monkeypatch.setattr(mask_folders, "blocks", lambda region, pixels=2 ** 22: regions.blocks(region, 64 * 64))
    code, _, stderr = run_tool(capsys, EVAL, "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--num-classes", 6,
                               "--ignore-index", 255, "--output", tmp_path / "report")
    first = regions.blocks(regions.MaskRegion(tmp_path / "gt" / "0.npy"), 64 * 64)
    y0, y1, x0, x1 = next(iter(first))
    scored = int((gt[y0:y1, x0:x1] != 255).sum())
    assert code == 2 and f"{scored} pixels have predicted values [9]" in stderr
    assert f"(in the block of rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1}: a large mask is checked block by block)" \
        in stderr

def test_eval_of_a_checkpoint_on_a_patches_split_counts_its_images_not_its_tiles(capsys, model, tmp_path):
    config = large_recipe(tmp_path, eval__crop_size=CROP, eval__stride=STRIDE)
    code, stdout, stderr = run_tool(capsys, EVAL, "--config", config, "--checkpoint", model.weights, "--split", "val",
                                    "--output", tmp_path / "report")
    assert code == 0, stderr
    assert f"1 image of split 'val', checkpoint {model.weights}" in stdout  # its 25 tiles of 64x64 are one image
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["num_images"] == 1


def test_stats_counts_a_patches_split_block_by_block(capsys, tmp_path, monkeypatch):
    config = large_recipe(tmp_path)
    reads = []
    original = regions.Region.read
    monkeypatch.setattr(regions.Region, "read", lambda self, *box: reads.append(box) or original(self, *box))
    monkeypatch.setattr(patches, "blocks", lambda region, pixels=2 ** 22: regions.blocks(region, 64 * 64))
    code, stdout, stderr = run_tool(capsys, STATS, "--config", config)
    assert code == 0, stderr
    assert "split 'train': 2 images," in stdout  # the images, not the tiles the split is cut into
    images, masks = zip(*(mosaic(seed) for seed in (1, 2)))
    counts = np.bincount(np.concatenate([mask.ravel() for mask in masks]), minlength=256)
    for name, count in zip(["background", "slab", "ellipse", "triangle", "line", "square"], counts):
        assert any(line.split()[:2] == [name, str(count)] for line in stdout.splitlines()), name
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.float64) / 255
    assert f"mean: [{', '.join(f'{v:.4f}' for v in pixels.mean(0))}]" in stdout
    assert f"std: [{', '.join(f'{v:.4f}' for v in pixels.std(0))}]" in stdout
    assert reads and max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in reads) <= 64 * 64


def test_a_calibrated_segmenter_predicts_tile_by_tile_as_it_predicts_whole(model, tmp_path):
    """The calibration's bias is added before the argmax of every tile (seen red with the raw argmax)."""
    from segfocal.evaluation.calibration import Calibration
    from segfocal.tiled import predict_tiled

    empty = [[0] * 6 for _ in range(6)]
    bias = [0.0, 0.0, 0.08, 0.0, -0.05, 0.03]  # the untrained model's logits differ by hundredths
    calibration = Calibration(bias=bias, metric="miou", split="val", before=0.0, after=0.0, cross_fitted=None,
                              folds=2, num_images=1, confusion_before=empty, confusion_after=empty,
                              confusion_cross_fitted=None)
    segmenter = Segmenter.from_checkpoint(model.weights, config=model.config, mode="slide")
    segmenter = Segmenter(segmenter.model, segmenter.config, segmenter.device, mode="slide", calibration=calibration)
    whole = segmenter.predict(model.image)
    assert (whole != model.slide).mean() > 0.05  # the bias changes decisions
    target = predict_tiled(segmenter, write_array(tmp_path / "big.npy", model.image), tmp_path / "out")
    np.testing.assert_array_equal(tifffile.imread(target), whole)


def test_blocks_of_the_mask_give_whole_image_slide_inference_across_their_borders(model, tmp_path, monkeypatch):
    """With 256-pixel blocks the 300x300 image is four blocks, and windows (64 every 40) straddle their
    borders: each block adds every window touching it, so the mask still equals slide mode's."""
    from segfocal import tiled

    monkeypatch.setattr(tiled, "LOGITS_BYTES", 1)  # the smallest blocks: one output tile
    blocks = []
    original = tiled._block_mask
    monkeypatch.setattr(tiled, "_block_mask", lambda segmenter, region, block, *rest:
                        blocks.append(block) or original(segmenter, region, block, *rest))
    segmenter = Segmenter.from_checkpoint(model.weights, config=model.config, mode="slide")
    target = tiled.predict_tiled(segmenter, write_array(tmp_path / "big.npy", model.image), tmp_path / "out")
    assert blocks == [(0, 256, 0, 256), (0, 256, 256, 300), (256, 300, 0, 256), (256, 300, 256, 300)]
    np.testing.assert_array_equal(tifffile.imread(target), model.slide)


def test_block_side_follows_the_classes_and_the_window_never_the_image():
    from segfocal.tiled import LOGITS_BYTES, block_side

    assert block_side(6, [512, 512], [512, 512]) == 3072  # sqrt(2^28 / 24) = 3344, aligned to the 512 stride
    assert block_side(6, [512, 512], [384, 384]) == 3072  # lcm(256, 384) = 768
    assert block_side(19, [512, 512], [341, 341]) == 1792  # lcm(256, 341) too large: whole tiles
    assert block_side(150, [512, 512], [256, 256]) == 512
    assert block_side(150, [2048, 2048], [1024, 1024]) == 2048  # at least one window
    for classes in (2, 19, 150, 1000):
        side = block_side(classes, [256, 256], [256, 256])
        assert side % 256 == 0 and (4 * classes * side ** 2 <= LOGITS_BYTES or side == 256)
