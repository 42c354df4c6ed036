"""ConfusionMatrix and segmentation_metrics: a hand-computed example, exclusion rules, batch
accumulation, an independent float64 numpy oracle (hypothesis), state, and no host syncs."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segfocal.evaluation import ConfusionMatrix, segmentation_metrics

HYPOTHESIS = settings(max_examples=int(os.environ.get("SEGFOCAL_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

# 4 classes; class 3 never occurs in the target but is predicted once. 255 = ignored, 9 = invalid label.
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 255, 1],
                       [2, 9, 1, 255]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 2, 0, 1],
                     [3, 1, 1, 0]])
# Counted by hand from the (target, pred) pairs, leaving out the two 255s and the 9.
EXPECTED_MATRIX = [[3, 1, 0, 0],
                   [0, 5, 1, 0],
                   [0, 0, 2, 1],
                   [0, 0, 0, 0]]


def hand_example() -> ConfusionMatrix:
    confusion = ConfusionMatrix(4, ignore_index=255)
    confusion.update(PRED, TARGET)
    return confusion


def assert_close_nan(actual, expected, rel=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if math.isnan(e):
            assert math.isnan(a), (actual, expected)
        else:
            assert a == pytest.approx(e, rel=rel, abs=1e-15), (actual, expected)


# ---------------------------------------------------------------------------------------------
# Hand-computed example
# ---------------------------------------------------------------------------------------------


def test_hand_example_confusion_matrix():
    confusion = hand_example()
    assert confusion.matrix.dtype == torch.int64
    assert confusion.matrix.tolist() == EXPECTED_MATRIX
    assert int(confusion.num_ignored) == 2
    assert int(confusion.num_invalid) == 1


def test_hand_example_metrics():
    metrics = segmentation_metrics(hand_example().matrix)
    # TP = diag, FN = row sum - TP, FP = column sum - TP; column sums are 3, 6, 3, 1.
    iou = [3 / 4, 5 / 7, 2 / 4, math.nan]            # 3/(3+0+1), 5/(5+1+1), 2/(2+1+1); class 3 absent
    accuracy = [3 / 4, 5 / 6, 2 / 3, math.nan]
    dice = [6 / 7, 10 / 12, 4 / 6, math.nan]         # 2TP / (2TP + FP + FN)
    assert_close_nan(metrics["iou"], iou)
    assert_close_nan(metrics["accuracy"], accuracy)
    assert_close_nan(metrics["dice"], dice)
    assert metrics["support"] == [4, 6, 3, 0]
    # the absent class is left out of every mean
    assert metrics["miou"] == pytest.approx((3 / 4 + 5 / 7 + 2 / 4) / 3, rel=1e-12)
    assert metrics["mean_accuracy"] == pytest.approx((3 / 4 + 5 / 6 + 2 / 3) / 3, rel=1e-12)
    assert metrics["mean_dice"] == pytest.approx((6 / 7 + 10 / 12 + 4 / 6) / 3, rel=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(10 / 13, rel=1e-12)
    assert metrics["fwiou"] == pytest.approx(4 / 13 * 3 / 4 + 6 / 13 * 5 / 7 + 3 / 13 * 2 / 4, rel=1e-12)
    assert metrics["num_pixels"] == 13


def test_metrics_are_plain_python_values():
    metrics = segmentation_metrics(hand_example().matrix)
    for key, value in metrics.items():
        if isinstance(value, list):
            assert all(type(item) in (float, int) for item in value), key
        else:
            assert type(value) in (float, int), key
    assert all(type(v) is float for v in metrics["iou"])


def test_class_predicted_but_absent_from_ground_truth_is_nan_and_its_false_positives_count_elsewhere():
    # every pixel is class 0, half predicted as class 1
    metrics = segmentation_metrics(torch.tensor([[2, 2], [0, 0]]))
    assert metrics["iou"][0] == pytest.approx(0.5)
    assert math.isnan(metrics["iou"][1]) and math.isnan(metrics["dice"][1]) and math.isnan(metrics["accuracy"][1])
    assert metrics["miou"] == pytest.approx(0.5)


def test_class_present_but_never_predicted_scores_zero():
    metrics = segmentation_metrics(torch.tensor([[3, 0], [2, 0]]))
    assert metrics["iou"] == [pytest.approx(3 / 5), 0.0]
    assert metrics["accuracy"] == [1.0, 0.0]
    assert metrics["miou"] == pytest.approx((3 / 5 + 0) / 2)


def test_empty_matrix_gives_nan_summaries():
    metrics = segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64))
    for key in ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou"):
        assert math.isnan(metrics[key]), key
    assert metrics["num_pixels"] == 0


def test_metrics_accept_numpy_and_lists():
    assert segmentation_metrics(np.array(EXPECTED_MATRIX))["miou"] == segmentation_metrics(EXPECTED_MATRIX)["miou"]
    with pytest.raises(ValueError, match="square"):
        segmentation_metrics(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# Exclusion rules, accumulation, state
# ---------------------------------------------------------------------------------------------


def test_multi_batch_accumulation_equals_one_update_on_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (6, 7, 9), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    pred = torch.randint(0, 5, (6, 7, 9), generator=generator)
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    parts = ConfusionMatrix(5)
    for chunk in range(3):
        parts.update(pred[2 * chunk:2 * chunk + 2], target[2 * chunk:2 * chunk + 2])
    assert torch.equal(parts.matrix, whole.matrix)
    assert int(parts.matrix.sum()) == int((target != 255).sum())


def test_uint8_targets_and_ignore_index_inside_the_class_range():
    target = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    pred = torch.tensor([0, 2, 2, 1])
    confusion = ConfusionMatrix(3)
    confusion.update(pred, target)
    assert confusion.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    background_ignored = ConfusionMatrix(3, ignore_index=0)
    background_ignored.update(pred, target)  # 0 is ignored, 255 is now an invalid label
    assert background_ignored.matrix.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert (int(background_ignored.num_ignored), int(background_ignored.num_invalid)) == (1, 1)


def test_negative_labels_and_out_of_range_predictions_are_excluded():
    confusion = ConfusionMatrix(3, ignore_index=-1)
    confusion.update(torch.tensor([0, 1, 3, -2, 2]), torch.tensor([-1, -5, 1, 1, 2]))
    assert confusion.matrix.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert (int(confusion.num_ignored), int(confusion.num_invalid)) == (1, 3)


def test_reset_and_state_dict_round_trip():
    confusion = hand_example()
    state = confusion.state_dict()
    restored = ConfusionMatrix(4)
    restored.load_state_dict(state)
    assert restored.matrix.tolist() == EXPECTED_MATRIX
    assert int(restored.num_ignored) == 2
    confusion.reset()
    assert int(confusion.matrix.sum()) == 0 and int(confusion.num_ignored) == 0
    assert restored.matrix.tolist() == EXPECTED_MATRIX  # the state was a copy
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(3).load_state_dict(state)


def test_matrix_is_a_copy():
    confusion = hand_example()
    confusion.matrix.zero_()
    assert confusion.matrix.tolist() == EXPECTED_MATRIX


def test_all_reduce_without_process_group_is_a_no_op():
    confusion = hand_example()
    confusion.all_reduce()
    assert confusion.matrix.tolist() == EXPECTED_MATRIX


def test_bad_inputs_raise():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        confusion.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        confusion.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


def test_update_needs_no_host_sync():
    """Meta tensors have no data: ``.item()``, boolean-mask indexing, ``nonzero`` and ``bincount``
    all raise on them, so an update that runs on meta tensors cannot wait for the device."""
    confusion = ConfusionMatrix(5, device="meta")
    confusion.update(torch.zeros(2, 8, 8, dtype=torch.long, device="meta"),
                     torch.zeros(2, 8, 8, dtype=torch.uint8, device="meta"))
    assert confusion.matrix.shape == (5, 5)
    with pytest.raises((RuntimeError, NotImplementedError)):  # control: the probe does catch a sync
        torch.zeros(3, device="meta").sum().item()


def test_device_follows_the_first_update_when_not_given():
    confusion = ConfusionMatrix(2)
    confusion.update(torch.zeros(3, dtype=torch.long, device="meta"), torch.zeros(3, dtype=torch.long, device="meta"))
    assert confusion.device.type == "meta"
    pinned = ConfusionMatrix(2, device="cpu")
    pinned.update(torch.tensor([1]), torch.tensor([1]))
    assert pinned.device.type == "cpu" and pinned.matrix.tolist() == [[0, 0], [0, 1]]


# ---------------------------------------------------------------------------------------------
# Independent numpy float64 oracle on random data
# ---------------------------------------------------------------------------------------------


def oracle(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int):
    """Confusion matrix by per-pixel loop over valid pixels, metrics by per-class formulas."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist()):
        if t != ignore_index and 0 <= t < num_classes and 0 <= p < num_classes:
            matrix[t, p] += 1
    iou, acc, dice = [], [], []
    for c in range(num_classes):
        tp = float(matrix[c, c])
        fn = float(matrix[c, :].sum()) - tp
        fp = float(matrix[:, c].sum()) - tp
        if tp + fn == 0:
            iou.append(math.nan), acc.append(math.nan), dice.append(math.nan)
        else:
            iou.append(tp / (tp + fp + fn)), acc.append(tp / (tp + fn)), dice.append(2 * tp / (2 * tp + fp + fn))
    total = float(matrix.sum())
    present = [c for c in range(num_classes) if not math.isnan(iou[c])]
    mean = (lambda values: sum(values[c] for c in present) / len(present)) if present else (lambda values: math.nan)
    summary = {
        "miou": mean(iou), "mean_accuracy": mean(acc), "mean_dice": mean(dice),
        "pixel_accuracy": float(np.trace(matrix)) / total if total else math.nan,
        "fwiou": sum(matrix[c].sum() / total * iou[c] for c in present) if total else math.nan,
    }
    return matrix, {"iou": iou, "accuracy": acc, "dice": dice, **summary}


@HYPOTHESIS
@given(
    num_classes=st.integers(1, 8),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    ignore_fraction=st.floats(0.0, 1.0),
    invalid_fraction=st.sampled_from([0.0, 0.1]),
    batches=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_numpy_oracle(num_classes, shape, ignore_fraction, invalid_fraction, batches, seed):
    rng = np.random.default_rng(seed)
    shape = [batches * shape[0]] + shape[1:]
    target = rng.integers(0, num_classes, size=shape)
    target[rng.random(shape) < ignore_fraction] = 255
    target[rng.random(shape) < invalid_fraction] = num_classes + 3
    # predictions agree with the target part of the time, so IoUs are not all near zero
    pred = np.where(rng.random(shape) < 0.5, np.clip(target, 0, num_classes - 1), rng.integers(0, num_classes, size=shape))
    expected_matrix, expected = oracle(pred, target, num_classes, 255)

    confusion = ConfusionMatrix(num_classes)
    for part_pred, part_target in zip(np.array_split(pred, batches), np.array_split(target, batches)):
        confusion.update(torch.from_numpy(part_pred), torch.from_numpy(part_target))
    np.testing.assert_array_equal(confusion.matrix.numpy(), expected_matrix)
    metrics = segmentation_metrics(confusion.matrix)
    for key in ("iou", "accuracy", "dice"):
        assert_close_nan(metrics[key], expected[key], rel=1e-12)
    for key in ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou"):
        assert_close_nan([metrics[key]], [expected[key]], rel=1e-12)
