"""Per-class decision calibration (segfocal.evaluation.calibration) against brute force in float64:
every candidate's confusion matrix, each step's optimum, the fit, the cross-fitted estimate."""
import math

import pytest
import torch

from segfocal.evaluation import segmentation_metrics
from segfocal.evaluation.calibration import (GRID_STEP, Calibration, PixelSet, best_step, calibrate, fit_bias, grid,
                                             step_confusions)
from segfocal.evaluation.metrics import metric_tensors, metric_value

NAMES = ["back", "common", "rare", "rarest"]
pytestmark = pytest.mark.filterwarnings("ignore:calibration. class .* pixels in split")


def pixel_set(images=4, pixels=60, classes=4, seed=0, shift=None):
    """Random float64 logits and labels; the labels follow the logits' softmax, so there is something to fit.
    ``shift`` is added to the logits after the labels are drawn: a decision biased by it."""
    generator = torch.Generator().manual_seed(seed)
    prior = torch.tensor([2.0, 1.0, -0.5, -1.5][:classes], dtype=torch.float64)
    items = []
    for _ in range(images):
        logits = torch.randn(pixels, classes, generator=generator, dtype=torch.float64) * 1.5 + prior
        labels = torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()
        if shift is not None:
            logits = logits + shift
        items.append((logits, labels))
    return PixelSet(items, classes)


def brute_confusion(pixels, bias):
    """The confusion matrix of the argmax of logits + bias, pixel by pixel."""
    matrix = torch.zeros(pixels.num_classes, pixels.num_classes, dtype=torch.long)
    for logits, labels in pixels.images:
        for scores, label in zip(logits + bias, labels):
            matrix[label, int(scores.argmax())] += 1
    return matrix


def test_every_candidate_bias_of_a_step_gives_the_confusion_matrix_of_the_biased_argmax():
    pixels = pixel_set(images=3, pixels=25)
    bias = torch.tensor([0.0, 0.3, -0.7, 1.1], dtype=torch.float64)
    for klass in (1, 3):
        confusions = step_confusions(pixels, bias, [klass])
        candidates = grid()
        assert confusions.shape == (len(candidates), 4, 4)
        for index in torch.linspace(0, len(candidates) - 1, 40).round().long().tolist() + [0, len(candidates) - 1]:
            trial = bias.clone()
            trial[klass] = candidates[index]
            assert torch.equal(confusions[index], brute_confusion(pixels, trial)), (klass, float(candidates[index]))


@pytest.mark.parametrize("metric", ["miou", "mean_accuracy", "iou.rare", "fwiou"])
def test_a_step_reaches_the_best_value_over_its_coordinate(metric):
    pixels = pixel_set(images=2, pixels=40, seed=3)
    bias = torch.zeros(4, dtype=torch.float64)
    best, chosen = best_step(pixels, bias, [2], metric, NAMES)
    coarse = grid()[::25]  # an independent scan: every 25th candidate through segmentation_metrics
    scanned = []
    for value in coarse:
        trial = bias.clone()
        trial[2] = value
        scanned.append(metric_value(segmentation_metrics(brute_confusion(pixels, trial)), metric, NAMES))
    assert best >= max(scanned) - 1e-12
    trial = bias.clone()
    trial[2] = chosen
    assert metric_value(segmentation_metrics(brute_confusion(pixels, trial)), metric, NAMES) == pytest.approx(best,
                                                                                                              abs=1e-12)
    assert abs(chosen / GRID_STEP - round(chosen / GRID_STEP)) < 1e-9  # a candidate of the grid


def test_the_batched_metrics_equal_segmentation_metrics_with_absent_classes():
    generator = torch.Generator().manual_seed(1)
    matrices = torch.randint(0, 30, (5, 4, 4), generator=generator)
    matrices[1, 2, :] = 0  # class 2 absent from the ground truth of the second matrix
    matrices[3] = 0  # no pixel at all
    batched = metric_tensors(matrices)
    for index, matrix in enumerate(matrices):
        single = segmentation_metrics(matrix)
        for name in ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou"):
            expected, got = single[name], float(batched[name][index])
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, abs=1e-12), name
        for name in ("iou", "accuracy", "dice"):
            torch.testing.assert_close(batched[name][index], torch.tensor(single[name], dtype=torch.float64),
                                       equal_nan=True)


def test_the_fit_undoes_a_shift_of_the_decision_and_never_lowers_the_metric():
    shift = torch.tensor([0.0, 0.0, 1.5, 0.0], dtype=torch.float64)  # "rare" is predicted far too often
    pixels = pixel_set(images=6, pixels=400, seed=2, shift=shift)
    bias = fit_bias(pixels, "miou", NAMES)
    before = metric_value(segmentation_metrics(pixels.confusion()), "miou", NAMES)
    after = metric_value(segmentation_metrics(pixels.confusion(bias)), "miou", NAMES)
    assert bias[0] == 0 and after > before + 0.02
    assert -2.5 < float(bias[2]) - float(bias[1]) < -0.5  # it pulls "rare" back, by about the shift


def test_a_group_step_moves_its_classes_together_and_gives_the_biased_argmax_at_every_candidate():
    pixels = pixel_set(images=3, pixels=25, seed=6)
    bias = torch.tensor([0.4, 0.3, -0.7, 1.1], dtype=torch.float64)
    confusions, candidates = step_confusions(pixels, bias, [0, 2]), grid()
    for index in torch.linspace(0, len(candidates) - 1, 40).round().long().tolist():
        trial = bias.clone()
        trial[[0, 2]] += candidates[index] - bias[0]  # class 2 keeps its offset to class 0
        assert torch.equal(confusions[index], brute_confusion(pixels, trial)), float(candidates[index])


def first_class_too_rare(seed, classes=6):
    """70 % of the pixels are the first class, whose logit is 1.0 too low: it is predicted too rarely."""
    generator, items = torch.Generator().manual_seed(seed), []
    for _ in range(4):
        labels = torch.where(torch.rand(300, generator=generator) < 0.7, 0,
                             torch.randint(1, classes, (300,), generator=generator))
        logits = torch.randn(300, classes, generator=generator, dtype=torch.float64) * 0.3
        logits[torch.arange(300), labels] += 0.5
        logits[:, 0] -= 1.0
        items.append((logits, labels))
    return PixelSet(items, classes)


@pytest.mark.parametrize("metric", ["miou", "pixel_accuracy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_fit_raises_a_first_class_predicted_too_rarely(metric, seed):
    # stepping only the other classes one by one stalls here (0.19 mIoU, 0.25 pixel accuracy): lowering one
    # class hands its pixels to another, never back to the first
    pixels, names = first_class_too_rare(seed), [f"class{index}" for index in range(6)]
    bias = fit_bias(pixels, metric, names)
    fitted = metric_value(segmentation_metrics(pixels.confusion(bias)), metric, names)
    shifts = torch.arange(-3.0, 3.0, 0.1, dtype=torch.float64)
    scanned = max(metric_value(segmentation_metrics(pixels.confusion(torch.cat([shift.view(1), torch.zeros(5,
                  dtype=torch.float64)]))), metric, names) for shift in shifts)
    assert bias[0] == 0 and fitted >= scanned


def test_a_class_absent_from_the_split_keeps_its_raw_decision_against_the_first_class():
    pixels = pixel_set(images=4, pixels=200, seed=7, shift=torch.tensor([0.0, 0.0, 1.5, 0.5], dtype=torch.float64))
    for _, labels in pixels.images:
        labels[labels == 3] = 1  # no "rarest" pixel in the split
    with pytest.warns(RuntimeWarning, match="class rarest has no pixel in split 'val': its bias is not fitted"):
        result = calibrate(pixels, "miou", NAMES, split="val")
    assert result.bias[3] == 0 and result.bias[2] < -0.5  # "rare" is still pulled back


def test_the_cross_fitted_estimate_scores_each_fold_with_the_others_fit():
    pixels = pixel_set(images=5, pixels=80, seed=4, shift=torch.tensor([0.0, 0.8, 0.0, 0.0], dtype=torch.float64))
    result = calibrate(pixels, "miou", NAMES, split="val", folds=2)
    held_out = torch.zeros(4, 4, dtype=torch.long)
    for fold, others in (([0, 1], [2, 3, 4]), ([2, 3, 4], [0, 1])):  # contiguous blocks of the images
        held_out += brute_confusion(pixels.subset(fold), fit_bias(pixels.subset(others), "miou", NAMES))
    assert result.cross_fitted == pytest.approx(metric_value(segmentation_metrics(held_out), "miou", NAMES), abs=1e-12)
    assert result.confusion_cross_fitted == held_out.tolist()
    assert result.confusion_before == brute_confusion(pixels, torch.zeros(4, dtype=torch.float64)).tolist()
    assert result.after >= result.before and result.after >= result.cross_fitted - 1e-12
    assert torch.equal(torch.tensor(result.bias, dtype=torch.float64), fit_bias(pixels, "miou", NAMES))
    assert (result.metric, result.split, result.folds, result.num_images) == ("miou", "val", 2, 5)


def test_one_image_gives_no_cross_fitted_estimate_with_a_warning_and_a_rare_class_is_named():
    pixels = pixel_set(images=1, pixels=300, seed=5)
    with pytest.warns(RuntimeWarning) as caught:
        result = calibrate(pixels, "miou", NAMES, split="val")
    messages = " ".join(str(warning.message) for warning in caught)
    assert "split 'val' has 1 image(s), fewer than the 2 folds" in messages
    assert "class rarest has" in messages and result.cross_fitted is None


@pytest.mark.parametrize("metric, message", [("mIoU", "--metric='mIoU' is not a metric"),
                                             ("iou.Rare", "--metric='iou.Rare': no class 'Rare'")])
def test_a_metric_that_does_not_exist_is_named(metric, message):
    with pytest.raises(ValueError, match=message):
        calibrate(pixel_set(), metric, NAMES, split="val")


def test_a_stored_calibration_is_checked_against_the_class_count():
    stored = calibrate(pixel_set(images=4, pixels=200), "miou", NAMES, split="val").to_dict()
    assert Calibration.from_dict(stored, 4, "best.pt").bias == stored["bias"]
    with pytest.raises(ValueError, match="best.pt: its calibration has 4 biases for a model of 6 classes"):
        Calibration.from_dict(stored, 6, "best.pt")
    with pytest.raises(ValueError, match=r"best.pt: its calibration has non-finite biases \(class 2: nan\)"):
        Calibration.from_dict({**stored, "bias": [0.0, 1.0, float("nan"), 2.0]}, 4, "best.pt")
    with pytest.raises(ValueError, match="best.pt: its calibration is not one segfocal wrote"):
        Calibration.from_dict({"bias": [0.0]}, 1, "best.pt")


def test_gathering_keeps_only_the_counted_pixels_of_each_image():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255
    pixels = PixelSet.gather([(logits, target)], 3, 255)
    assert [len(labels) for _, labels in pixels.images] == [15, 20]
    assert torch.equal(pixels.images[1][0], logits[1].permute(1, 2, 0).reshape(20, 3))
    assert torch.equal(pixels.confusion(), brute_confusion(pixels, torch.zeros(3, dtype=torch.float64)))
