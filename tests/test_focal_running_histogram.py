"""FocalLoss(histogram_momentum=...): weights from a running average of the batches' histograms."""
import pytest
import torch

from segfocal.losses import FocalLoss, class_histogram, focal_loss, weights_from_histogram


def batches(count, num_classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        logits = torch.randn(2, num_classes, 6, 6, generator=generator, dtype=torch.float64)
        high = num_classes if index % 2 == 0 else num_classes - 1  # odd batches lack the last class
        target = torch.randint(0, high, (2, 6, 6), generator=generator)
        target[0, 0] = 255
        yield logits, target


@pytest.mark.parametrize("scheme", ["enet", "inverse", "median", "effective"])
def test_weights_follow_the_running_average_of_histograms(scheme):
    momentum = 0.8
    module = FocalLoss(weight=scheme, histogram_momentum=momentum, num_classes=4)
    running = None
    for logits, target in batches(5):
        loss = module(logits, target)
        counts = class_histogram(target, 4, 255).double()
        running = counts if running is None else momentum * running + (1 - momentum) * counts
        expected_weights = weights_from_histogram(running, scheme, dtype=torch.float64)
        torch.testing.assert_close(module.last_class_weights, expected_weights, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss, focal_loss(logits, target, weight=expected_weights), rtol=1e-12, atol=0)
    assert module.histogram_updates.item() == 5


def test_running_histogram_is_saved_and_restored():
    module = FocalLoss(histogram_momentum=0.9, num_classes=4)
    data = list(batches(4))
    for logits, target in data[:2]:
        module(logits, target)
    restored = FocalLoss(histogram_momentum=0.9, num_classes=4)
    restored.load_state_dict(module.state_dict())
    for logits, target in data[2:]:
        torch.testing.assert_close(restored(logits, target), module(logits, target), rtol=0, atol=0)


def test_zero_momentum_is_the_per_batch_weighting():
    module = FocalLoss(histogram_momentum=0.0, num_classes=4)
    for logits, target in batches(3):
        torch.testing.assert_close(module(logits, target), focal_loss(logits, target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(histogram_momentum=1.0, num_classes=4), r"histogram_momentum must lie in \[0, 1\), got 1.0"),
    (dict(histogram_momentum=0.9), "needs a weight scheme .* and num_classes"),
    (dict(histogram_momentum=0.9, num_classes=4, weight=None), "needs a weight scheme"),
])
def test_bad_running_histogram_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(**kwargs)
