"""segfocal's focal loss against the reference code and printed numbers of the source write-ups."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_seeds import (
    FocalLoss as SeedFocalLoss,
    cross_entropy_tf,
    cross_entropy_torch,
    focal_loss_my,
    focal_loss_zhihu,
    poly1_cross_entropy_tf,
    poly1_cross_entropy_torch,
    poly1_focal_loss_torch,
)
from segfocal.losses import class_weights, focal_loss

# (batch, classes, height, width); the first is the blog's pred = torch.rand((2, 6, 5, 5))
SHAPES = [(2, 6, 5, 5), (1, 2, 4, 7), (3, 3, 6, 5), (2, 11, 8, 8), (2, 19, 9, 6)]
SEEDS = [0, 1, 2]


def _batch(shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    if kind == "rand":  # the blog's input: uniform scores in [0, 1)
        logits = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        logits = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    # skewed labels so that class weights differ noticeably; some classes may be absent
    probs = torch.linspace(1.0, 0.1, c, dtype=torch.float64)
    target = torch.multinomial(probs, b * h * w, replacement=True, generator=g).view(b, h, w)
    return logits, target


# ---------------------------------------------------------------------------- seed 003


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["rand", "randn"])
def test_unweighted_equals_both_seed_003_references(shape, seed, kind):
    logits, target = _batch(shape, seed, kind)
    ours = focal_loss(logits, target, gamma=2, weight=None, alpha=None, ignore_index=-100)
    my = focal_loss_my(logits, target)
    zhihu = focal_loss_zhihu(logits, target)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(my, zhihu, rtol=1e-12, atol=0)  # the blog's claim: they agree
    torch.testing.assert_close(ours, my, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours, zhihu, rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_unused_ignore_index_changes_nothing(shape, seed):
    logits, target = _batch(shape, seed)
    reference = focal_loss_zhihu(logits, target)
    for ignore_index in (-100, 255, 1000, shape[1]):
        ours = focal_loss(logits, target, gamma=2, weight=None, ignore_index=ignore_index)
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_enet_weighted_normalize_weights_equals_focal_loss_my(shape, seed):
    logits, target = _batch(shape, seed)
    ours = focal_loss(logits, target, gamma=2, weight="enet", normalize="weights", ignore_index=-100)
    reference = focal_loss_my(logits, target, apply_weights=True)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)
    # and the weighting matters: it is not the unweighted value
    assert not torch.isclose(reference, focal_loss_my(logits, target), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_enet_weighted_normalize_pixels_equals_focal_loss_zhihu(shape, seed):
    logits, target = _batch(shape, seed)
    ours = focal_loss(logits, target, gamma=2, weight="enet", normalize="pixels", ignore_index=-100)
    reference = focal_loss_zhihu(logits, target, apply_weights=True)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)
    assert not torch.isclose(reference, focal_loss_zhihu(logits, target), rtol=1e-6)


def test_default_options_are_the_weighted_zhihu_form():
    """Defaults: gamma 2, ENet weights, mean over pixels (ignore 255 unused here)."""
    logits, target = _batch((2, 6, 5, 5), 7)
    torch.testing.assert_close(focal_loss(logits, target), focal_loss_zhihu(logits, target, apply_weights=True),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_ignored_pixels_match_focal_loss_my(seed):
    """focal_loss_my goes through nll_loss, which honours ignore_index=-100 (zhihu cannot)."""
    logits, target = _batch((2, 5, 6, 6), seed)
    g = torch.Generator().manual_seed(100 + seed)
    target = torch.where(torch.rand(target.shape, generator=g) < 0.3, -100, target)
    for apply_weights, normalize in ((False, "pixels"), (True, "weights")):
        ours = focal_loss(logits, target, gamma=2, weight="enet" if apply_weights else None,
                          normalize=normalize, ignore_index=-100)
        reference = focal_loss_my(logits, target, apply_weights=apply_weights, ignore_index=-100)
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)


def test_seed_003_weights_are_segfocal_enet_weights():
    _, target = _batch((2, 6, 5, 5), 3)
    from reference_seeds import _histogram, compute_class_weights

    reference = torch.from_numpy(compute_class_weights(_histogram(target.view(-1), 6), 6))
    torch.testing.assert_close(class_weights(target, 6, "enet", dtype=torch.float64), reference, rtol=1e-12, atol=0)


def test_gradients_match_seed_003_references():
    logits, target = _batch((2, 6, 5, 5), 11)
    leaf_ours = logits.clone().requires_grad_(True)
    leaf_ref = logits.clone().requires_grad_(True)
    focal_loss(leaf_ours, target, weight="enet", normalize="weights", ignore_index=-100).backward()
    focal_loss_my(leaf_ref, target, apply_weights=True).backward()
    torch.testing.assert_close(leaf_ours.grad, leaf_ref.grad, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------- seed 001

SEED_001_LOGITS = [[2.0, 0.5, 1.0], [0.1, 1.0, 3.0]]
SEED_001_LABELS = [1, 2]
PRINTED_CE = [1.9643688, 0.17425454]
PRINTED_POLY1_CE = [2.8241243, 0.33417147]
PRINTED_FOCAL = [1.0890163, 0.00334221]
PRINTED_POLY1_FOCAL_HYBRID = [1.4649665, 0.1818437]


def _seed_001(dtype=torch.float64):
    return torch.tensor(SEED_001_LOGITS, dtype=dtype), torch.tensor(SEED_001_LABELS)


def _printed(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_001_references_reproduce_printed_numbers(dtype):
    logits, labels = _seed_001(dtype)
    for name, value, printed in [
        ("cross_entropy_tf", cross_entropy_tf(logits, labels, 3), PRINTED_CE),
        ("cross_entropy_torch", cross_entropy_torch(logits, labels), PRINTED_CE),
        ("poly1_cross_entropy_tf", poly1_cross_entropy_tf(logits, labels, 3, epsilon=1.0), PRINTED_POLY1_CE),
        ("poly1_cross_entropy_torch", poly1_cross_entropy_torch(logits, labels, 3, epsilon=1.0), PRINTED_POLY1_CE),
        ("FocalLoss", SeedFocalLoss(alpha=0.25, gamma=2, num_classes=3)(logits, labels), PRINTED_FOCAL),
        ("poly1_focal_loss_torch", poly1_focal_loss_torch(logits, labels, 0.25, 2, 3, 1.0), PRINTED_POLY1_FOCAL_HYBRID),
    ]:
        torch.testing.assert_close(value.double(), _printed(printed), rtol=1e-6, atol=1e-7, msg=name)


def test_seed_001_focal_module_survives_a_second_call():
    """The printed module overwrote self.alpha in forward; the fixed copy gives the same twice."""
    logits, labels = _seed_001()
    module = SeedFocalLoss(alpha=0.25, gamma=2, num_classes=3)
    first = module(logits, labels)
    second = module(logits, labels)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    other = module(logits[:1], labels[:1])
    torch.testing.assert_close(other, first[:1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ours_reproduces_printed_cross_entropy(dtype):
    logits, labels = _seed_001(dtype)
    ours = focal_loss(logits, labels, gamma=0, weight=None, reduction="none")
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), _printed(PRINTED_CE), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ours_reproduces_printed_poly1_cross_entropy(dtype):
    logits, labels = _seed_001(dtype)
    ours = focal_loss(logits, labels, gamma=0, weight=None, poly_epsilon=1.0, reduction="none")
    torch.testing.assert_close(ours.double(), _printed(PRINTED_POLY1_CE), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ours_reproduces_printed_focal_loss(dtype):
    logits, labels = _seed_001(dtype)
    ours = focal_loss(logits, labels, gamma=2, alpha=0.25, weight=None, reduction="none")
    torch.testing.assert_close(ours.double(), _printed(PRINTED_FOCAL), rtol=0, atol=1e-6)
    # the same per-class alpha written out: class 0 gets alpha, the others 1 - alpha
    explicit = focal_loss(logits, labels, gamma=2, alpha=[0.25, 0.75, 0.75], weight=None, reduction="none")
    torch.testing.assert_close(explicit, ours, rtol=0, atol=0)


def test_ours_poly1_focal_is_the_paper_form_not_the_seed_hybrid():
    logits, labels = _seed_001()
    gamma, eps = 2.0, 1.0
    ours = focal_loss(logits, labels, gamma=gamma, alpha=0.25, weight=None, poly_epsilon=eps, reduction="none")

    # independent paper form: FL + eps * (1 - p_t)^(gamma + 1), p_t from a float64 softmax
    p = torch.softmax(logits, dim=-1)
    p_t = p[torch.arange(2), labels]
    alpha_t = torch.where(labels == 0, 0.25, 0.75).double()
    focal = -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)
    torch.testing.assert_close(focal, _printed(PRINTED_FOCAL), rtol=0, atol=1e-6)
    paper = focal + eps * (1 - p_t) ** (gamma + 1)
    torch.testing.assert_close(ours, paper, rtol=1e-12, atol=0)

    # deliberately different from the seed's sigmoid hybrid (whose printed numbers it reproduces)
    hybrid = poly1_focal_loss_torch(logits, labels, alpha=0.25, gamma=2, num_classes=3, epsilon=eps)
    torch.testing.assert_close(hybrid, _printed(PRINTED_POLY1_FOCAL_HYBRID), rtol=1e-6, atol=1e-7)
    assert (ours - hybrid).abs().min() > 1e-2


def test_seed_001_focal_module_equals_ours_on_random_batches():
    g = torch.Generator().manual_seed(5)
    for num_classes in (2, 3, 7):
        logits = 2.5 * torch.randn(64, num_classes, generator=g, dtype=torch.float64)
        labels = torch.randint(0, num_classes, (64,), generator=g)
        for alpha, gamma in ((0.25, 2.0), (0.6, 0.5), (0.5, 3.0)):
            reference = SeedFocalLoss(alpha=alpha, gamma=gamma, num_classes=num_classes)(logits, labels)
            ours = focal_loss(logits, labels, gamma=gamma, alpha=alpha, weight=None, reduction="none")
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-300)
            # mean reduction divides by the pixel count by default
            mean = focal_loss(logits, labels, gamma=gamma, alpha=alpha, weight=None)
            torch.testing.assert_close(mean, reference.mean(), rtol=1e-10, atol=0)


def test_seed_001_poly1_ce_equals_ours_on_random_batches():
    g = torch.Generator().manual_seed(6)
    logits = 2.0 * torch.randn(50, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (50,), generator=g)
    for eps in (-0.5, 1.0, 2.0):
        reference = poly1_cross_entropy_torch(logits, labels, 5, epsilon=eps)
        ours = focal_loss(logits, labels, gamma=0, weight=None, poly_epsilon=eps, reduction="none")
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        focal_loss(logits, labels, gamma=0, weight=None, reduction="none"), F.cross_entropy(logits, labels, reduction="none"),
        rtol=1e-12, atol=0,
    )
