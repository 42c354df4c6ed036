"""Segmenter, the Python inference API, on one tiny model trained for an epoch: its masks and
probabilities against predict_logits on images normalised here and against tools/predict.py, every
input kind, batching of lists, the mode/flip overrides, bare state dicts and the errors."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from recipes import load_tool, run_tool, tiny_recipe
from segfocal.config import load_config
from segfocal.data import DataError
from segfocal.engine.checkpoint import CheckpointError
from segfocal.engine.distributed import resolve_device
from segfocal.engine.restore import restore_model
from segfocal.engine.trainer import Trainer
from segfocal.evaluation import predict_logits
from segfocal.models import build_model
from segfocal.segmenter import Segmenter

NUM_CLASSES = 6
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """``last.pt`` of a one-epoch run; crop 32 / stride 24 make slide mode differ from whole on the test images."""
    root = tmp_path_factory.mktemp("segmenter")
    config = tiny_recipe(root, train__epochs=1, train__log_images=0, eval__crop_size=[32, 32], eval__stride=[24, 24])
    cfg = load_config(config)
    Trainer(cfg, progress=False).fit()
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(random_image(rng, 37, 53)).save(images / "odd.png")
    Image.fromarray(random_image(rng, 32, 32)).save(images / "square.png")
    last = Path(cfg.work_dir) / "last.pt"
    return SimpleNamespace(root=root, config=config, cfg=cfg, last=last, images=images,
                           model=restore_model(cfg, last, CPU))  # the reference, rebuilt from the YAML file


@pytest.fixture(scope="module")
def segmenter(run):
    """On the CPU in full precision, as the references here (device=None would take a GPU and its autocast)."""
    return Segmenter.from_checkpoint(run.last, device="cpu")


def random_image(rng, width, height):
    """Blocks of colour plus noise, so the model predicts more than one class."""
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-20, 21, size=image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def rgb(run, name):
    return np.array(Image.open(run.images / name).convert("RGB"))


def reference_logits(run, image, **inference):
    """predict_logits on ``image`` (H, W, 3) uint8, normalised here as (x / 255 - mean) / std."""
    data = run.cfg.data
    normalised = (image.astype(np.float32) / 255.0 - np.float32(data.mean)) / np.float32(data.std)
    batch = torch.from_numpy(normalised.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.no_grad():
        return predict_logits(run.model, batch, NUM_CLASSES, **inference)[0]


def differing(first, second):
    return int((np.asarray(first) != np.asarray(second)).sum())


def test_from_a_checkpoint_alone_predicts_the_model_argmax_and_what_tools_predict_writes(capsys, run, segmenter,
                                                                                          tmp_path):
    default = Segmenter.from_checkpoint(run.last)  # the device the tool picks too: the GPU if there is one
    assert default.device == resolve_device("auto") and segmenter.device == CPU
    assert default.config == run.cfg  # the config saved in last.pt is the YAML file's
    assert default.num_classes == NUM_CLASSES
    assert default.class_names == ["background", "slab", "ellipse", "triangle", "line", "square"]
    assert not default.model.training and (default.mode, default.flip) == ("whole", False)

    code, _, stderr = run_tool(capsys, load_tool("predict"), "--config", run.config, "--checkpoint", run.last,
                               "--input", run.images, "--output", tmp_path)
    assert code == 0, stderr
    for name in ("odd.png", "square.png"):
        mask = segmenter.predict(run.images / name)
        assert mask.dtype == np.uint8 and mask.shape == rgb(run, name).shape[:2]
        assert differing(mask, reference_logits(run, rgb(run, name)).argmax(0).numpy()) <= 2, name  # float ties
        assert differing(default.predict(run.images / name), np.array(Image.open(tmp_path / name))) <= 2, name
        assert len(np.unique(mask)) > 1, name  # a real test: more than one class predicted


def test_a_path_a_pil_image_and_an_array_give_the_same_mask(run, segmenter):
    path = run.images / "odd.png"
    expected = segmenter.predict(str(path))
    image = rgb(run, "odd.png")
    with Image.open(path) as pil:
        np.testing.assert_array_equal(segmenter.predict(pil), expected)
        np.testing.assert_array_equal(segmenter.predict(pil.convert("RGBA")), expected)  # converted to RGB
    np.testing.assert_array_equal(segmenter.predict(path), expected)
    np.testing.assert_array_equal(segmenter.predict(image), expected)
    np.testing.assert_array_equal(segmenter.predict(image[:, ::-1][:, ::-1]), expected)  # a non-contiguous view

    grey = image[..., 1]  # (H, W) is repeated to RGB
    np.testing.assert_array_equal(segmenter.predict(grey), segmenter.predict(np.repeat(grey[..., None], 3, axis=2)))
    np.testing.assert_array_equal(segmenter.predict(Image.fromarray(grey)), segmenter.predict(grey))


def test_a_list_of_mixed_sizes_is_run_in_batches_of_one_size_and_equals_one_by_one(run, segmenter):
    odd, square = rgb(run, "odd.png"), rgb(run, "square.png")
    images = [odd, square, odd[::-1].copy(), run.images / "square.png", odd[:, ::-1].copy()]
    cfg = run.cfg.model_copy(update={"eval": run.cfg.eval.model_copy(update={"batch_size": 2})})
    model = restore_model(run.cfg, run.last, CPU).train()
    batched = Segmenter(model, cfg, device="cpu")
    assert not model.training  # the constructor puts the model in eval mode
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        masks, probabilities = batched.predict(images), batched.predict_proba(tuple(images))
    finally:
        hook.remove()
    # the three 53x37 images in a batch of 2 and one of 1, the two 32x32 ones together (the UNet pads nothing)
    assert sorted(seen) == sorted([(2, 3, 53, 37), (1, 3, 53, 37), (2, 3, 32, 32)] * 2)
    assert isinstance(masks, list) and isinstance(probabilities, list) and len(masks) == len(probabilities) == 5
    for image, mask, proba in zip(images, masks, probabilities):
        assert differing(mask, segmenter.predict(image)) <= 2
        np.testing.assert_allclose(proba, segmenter.predict_proba(image), atol=1e-5)


def test_predict_proba_is_a_distribution_over_classes_whose_argmax_is_predict(run, segmenter):
    image = rgb(run, "odd.png")
    proba = segmenter.predict_proba(image)
    assert proba.dtype == np.float32 and proba.shape == (NUM_CLASSES, *image.shape[:2])
    assert proba.min() >= 0
    np.testing.assert_allclose(proba.astype(np.float64).sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(axis=0), segmenter.predict(image))
    expected = reference_logits(run, image).softmax(dim=0).numpy()
    np.testing.assert_allclose(proba, expected, atol=1e-5)


@pytest.mark.parametrize("overrides,inference", [
    ({"flip": True}, {"flip": True}),
    ({"mode": "slide"}, {"mode": "slide", "crop_size": (32, 32), "stride": (24, 24)}),
    ({"mode": "slide", "flip": True}, {"mode": "slide", "crop_size": (32, 32), "stride": (24, 24), "flip": True}),
])
def test_mode_and_flip_overrides_run_that_inference(run, segmenter, overrides, inference):
    image = rgb(run, "odd.png")
    overridden = Segmenter.from_checkpoint(run.last, device="cpu", **overrides)
    assert overridden.config.eval == run.cfg.eval  # the config itself is left as it was
    proba = overridden.predict_proba(image)
    np.testing.assert_allclose(proba, reference_logits(run, image, **inference).softmax(dim=0).numpy(), atol=1e-5)
    assert not np.allclose(proba, segmenter.predict_proba(image), atol=1e-3)  # not the default whole/no-flip run


def test_a_bare_state_dict_needs_a_config_and_with_one_predicts_as_the_checkpoint(run, segmenter, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(run.model.state_dict(), weights)
    with pytest.raises(CheckpointError, match="config") as caught:
        Segmenter.from_checkpoint(weights)
    assert str(weights) in str(caught.value)

    expected = segmenter.predict([run.images / "odd.png", run.images / "square.png"])
    for config in (run.config, str(run.config), run.cfg):
        bare = Segmenter.from_checkpoint(weights, config=config, device="cpu")
        for mask, reference in zip(bare.predict([run.images / "odd.png", run.images / "square.png"]), expected):
            np.testing.assert_array_equal(mask, reference)


def test_the_val_pipeline_resizing_is_undone_on_the_logits(capsys, run, tmp_path):
    resized = tmp_path / "resized.yaml"
    resized.write_text(yaml.safe_dump({"_base_": str(run.config), "augment": {
        "val": [{"__class_fullname__": "Resize", "height": 64, "width": 48}]}}))
    segmenter = Segmenter.from_checkpoint(run.last, config=resized)  # on the tool's device
    code, _, stderr = run_tool(capsys, load_tool("predict"), "--config", resized, "--checkpoint", run.last,
                               "--input", run.images / "odd.png", "--output", tmp_path / "out")
    assert code == 0, stderr
    mask = segmenter.predict(run.images / "odd.png")
    assert mask.shape == (53, 37)
    assert differing(mask, np.array(Image.open(tmp_path / "out" / "odd.png"))) <= 2


@pytest.mark.parametrize("array", [
    np.zeros((32, 32, 3), dtype=bool),         # not numbers
    np.zeros((32, 32, 4), dtype=np.uint8),     # RGBA
    np.zeros((3, 32, 32), dtype=np.uint8),     # channels first
    np.zeros((1, 32, 32, 3), dtype=np.uint8),  # a batch
    np.zeros((0, 32, 3), dtype=np.uint8),      # empty
], ids=["bool", "rgba", "chw", "batch", "empty"])
def test_an_array_of_the_wrong_shape_or_dtype_says_what_is_expected(segmenter, array):
    expected = r"uint8/uint16/float array of shape \(H, W, 3\) RGB or \(H, W\) greyscale"
    with pytest.raises(ValueError, match=expected) as caught:
        segmenter.predict(array)
    assert str(array.shape) in str(caught.value) and str(array.dtype) in str(caught.value)


def test_other_unusable_inputs_raise_naming_the_problem(run, segmenter, tmp_path):
    with pytest.raises(ValueError, match="PIL image: the image has 1 channel but model.in_channels=3"):
        segmenter.predict(Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)))
    with pytest.raises(TypeError, match="path, a PIL image or a NumPy array, got list"):
        segmenter.predict([[0, 1], [2, 3]])
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match=str(missing)):
        segmenter.predict(missing)
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        Segmenter(run.model, run.cfg, mode="tiles")


def test_a_checkpoint_for_another_class_count_is_refused_naming_the_file(run, tmp_path):
    other = tmp_path / "four_classes.pt"
    torch.save(build_model(run.cfg.model, 4).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit .* 6 classes") as caught:
        Segmenter.from_checkpoint(other, config=run.config)
    assert str(other) in str(caught.value)

    four = load_config(run.config, ["data.num_classes=4", "data.class_names=[a, b, c, d]"])
    with pytest.raises(CheckpointError, match="does not fit .* 4 classes") as caught:
        Segmenter.from_checkpoint(run.last, config=four)
    assert str(run.last) in str(caught.value)
