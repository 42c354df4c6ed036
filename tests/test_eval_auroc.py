"""BinnedAUROC: the seed 002 examples, an exact pairwise (Mann-Whitney) float64 oracle, exclusion
rules, undefined classes, chunking and layout invariance, state, and no host syncs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import segfocal.evaluation.auroc as auroc_module
from segfocal.evaluation import BinnedAUROC


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray, num_classes: int):
    """One-vs-rest AUROC per class by comparing every positive with every negative, ties 1/2."""
    result = []
    for c in range(num_classes):
        pos = scores[labels == c, c].astype(np.float64)
        neg = scores[labels != c, c].astype(np.float64)
        if len(pos) == 0 or len(neg) == 0:
            result.append(math.nan)
            continue
        diff = pos[:, None] - neg[None, :]
        result.append(float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))))
    return result


def assert_close_nan(actual, expected, abs_tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (math.isnan(a) and math.isnan(e)) or abs(a - e) <= abs_tol, (actual, expected)


# ---------------------------------------------------------------------------------------------
# Seed 002 examples (torchmetrics outputs printed in the write-up)
# ---------------------------------------------------------------------------------------------


def test_seed_binary_example_is_one_half():
    preds = torch.tensor([0.13, 0.26, 0.08, 0.19, 0.34])
    target = torch.tensor([0, 0, 1, 1, 1])
    metric = BinnedAUROC(2)
    metric.update(torch.stack([1 - preds, preds], dim=1), target)  # [N, C]: class 1's score is preds
    auroc = metric.compute()
    # positives 0.08, 0.19, 0.34 vs negatives 0.13, 0.26: 0 + 1 + 2 wins of 6 pairs
    assert auroc[1] == pytest.approx(3 / 6, abs=1e-12)
    assert auroc[0] == pytest.approx(3 / 6, abs=1e-12)


def test_seed_three_class_one_vs_rest_example():
    preds = torch.tensor([[0.90, 0.05, 0.05],
                          [0.05, 0.90, 0.05],
                          [0.05, 0.05, 0.90],
                          [0.85, 0.05, 0.10],
                          [0.10, 0.10, 0.80]])
    target = torch.tensor([0, 1, 1, 2, 2])
    metric = BinnedAUROC(3)
    metric.update(preds, target)
    auroc = metric.compute()
    # class 0: 0.90 beats all 4 negatives -> 1.
    # class 1: positives 0.90, 0.05 vs negatives 0.05, 0.05, 0.10: 3 + (0.5 + 0.5) = 4 of 6.
    # class 2: positives 0.10, 0.80 vs negatives 0.05, 0.05, 0.90: 2 + 2 = 4 of 6.
    assert auroc == [pytest.approx(1.0, abs=1e-12), pytest.approx(4 / 6, abs=1e-12), pytest.approx(4 / 6, abs=1e-12)]
    assert round(sum(auroc) / 3, 4) == 0.7778  # torchmetrics' macro average in the seed


# ---------------------------------------------------------------------------------------------
# Pairwise oracle on random data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pairwise_oracle_on_softmax_scores_within_binning_error(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = 4
    target = torch.randint(0, num_classes, (3, 20, 25), generator=generator)
    logits = torch.randn(3, num_classes, 20, 25, generator=generator, dtype=torch.float64)
    logits += 1.5 * torch.nn.functional.one_hot(target, num_classes).permute(0, 3, 1, 2)  # informative scores
    probs = logits.softmax(dim=1)
    metric = BinnedAUROC(num_classes, num_bins=1000)
    metric.update(probs, target)
    expected = pairwise_auroc(probs.movedim(1, -1).reshape(-1, num_classes).numpy(), target.reshape(-1).numpy(),
                              num_classes)
    actual = metric.compute()
    assert_close_nan(actual, expected, abs_tol=1e-3)
    assert all(0.6 < value < 1.0 for value in expected)  # non-trivial AUROCs
    coarse = BinnedAUROC(num_classes, num_bins=10)  # control: coarse bins do differ from the oracle
    coarse.update(probs, target)
    assert max(abs(a - e) for a, e in zip(coarse.compute(), expected)) > 1e-3


def test_exact_when_scores_fall_in_distinct_bins():
    """Scores on bin centres: equal scores share a bin (a true tie), different scores never do."""
    rng = np.random.default_rng(3)
    num_classes, num_bins = 3, 50
    labels = rng.integers(0, num_classes, size=(400,))
    scores = (rng.integers(0, num_bins, size=(400, num_classes)) + 0.5) / num_bins
    metric = BinnedAUROC(num_classes, num_bins=num_bins)
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert_close_nan(metric.compute(), pairwise_auroc(scores, labels, num_classes), abs_tol=1e-12)


def test_perfect_and_reversed_separation():
    target = torch.tensor([0, 0, 1, 1])
    class1 = torch.tensor([0.1, 0.2, 0.8, 0.9])
    metric = BinnedAUROC(2)
    metric.update(torch.stack([1 - class1, class1], dim=1), target)
    assert metric.compute() == [1.0, 1.0]
    reversed_metric = BinnedAUROC(2)
    reversed_metric.update(torch.stack([class1, 1 - class1], dim=1), target)
    assert reversed_metric.compute() == [0.0, 0.0]


def test_scores_of_exactly_zero_and_one():
    metric = BinnedAUROC(2, num_bins=10)
    metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert metric.compute() == [1.0, 1.0]
    assert metric.histograms.sum().item() == 4  # each pixel once per class, in range


# ---------------------------------------------------------------------------------------------
# Exclusions, undefined classes, layout, chunking, state
# ---------------------------------------------------------------------------------------------


def test_ignored_and_out_of_range_pixels_are_left_out():
    generator = torch.Generator().manual_seed(4)
    probs = torch.rand(2, 3, 6, 7, generator=generator).softmax(dim=1)
    target = torch.randint(0, 3, (2, 6, 7), generator=generator)
    noisy = target.clone()
    noisy[:, 0] = 255
    noisy[:, 1, :3] = 7
    noisy[:, 1, 3:] = -1
    metric = BinnedAUROC(3, num_bins=100)
    metric.update(probs, noisy)
    kept = (noisy >= 0) & (noisy < 3)
    reference = BinnedAUROC(3, num_bins=100)
    reference.update(probs.movedim(1, -1)[kept], target[kept])
    assert torch.equal(metric.histograms, reference.histograms)
    assert int(metric.histograms[:, 0].sum()) == int(kept.sum())


def test_ignore_index_inside_the_class_range():
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.1, 0.6, 0.3]])
    metric = BinnedAUROC(3, ignore_index=0)
    metric.update(probs, torch.tensor([1, 2, 0, 0]))  # the two class-0 pixels are ignored
    auroc = metric.compute()
    assert math.isnan(auroc[0])  # no positives left
    assert auroc[1:] == [1.0, 1.0]
    assert int(metric.histograms[:, 0].sum()) == 2


def test_class_without_positives_or_negatives_is_nan():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    metric = BinnedAUROC(3)
    metric.update(probs, torch.tensor([0, 0, 1]))
    auroc = metric.compute()
    assert auroc[:2] == [1.0, 1.0] and math.isnan(auroc[2])  # class 2: no positive
    only_one_class = BinnedAUROC(2)
    only_one_class.update(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.tensor([1, 1]))
    assert all(math.isnan(value) for value in only_one_class.compute())  # no negatives of 1, no positives of 0
    assert all(math.isnan(value) for value in BinnedAUROC(2).compute())  # nothing seen


def test_dense_layout_chunking_and_batches_do_not_change_the_histograms(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    probs = torch.rand(4, 5, 9, 11, generator=generator).softmax(dim=1)
    target = torch.randint(0, 5, (4, 9, 11), generator=generator)
    dense = BinnedAUROC(5, num_bins=64)
    dense.update(probs, target)
    flat = BinnedAUROC(5, num_bins=64)
    flat.update(probs.movedim(1, -1).reshape(-1, 5), target.reshape(-1))
    monkeypatch.setattr(auroc_module, "_CHUNK_ELEMENTS", 37)  # many small, uneven chunks
    batched = BinnedAUROC(5, num_bins=64)
    for index in range(4):
        batched.update(probs[index:index + 1], target[index:index + 1])
    assert torch.equal(dense.histograms, flat.histograms)
    assert torch.equal(dense.histograms, batched.histograms)
    assert int(dense.histograms.sum()) == 4 * 9 * 11 * 5


def test_low_precision_scores_are_accepted():
    generator = torch.Generator().manual_seed(6)
    probs = torch.rand(50, 3, generator=generator).softmax(dim=1)
    target = torch.randint(0, 3, (50,), generator=generator)
    full, half = BinnedAUROC(3, num_bins=20), BinnedAUROC(3, num_bins=20)
    full.update(probs, target)
    half.update(probs.bfloat16(), target)
    assert_close_nan(half.compute(), full.compute(), abs_tol=0.05)


def test_state_dict_reset_and_all_reduce_without_group():
    metric = BinnedAUROC(3, num_bins=10)
    metric.update(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]]), torch.tensor([1, 0]))
    metric.all_reduce()  # no process group: unchanged
    restored = BinnedAUROC(3, num_bins=10)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.histograms, metric.histograms)
    with pytest.raises(ValueError, match="num_bins"):
        BinnedAUROC(3, num_bins=20).load_state_dict(metric.state_dict())
    metric.reset()
    assert int(metric.histograms.abs().sum()) == 0


def test_bad_inputs_raise():
    metric = BinnedAUROC(3)
    with pytest.raises(ValueError, match=r"\[B, 3"):
        metric.update(torch.rand(2, 4, 5), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        metric.update(torch.rand(2, 3, 5), torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.rand(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="num_bins"):
        BinnedAUROC(3, num_bins=0)


def test_update_needs_no_host_sync():
    """Meta tensors raise on ``.item()`` and data-dependent shapes (see test_eval_metrics)."""
    metric = BinnedAUROC(4, num_bins=32, device="meta")
    metric.update(torch.rand(2, 4, 8, 8).to("meta"), torch.zeros(2, 8, 8, dtype=torch.long, device="meta"))
    assert metric.histograms.shape == (2, 4, 32)
