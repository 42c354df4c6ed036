"""predict_logits: whole == slide for a per-pixel model, hand-computed overlap averaging, flip TTA,
padding for smp models at odd sizes, window placement, dtypes, errors, and no host syncs."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segfocal.evaluation import model_size_divisor, predict, predict_logits, sliding_windows

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pointwise():
    """A 1x1 convolution: each output pixel depends on its own input pixel only."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, kernel_size=1).eval()


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, classes=3, encoder_depth=3, decoder_channels=(32, 16, 8)).eval()


def image(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Window placement
# ---------------------------------------------------------------------------------------------


def test_sliding_windows_by_hand():
    assert sliding_windows(10, 4, 3) == [0, 3, 6]      # 6 + 4 = 10: the last window ends at the border
    assert sliding_windows(11, 4, 3) == [0, 3, 6, 7]   # the last one is moved back to end at 11
    assert sliding_windows(3, 4, 2) == [0]             # image smaller than the crop
    assert sliding_windows(8, 8, 8) == [0]
    assert sliding_windows(9, 8, 8) == [0, 1]


@pytest.mark.parametrize("size", range(1, 30))
@pytest.mark.parametrize("crop,stride", [(4, 3), (7, 7), (5, 1), (16, 9)])
def test_sliding_windows_cover_every_pixel_once_or_more_without_duplicates(size, crop, stride):
    starts = sliding_windows(size, crop, stride)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + crop, size) == size
    covered = set()
    for start in starts:
        covered.update(range(start, min(start + crop, size)))
    assert covered == set(range(size))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


# ---------------------------------------------------------------------------------------------
# Whole vs slide, averaging
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop,stride", [
    ((16, 20), (10, 12)),   # overlapping, not dividing 37 x 53
    ((64, 64), (32, 32)),   # image smaller than the crop: one padded window
    ((37, 53), (37, 53)),   # exactly the image
    ((20, 30), (20, 30)),   # touching windows, last one shifted back
    ((17, 23), (5, 7)),     # heavy overlap
    ((40, 8), (40, 3)),     # crop taller than the image, narrow in width
])
def test_slide_equals_whole_for_a_per_pixel_model(pointwise, crop, stride):
    images = image(2, 3, 37, 53)
    with torch.no_grad():
        whole = predict_logits(pointwise, images, NUM_CLASSES, mode="whole")
        slide = predict_logits(pointwise, images, NUM_CLASSES, mode="slide", crop_size=crop, stride=stride)
        padded = predict_logits(pointwise, images, NUM_CLASSES, mode="slide", crop_size=crop, stride=stride,
                                size_divisor=32)
    assert whole.shape == slide.shape == (2, NUM_CLASSES, 37, 53)
    assert whole.dtype == slide.dtype == torch.float32
    torch.testing.assert_close(whole, pointwise(images), rtol=0, atol=0)
    torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded, whole, rtol=1e-6, atol=1e-6)


class TileMean(nn.Module):
    """Outputs, everywhere, the mean of the input's first channel: depends on the whole tile."""

    def forward(self, x):
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(x.shape[0], 2, *x.shape[2:])


def test_slide_averages_overlapping_windows():
    columns = torch.arange(6.0).expand(1, 3, 4, 6)  # channel 0 = column index
    with torch.no_grad():
        logits = predict_logits(TileMean(), columns, 2, mode="slide", crop_size=(4, 4), stride=(4, 2))
    # windows over columns 0-3 (mean 1.5) and 2-5 (mean 3.5); columns 2-3 are in both
    expected_row = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5])
    torch.testing.assert_close(logits, expected_row.expand(1, 2, 4, 6), rtol=0, atol=1e-6)


def test_window_smaller_image_is_zero_padded_to_the_crop():
    columns = torch.arange(6.0).expand(1, 3, 4, 6)
    with torch.no_grad():
        logits = predict_logits(TileMean(), columns, 2, mode="slide", crop_size=(8, 8), stride=(4, 4))
    # one window, padded to 8 x 8 with zeros: mean = (4 rows * 15) / 64
    torch.testing.assert_close(logits, torch.full((1, 2, 4, 6), 60 / 64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Flip TTA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_of_a_mirror_equivariant_model_changes_nothing(pointwise, mode):
    images = image(2, 3, 21, 30, seed=1)
    with torch.no_grad():
        plain = predict_logits(pointwise, images, NUM_CLASSES, mode=mode, crop_size=(16, 16), stride=(8, 8))
        flipped = predict_logits(pointwise, images, NUM_CLASSES, mode=mode, crop_size=(16, 16), stride=(8, 8), flip=True)
    torch.testing.assert_close(flipped, plain, rtol=1e-6, atol=1e-6)


def test_flip_averages_the_logits_of_the_mirrored_image():
    torch.manual_seed(1)
    horizontal = nn.Conv2d(3, NUM_CLASSES, kernel_size=(1, 3), padding=(0, 1)).eval()  # not mirror-invariant
    images = image(2, 3, 9, 14, seed=2)
    with torch.no_grad():
        flipped = predict_logits(horizontal, images, NUM_CLASSES, flip=True)
        plain = horizontal(images)
        manual = (plain + horizontal(images.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(flipped, manual, rtol=1e-6, atol=1e-6)
    assert (flipped - plain).abs().max() > 1e-2  # control: the flip does change this model's output


# ---------------------------------------------------------------------------------------------
# Padding for segmentation-models-pytorch
# ---------------------------------------------------------------------------------------------


def test_smp_unet_at_an_odd_size_keeps_the_input_size(small_unet):
    images = image(1, 3, 37, 53, seed=3)
    with torch.no_grad():
        logits = predict_logits(small_unet, images, 3)
        padded32 = predict_logits(small_unet, images, 3, size_divisor=32)
        manual32 = small_unet(F.pad(images, (0, 64 - 53, 0, 64 - 37)))[..., :37, :53]
        slide = predict_logits(small_unet, images, 3, mode="slide", crop_size=(30, 30), stride=(20, 20), flip=True)
        labels = predict(small_unet, images, 3)
    assert logits.shape == padded32.shape == slide.shape == (1, 3, 37, 53)
    torch.testing.assert_close(padded32, manual32, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(slide).all()
    assert labels.shape == (1, 37, 53) and labels.dtype == torch.int64
    assert torch.equal(labels, logits.argmax(dim=1))


def test_smp_model_that_needs_divisible_input_is_padded_and_cropped_back():
    torch.manual_seed(0)
    linknet = smp.Linknet("resnet18", encoder_weights=None, classes=3, encoder_depth=3).eval()
    images = image(1, 3, 37, 53, seed=4)
    assert model_size_divisor(linknet) == 8  # encoder_depth=3: output stride 2**3
    with pytest.raises(RuntimeError, match="divisible"):
        linknet(images)  # control: the bare model refuses this size
    with torch.no_grad():
        logits = predict_logits(linknet, images, 3)
        manual = linknet(F.pad(images, (0, 56 - 53, 0, 40 - 37)))[..., :37, :53]
        slide = predict_logits(linknet, images, 3, mode="slide", crop_size=(30, 30), stride=(20, 20))
    assert logits.shape == slide.shape == (1, 3, 37, 53)
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


def test_size_divisor_of_smp_wrapped_and_plain_models(small_unet, pointwise):
    assert model_size_divisor(small_unet) == 1  # smp 0.6 Unet accepts any size (requires_divisible_input_shape)
    assert model_size_divisor(pointwise) == 1
    linknet = smp.Linknet("resnet18", encoder_weights=None, classes=2)
    assert model_size_divisor(linknet) == 32
    assert model_size_divisor(nn.DataParallel(linknet)) == 32

    class Compiled(nn.Module):  # what torch.compile returns keeps the model as ``_orig_mod``
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert model_size_divisor(Compiled(linknet)) == 32


# ---------------------------------------------------------------------------------------------
# Dtypes, outputs, errors, syncs
# ---------------------------------------------------------------------------------------------


def test_autocast_output_is_float32(pointwise):
    images = image(1, 3, 10, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = predict_logits(pointwise, images, NUM_CLASSES, mode="slide", crop_size=(8, 8), stride=(4, 4), flip=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, pointwise(images), rtol=0.05, atol=0.05)


class DictOutput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"out": self.inner(x), "aux": None}


def test_torchvision_style_dict_output(pointwise):
    images = image(1, 3, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(DictOutput(pointwise), images, NUM_CLASSES), pointwise(images))


def test_low_resolution_output_is_resized_to_the_input():
    class Downsampled(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x[:, :2], 2)

    with torch.no_grad():
        assert predict_logits(Downsampled(), image(1, 3, 16, 20), 2).shape == (1, 2, 16, 20)


def test_bad_arguments_raise(pointwise):
    images = image(1, 3, 10, 12)
    with pytest.raises(ValueError, match="mode"):
        predict_logits(pointwise, images, NUM_CLASSES, mode="tiles")
    with pytest.raises(ValueError, match="uncovered"):
        predict_logits(pointwise, images, NUM_CLASSES, mode="slide", crop_size=(8, 8), stride=(9, 4))
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(pointwise, images, NUM_CLASSES, mode="slide", crop_size=(8, 0))
    with pytest.raises(ValueError, match="model output"):
        predict_logits(pointwise, images, NUM_CLASSES + 1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        predict_logits(pointwise, images[0], NUM_CLASSES)


def test_slide_and_flip_need_no_host_sync():
    """On meta tensors any ``.item()`` or data-dependent shape raises (see test_eval_metrics)."""
    model = nn.Conv2d(3, NUM_CLASSES, 1).to("meta")
    logits = predict_logits(model, torch.zeros(2, 3, 37, 53, device="meta"), NUM_CLASSES, mode="slide",
                            crop_size=(16, 20), stride=(10, 12), flip=True, size_divisor=32)
    assert logits.shape == (2, NUM_CLASSES, 37, 53)


def test_evaluate_computes_the_optional_metrics_it_is_asked_for_and_refuses_others():
    from segfocal.config import EvalConfig
    from segfocal.engine.evaluate import evaluate
    from segfocal.engine.precision import inference_precision

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)
    batches = [(torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)))]
    device = torch.device("cpu")
    precision = inference_precision("fp32", device)
    plain = evaluate(model, batches, EvalConfig(), 4, 255, device, precision, progress=False)
    scored = evaluate(model, batches, EvalConfig(), 4, 255, device, precision, metrics=("auroc",), progress=False)
    assert plain.auroc is None and len(scored.auroc) == 4 and torch.equal(plain.confusion, scored.confusion)
    with pytest.raises(ValueError, match=r"metrics: unknown \['dice_loss'\]; the optional metrics are \['auroc'\]"):
        evaluate(model, batches, EvalConfig(), 4, 255, device, precision, metrics=("dice_loss",))
