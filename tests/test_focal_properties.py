"""Properties of segfocal's focal loss: cross-entropy limit, gradients, an independent numpy
oracle (hypothesis), memory layouts, low-precision and saturated numerics, class weights, module."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segfocal.losses import (
    WEIGHT_SCHEMES,
    FocalLoss,
    class_histogram,
    class_weights,
    focal_loss,
    weights_from_histogram,
)

# SEGFOCAL_HYPOTHESIS_EXAMPLES=1000 for a longer search; 40 keeps the suite fast.
HYPOTHESIS = settings(max_examples=int(os.environ.get("SEGFOCAL_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])


# =============================================================================================
# Independent float64 numpy oracle (formulas from the focal.py and class_weights.py docstrings)
# =============================================================================================


def oracle_class_weights(counts, scheme, enet_c=1.10, effective_beta=0.9999):
    """Class weights from per-class counts, written from the class_weights module docstring."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    freq = counts / total if total > 0 else np.zeros_like(counts)
    present = counts > 0
    k = int(present.sum())
    if scheme == "enet":
        return 1.0 / np.log(enet_c + freq)
    weights = np.zeros_like(counts)
    if k == 0:
        return weights
    if scheme == "inverse":
        weights[present] = 1.0 / (k * freq[present])
    elif scheme == "median":
        weights[present] = np.median(freq[present]) / freq[present]
    elif scheme == "effective":
        raw = (1.0 - effective_beta) / (1.0 - effective_beta ** counts[present])
        weights[present] = raw * k / raw.sum()
    elif scheme == "sqrt_inverse":
        weights[present] = 1.0 / (np.sqrt(freq[present]) * np.sqrt(freq[present]).sum())
    else:
        raise AssertionError(scheme)
    return weights


def oracle_focal(logits, target, *, gamma=2.0, alpha=None, weight="enet", ignore_index=255, reduction="mean",
                 normalize="pixels", poly_epsilon=0.0, enet_c=1.10, effective_beta=0.9999):
    """``(loss, magnitude)`` in float64 numpy; ``magnitude`` (same shape) bounds the rounding scale.

    Per valid pixel: ``w[y] a[y] (1 - p_t)^gamma (-log p_t) + eps (1 - p_t)^(gamma + 1)``.
    """
    z = logits.detach().cpu().to(torch.float64).numpy()
    num_classes = z.shape[1]
    z = np.moveaxis(z, 1, -1).reshape(-1, num_classes)
    t = target.cpu().numpy().astype(np.int64).reshape(-1)
    valid = t != ignore_index
    safe = np.where(valid, t, 0)
    rows = np.arange(t.size)

    z_max = z.max(axis=1, keepdims=True)
    e = np.exp(z - z_max)
    total = e.sum(axis=1)
    p = e / total[:, None]
    others = p.copy()
    others[rows, safe] = 0.0
    one_minus_pt = others.sum(axis=1)  # no cancellation when p_t -> 1
    neg_log_pt = np.where(
        one_minus_pt < 0.5,
        -np.log1p(-np.minimum(one_minus_pt, 0.5)),
        np.log(total) + z_max[:, 0] - z[rows, safe],
    )

    counts = np.bincount(t[valid], minlength=num_classes).astype(np.float64)
    if weight is None:
        w = np.ones(num_classes)
    elif isinstance(weight, str):
        w = oracle_class_weights(counts, weight, enet_c, effective_beta)
    else:
        w = np.asarray(weight, dtype=np.float64)
    if alpha is None:
        a = np.ones(num_classes)
    elif isinstance(alpha, float):
        a = np.array([alpha] + [1.0 - alpha] * (num_classes - 1))
    else:
        a = np.asarray(alpha, dtype=np.float64)
    pixel_weight = (w * a)[safe]

    focal = pixel_weight * one_minus_pt**gamma * neg_log_pt
    poly = poly_epsilon * one_minus_pt ** (gamma + 1)
    loss = np.where(valid, focal + poly, 0.0)
    magnitude = np.where(valid, np.abs(focal) + np.abs(poly), 0.0)
    if reduction == "none":
        return loss.reshape(tuple(target.shape)), magnitude.reshape(tuple(target.shape))
    if reduction == "sum":
        return loss.sum(), magnitude.sum()
    if normalize == "weights" and (weight is not None or alpha is not None):
        denominator = pixel_weight[valid].sum()
    else:
        denominator = float(valid.sum())
    if denominator == 0:
        return 0.0, 0.0
    return loss.sum() / denominator, magnitude.sum() / denominator


def assert_matches_oracle(ours, expected, magnitude, rtol=1e-9):
    """Relative agreement, except below the smallest normal number of ``ours``'s dtype, where a
    value cannot be represented with relative precision (an exact 1e-48 is 0 in float32)."""
    floor = torch.finfo(ours.dtype).tiny
    ours = ours.detach().cpu().to(torch.float64).numpy()
    expected = np.asarray(expected, dtype=np.float64)
    magnitude = np.asarray(magnitude, dtype=np.float64)
    assert ours.shape == expected.shape
    assert np.all(np.isfinite(ours))
    error = np.abs(ours - expected)
    bound = rtol * np.maximum(np.abs(expected), magnitude) + floor
    worst = np.argmax(error / bound) if error.size else 0
    assert np.all(error <= bound), (
        f"max relative error {float(np.max(error / np.maximum(bound, 1e-300)) * rtol):.3g}: "
        f"ours {ours.reshape(-1)[worst]!r} oracle {expected.reshape(-1)[worst]!r}"
    )


# =============================================================================================
# Random batches
# =============================================================================================


def make_batch(shape, *, seed=0, scale=3.0, ignore_fraction=0.0, ignore_index=255, target_dtype=torch.int64,
               dtype=torch.float64, num_used=None):
    g = torch.Generator().manual_seed(seed)
    num_classes = shape[1]
    logits = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    target_shape = (shape[0],) + tuple(shape[2:])
    used = num_classes if num_used is None else num_used
    subset = torch.randperm(num_classes, generator=g)[:used]
    target = subset[torch.randint(0, used, target_shape, generator=g)]
    ignored = torch.rand(target_shape, generator=g, dtype=torch.float64) < ignore_fraction
    target = torch.where(ignored, ignore_index, target).to(target_dtype)
    return logits.to(dtype), target


# =============================================================================================
# gamma = 0 is cross-entropy
# =============================================================================================

CE_SHAPES = [(37, 5), (2, 4, 6, 7), (2, 3, 3, 4, 5)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("ignore_index", [255, -100, 1])
def test_gamma_zero_is_cross_entropy(shape, ignore_index):
    logits, target = make_batch(shape, seed=3, ignore_fraction=0.25, ignore_index=ignore_index)
    num_classes = shape[1]
    fixed = torch.linspace(0.5, 2.5, num_classes, dtype=torch.float64)
    cases = [
        # (our options, cross_entropy options)
        (dict(weight=fixed, normalize="weights", reduction="mean"), dict(weight=fixed, reduction="mean")),
        (dict(weight=None, normalize="pixels", reduction="mean"), dict(reduction="mean")),
        (dict(weight=None, normalize="weights", reduction="mean"), dict(reduction="mean")),
        (dict(weight=fixed, reduction="sum"), dict(weight=fixed, reduction="sum")),
        (dict(weight=None, reduction="sum"), dict(reduction="sum")),
        (dict(weight=fixed, reduction="none"), dict(weight=fixed, reduction="none")),
        (dict(weight=None, reduction="none"), dict(reduction="none")),
        # per-class alpha acts like a fixed weight
        (dict(weight=None, alpha=fixed, normalize="weights"), dict(weight=fixed, reduction="mean")),
    ]
    for ours_options, ce_options in cases:
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        ours = focal_loss(x1, target, gamma=0, ignore_index=ignore_index, **ours_options)
        reference = F.cross_entropy(x2, target, ignore_index=ignore_index, **ce_options)
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-15)
        g = torch.randn(reference.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (ours * g).sum().backward()
        (reference * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-15)


def test_gamma_zero_pixels_with_fixed_weights_is_weighted_sum_over_pixel_count():
    logits, target = make_batch((2, 4, 5, 5), seed=9, ignore_fraction=0.3)
    fixed = torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=torch.float64)
    ours = focal_loss(logits, target, gamma=0, weight=fixed, normalize="pixels")
    reference = F.cross_entropy(logits, target, weight=fixed, ignore_index=255, reduction="sum") / (target != 255).sum()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)


def test_a_float_alpha_weighs_class_0_by_alpha_and_every_other_class_by_one_minus_alpha():
    """segfocal's convention, written out in float64 for three pixels of labels 0, 1 and 2. MONAI's softmax
    FocalLoss and kornia's focal_loss weigh class 0 by 1 - alpha and the others by alpha: their alpha is
    our 1 - alpha (README, the loss's option table)."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -0.4], [-1.5, 0.7, 1.1]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    alpha, gamma = 0.25, 2.0
    p_t = logits.softmax(dim=1)[torch.arange(3), target]
    expected = -torch.tensor([alpha, 1 - alpha, 1 - alpha], dtype=torch.float64) * (1 - p_t) ** gamma * p_t.log()
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):  # the chunked pass; the CPU kernel
        options = dict(gamma=gamma, alpha=alpha, weight=None)
        per_pixel = focal_loss(logits.to(dtype), target, reduction="none", **options)
        torch.testing.assert_close(per_pixel.double(), expected, rtol=tolerance, atol=0)
        total = focal_loss(logits.to(dtype), target, reduction="sum", **options)
        torch.testing.assert_close(total.double(), expected.sum(), rtol=tolerance, atol=0)
        module = FocalLoss(**options)(logits.to(dtype), target)  # mean over the three pixels
        torch.testing.assert_close(module.double(), expected.mean(), rtol=tolerance, atol=0)
    monai_convention = focal_loss(logits, target, gamma=gamma, alpha=[1 - alpha, alpha, alpha], weight=None,
                                  reduction="none")
    assert not torch.allclose(monai_convention, expected)


# =============================================================================================
# gradcheck
# =============================================================================================

GRADCHECK_OPTIONS = [
    dict(gamma=0.0, weight=None),
    dict(gamma=0.5, weight=None),
    dict(gamma=2.0, weight=None),
    dict(gamma=2.0, alpha=0.25, weight=None),
    dict(gamma=0.5, alpha=[0.2, 0.5, 0.9, 1.3], weight=None, normalize="weights"),
    dict(gamma=2.0, weight=[0.5, 1.0, 2.0, 3.0], normalize="weights"),
    dict(gamma=0.5, weight="enet"),
    dict(gamma=2.0, weight="enet", normalize="weights"),
    dict(gamma=0.0, weight="median", poly_epsilon=1.0),
    dict(gamma=2.0, weight="inverse", poly_epsilon=-0.5, alpha=0.3),
    dict(gamma=0.5, weight="effective", poly_epsilon=2.0, reduction="sum"),
    dict(gamma=2.0, weight="enet", poly_epsilon=1.0, reduction="none"),
]


@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3, 2)])
def test_gradcheck(options, shape):
    logits, target = make_batch(shape, seed=4, scale=1.5, ignore_fraction=0.3, ignore_index=255)
    assert (target == 255).any() and (target != 255).any()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, target, **options), (logits,), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# =============================================================================================
# hypothesis: loss values against the oracle
# =============================================================================================


@st.composite
def focal_cases(draw):
    num_classes = draw(st.integers(2, 8))
    ndim = draw(st.sampled_from([2, 4, 5]))
    if ndim == 2:
        shape = (draw(st.integers(1, 40)), num_classes)
    elif ndim == 4:
        shape = (draw(st.integers(1, 2)), num_classes, draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    else:
        shape = (draw(st.integers(1, 2)), num_classes, draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                 draw(st.integers(1, 4)))
    target_dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64]))
    if target_dtype == torch.uint8:  # cannot hold a negative ignore_index
        ignore_index = draw(st.sampled_from([255, 0, num_classes - 1]))
    else:
        ignore_index = draw(st.sampled_from([255, -100, -1, 0, num_classes - 1, num_classes]))
    weight = draw(st.sampled_from([None, "enet", "inverse", "median", "effective", "fixed"]))
    if weight == "fixed":
        weight = draw(st.lists(st.floats(0.1, 5.0), min_size=num_classes, max_size=num_classes))
    alpha = draw(st.one_of(
        st.none(),
        st.floats(0.05, 0.95),
        st.lists(st.floats(0.05, 1.5), min_size=num_classes, max_size=num_classes),
    ))
    options = dict(
        gamma=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.floats(0.0, 3.0))),
        alpha=alpha,
        weight=weight,
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        normalize=draw(st.sampled_from(["pixels", "weights"])),
        poly_epsilon=draw(st.one_of(st.just(0.0), st.floats(-1.0, 2.0))),
        enet_c=draw(st.sampled_from([1.02, 1.10, 1.5])),
        effective_beta=draw(st.sampled_from([0.9, 0.99, 0.9999])),
    )
    batch = dict(
        shape=shape,
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([0.1, 1.0, 3.0, 8.0])),
        ignore_fraction=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
        ignore_index=ignore_index,
        target_dtype=target_dtype,
        num_used=draw(st.integers(1, num_classes)),
    )
    return batch, options


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 2e-5)], ids=["float64", "float32"])
@HYPOTHESIS
@given(case=focal_cases())
def test_loss_matches_numpy_oracle(dtype, rtol, case):
    batch, options = case
    logits, target = make_batch(**batch, dtype=dtype)
    ours = focal_loss(logits, target, **options)
    assert ours.dtype == dtype
    expected, magnitude = oracle_focal(logits, target, **options)
    assert_matches_oracle(ours, expected, magnitude, rtol=rtol)


@HYPOTHESIS
@given(focal_cases())
def test_module_matches_functional(case):
    batch, options = case
    for key in ("weight", "alpha"):  # the module keeps fixed tensors as float32 buffers
        if isinstance(options[key], list):
            options[key] = [float(np.float32(v)) for v in options[key]]
    logits, target = make_batch(**batch)
    module = FocalLoss(**options).to(torch.float64)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = module(x1, target)
    b = focal_loss(x2, target, **options)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
    if a.requires_grad:
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-300)


# =============================================================================================
# memory layout
# =============================================================================================

LAYOUT_OPTIONS = [
    dict(gamma=2.0),
    dict(gamma=0.5, weight="median", alpha=0.25, poly_epsilon=1.0, normalize="weights"),
    dict(gamma=2.0, weight=None, reduction="none"),
]


def _loss_and_grad(logits, target, options):
    leaf = logits.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss = focal_loss(leaf, target, **options)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    (loss * g).sum().backward()
    return leaf, loss.detach(), leaf.grad


def _views_4d(x):
    """The same values as the contiguous ``x`` in other layouts."""
    b, c, h, w = x.shape
    wide = torch.zeros(b, c, 2 * h, w + 3, dtype=x.dtype)
    wide[:, :, ::2, 1:w + 1] = x
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed_hw": x.transpose(2, 3).contiguous().transpose(2, 3),
        "class_dim_last": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "batch_innermost": x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),
        "strided_slice": wide[:, :, ::2, 1:w + 1],
    }


@pytest.mark.parametrize("options", LAYOUT_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layouts_4d(options, dtype):
    logits, target = make_batch((2, 5, 6, 7), seed=12, ignore_fraction=0.2, dtype=dtype)
    _, loss, grad = _loss_and_grad(logits, target, options)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    views = _views_4d(logits)
    assert views["channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert not any(v.is_contiguous() for v in views.values())
    for name, view in views.items():
        torch.testing.assert_close(view, logits, rtol=0, atol=0)
        _, loss_v, grad_v = _loss_and_grad(view, target, options)
        torch.testing.assert_close(loss_v, loss, **tol, msg=name)
        torch.testing.assert_close(grad_v, grad, **tol, msg=name)
    # a non-contiguous target too
    target_t = target.transpose(1, 2).contiguous().transpose(1, 2)
    _, loss_t, grad_t = _loss_and_grad(views["channels_last"], target_t, options)
    torch.testing.assert_close(loss_t, loss, **tol)
    torch.testing.assert_close(grad_t, grad, **tol)


@pytest.mark.parametrize("options", LAYOUT_OPTIONS)
def test_layouts_5d(options):
    logits, target = make_batch((2, 4, 3, 5, 4), seed=13, ignore_fraction=0.2)
    _, loss, grad = _loss_and_grad(logits, target, options)
    views = {
        "channels_last_3d": logits.contiguous(memory_format=torch.channels_last_3d),
        "transposed": logits.transpose(2, 4).contiguous().transpose(2, 4),
        "sliced": torch.cat([logits, logits], dim=2)[:, :, 3:],
    }
    assert views["channels_last_3d"].is_contiguous(memory_format=torch.channels_last_3d)
    for name, view in views.items():
        torch.testing.assert_close(view, logits, rtol=0, atol=0)
        _, loss_v, grad_v = _loss_and_grad(view, target, options)
        torch.testing.assert_close(loss_v, loss, rtol=1e-12, atol=1e-15, msg=name)
        torch.testing.assert_close(grad_v, grad, rtol=1e-12, atol=1e-15, msg=name)


def test_layouts_2d():
    logits, target = make_batch((30, 6), seed=14, ignore_fraction=0.2)
    _, loss, grad = _loss_and_grad(logits, target, dict(gamma=2.0, alpha=0.25))
    for view in (logits.t().contiguous().t(), torch.cat([logits, logits], dim=1)[:, 6:],
                 torch.stack([logits, logits], dim=2)[:, :, 1]):
        _, loss_v, grad_v = _loss_and_grad(view, target, dict(gamma=2.0, alpha=0.25))
        torch.testing.assert_close(loss_v, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_v, grad, rtol=1e-12, atol=1e-15)


# =============================================================================================
# numerics
# =============================================================================================


@pytest.fixture(scope="module")
def big_batch():
    g = torch.Generator().manual_seed(21)
    logits = 4.0 * torch.randn(2, 19, 512, 512, generator=g)
    target = torch.randint(0, 19, (2, 512, 512), generator=g, dtype=torch.uint8)
    target[:, :40] = 255
    return logits, target


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_logits(big_batch, low):
    logits, target = big_batch
    low_logits = logits.to(low)
    ours = focal_loss(low_logits, target)
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours)
    reference = focal_loss(low_logits.float(), target)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=0)
    assert ours.item() > 0


def test_low_precision_gradient_dtype_and_finiteness():
    logits, target = make_batch((2, 19, 16, 16), seed=22, scale=4.0, ignore_fraction=0.1, dtype=torch.float16)
    leaf = logits.requires_grad_(True)
    loss = focal_loss(leaf, target, poly_epsilon=1.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert leaf.grad.dtype == torch.float16 and torch.isfinite(leaf.grad).all()
    reference_leaf = logits.detach().float().requires_grad_(True)
    focal_loss(reference_leaf, target, poly_epsilon=1.0).backward()
    torch.testing.assert_close(leaf.grad.float(), reference_leaf.grad, rtol=1e-2, atol=1e-5)


def test_float64_stays_float64():
    logits, target = make_batch((2, 3, 4, 4), seed=23)
    for reduction in ("mean", "sum", "none"):
        assert focal_loss(logits, target, reduction=reduction).dtype == torch.float64
        assert focal_loss(logits.float(), target, reduction=reduction).dtype == torch.float32


def _saturated(num_pixels, num_classes, margin, dtype):
    labels = torch.arange(num_pixels) % num_classes
    logits = torch.full((num_pixels, num_classes), -margin / 2, dtype=dtype)
    logits[torch.arange(num_pixels), labels] = margin / 2
    return logits, labels


@pytest.mark.parametrize("gamma", [0.25, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("margin", [100.0, 40.0, 87.0, 60.0])
def test_saturated_logits_give_finite_gradients(gamma, dtype, margin):
    flat_logits, flat_labels = _saturated(12, 4, margin, dtype)
    logits = flat_logits.view(3, 4, 4).permute(0, 2, 1).unsqueeze(-1)  # [B=3, C=4, H=4, W=1]
    labels = flat_labels.view(3, 4, 1)
    assert logits[1, :, 2, 0].argmax() == labels[1, 2, 0]
    for options in (dict(weight=None), dict(weight="enet", alpha=0.25, poly_epsilon=1.0),
                    dict(weight="median", normalize="weights", reduction="sum")):
        leaf = logits.clone().requires_grad_(True)
        loss = focal_loss(leaf, labels, gamma=gamma, **options)
        loss.backward()
        assert torch.isfinite(loss) and loss >= 0
        assert torch.isfinite(leaf.grad).all(), leaf.grad
        assert leaf.grad.abs().max() < 1.0


ALL_IGNORED_OPTIONS = [
    dict(reduction=r, normalize=n, weight=w, alpha=a, poly_epsilon=e)
    for r in ("mean", "sum", "none")
    for n in ("pixels", "weights")
    for w in (None, "enet", "inverse", "median", "effective", [1.0, 2.0, 3.0])
    for a in (None, 0.25)
    for e in (0.0, 1.0)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_all_ignored_batch_is_zero_with_zero_gradient(dtype):
    logits, _ = make_batch((2, 3, 4, 5), seed=24, dtype=dtype)
    target = torch.full((2, 4, 5), 255, dtype=torch.uint8)
    for options in ALL_IGNORED_OPTIONS:
        for gamma in (0.0, 0.5, 2.0):
            leaf = logits.clone().requires_grad_(True)
            loss = focal_loss(leaf, target, gamma=gamma, **options)
            assert torch.all(loss == 0), options
            loss.sum().backward()
            assert torch.all(leaf.grad == 0), options  # also rules out NaN
            module = FocalLoss(gamma=gamma, **options)
            leaf.grad = None
            module(leaf, target).sum().backward()
            assert torch.all(leaf.grad == 0), options


@pytest.mark.parametrize("margin", [2.0, 5.0, 8.0, 12.0, 16.0, 20.0, 25.0, 30.0])
@pytest.mark.parametrize("num_classes", [2, 6, 19])
def test_one_minus_pt_accuracy_when_pt_is_close_to_one(margin, num_classes):
    """Per-pixel loss at gamma 2 for confidently correct float32 logits, against float64."""
    g = torch.Generator().manual_seed(25)
    logits = torch.randn(8, num_classes, generator=g) * 0.5
    labels = torch.randint(0, num_classes, (8,), generator=g)
    logits[torch.arange(8), labels] += margin
    ours = focal_loss(logits, labels, gamma=2.0, weight=None, reduction="none")
    expected, _ = oracle_focal(logits, labels, gamma=2.0, weight=None, reduction="none")
    assert np.all(expected > 0)
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4, atol=0)
    # a naive 1 - exp(log p_t) in float32 cannot resolve 1 - p_t here
    if margin >= 16:
        log_pt = F.log_softmax(logits, dim=1)[torch.arange(8), labels]
        naive = (1 - log_pt.exp()) ** 2 * -log_pt
        assert not np.allclose(naive.double().numpy(), expected, rtol=1e-4, atol=0)


def test_poly_term_accuracy_when_pt_is_close_to_one():
    logits, labels = _saturated(6, 3, 30.0, torch.float32)
    ours = focal_loss(logits, labels, gamma=0.0, weight=None, poly_epsilon=1.0, reduction="none")
    expected, _ = oracle_focal(logits, labels, gamma=0.0, weight=None, poly_epsilon=1.0, reduction="none")
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4, atol=0)


# =============================================================================================
# class weights
# =============================================================================================

COUNTS = torch.tensor([50, 30, 20, 0])


def test_enet_weights_by_hand():
    expected = torch.tensor([1 / math.log(1.6), 1 / math.log(1.4), 1 / math.log(1.3), 1 / math.log(1.1)],
                            dtype=torch.float64)
    torch.testing.assert_close(expected, torch.tensor([2.127643145234443, 2.9720134119884607, 3.8114946867084014,
                                                       10.492058687257062], dtype=torch.float64))
    torch.testing.assert_close(weights_from_histogram(COUNTS, "enet", dtype=torch.float64), expected,
                               rtol=1e-14, atol=0)
    # ENet's own constant 1.02
    expected_102 = torch.tensor([1 / math.log(1.52), 1 / math.log(1.32), 1 / math.log(1.22), 1 / math.log(1.02)],
                                dtype=torch.float64)
    torch.testing.assert_close(weights_from_histogram(COUNTS, "enet", enet_c=1.02, dtype=torch.float64), expected_102,
                               rtol=1e-14, atol=0)


def test_inverse_weights_by_hand():
    weights = weights_from_histogram(COUNTS, "inverse", dtype=torch.float64)
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 10 / 9, 5 / 3, 0.0], dtype=torch.float64),
                               rtol=1e-14, atol=0)
    freq = COUNTS.double() / COUNTS.sum()
    torch.testing.assert_close((freq * weights).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("counts", [[7, 1, 0, 12, 3, 3, 0, 40], [1, 1], [5, 0, 0], [2, 9, 4, 1, 6]])
def test_inverse_weights_keep_the_unweighted_scale(counts):
    counts = torch.tensor(counts)
    freq = counts.double() / counts.sum()
    weights = weights_from_histogram(counts, "inverse", dtype=torch.float64)
    torch.testing.assert_close((freq * weights).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.all(weights[counts == 0] == 0)


def test_median_weights_odd_number_of_present_classes():
    # f = [.5, .3, .2, 0], median over present = .3
    weights = weights_from_histogram(COUNTS, "median", dtype=torch.float64)
    torch.testing.assert_close(weights, torch.tensor([0.6, 1.0, 1.5, 0.0], dtype=torch.float64), rtol=1e-14, atol=0)


def test_median_weights_even_number_of_present_classes():
    # f = [.6, .25, 0, .1, .05]: median of present = (.1 + .25) / 2 = .175
    counts = torch.tensor([60, 25, 0, 10, 5])
    weights = weights_from_histogram(counts, "median", dtype=torch.float64)
    expected = torch.tensor([0.175 / 0.6, 0.175 / 0.25, 0.0, 1.75, 3.5], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-14, atol=0)


def test_median_weights_one_present_class():
    weights = weights_from_histogram(torch.tensor([0, 0, 9, 0]), "median", dtype=torch.float64)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=0)


def test_effective_weights_by_hand():
    # beta = 0.5, counts 1, 2, 3: raw = .5 / (1 - .5^n) = 1, 2/3, 4/7; scaled to sum 3
    counts = torch.tensor([1, 2, 3, 0])
    raw = torch.tensor([1.0, 2 / 3, 4 / 7, 0.0], dtype=torch.float64)
    weights = weights_from_histogram(counts, "effective", effective_beta=0.5, dtype=torch.float64)
    torch.testing.assert_close(weights, raw * 3 / raw.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999, 0.99999])
def test_effective_weights_sum_to_the_number_of_present_classes(beta):
    weights = weights_from_histogram(COUNTS, "effective", effective_beta=beta, dtype=torch.float64)
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0, dtype=torch.float64), rtol=1e-13, atol=0)
    assert weights[3] == 0
    assert weights[0] < weights[1] < weights[2]  # rarer classes weigh more
    expected = oracle_class_weights(COUNTS.numpy(), "effective", effective_beta=beta)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-10)


def test_absent_classes():
    for scheme in ("inverse", "median", "effective"):
        weights = weights_from_histogram(COUNTS, scheme)
        assert weights[3] == 0 and torch.all(weights[:3] > 0), scheme
    enet = weights_from_histogram(COUNTS, "enet")
    assert torch.isfinite(enet).all() and enet[3] == pytest.approx(1 / math.log(1.1))


def test_empty_histogram():
    empty = torch.zeros(5, dtype=torch.int64)
    for scheme in WEIGHT_SCHEMES:
        weights = weights_from_histogram(empty, scheme)
        assert torch.isfinite(weights).all(), scheme
        if scheme == "enet":
            torch.testing.assert_close(weights, torch.full((5,), 1 / math.log(1.1)))
        else:
            assert torch.all(weights == 0), scheme


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
def test_weights_against_oracle_on_random_histograms(scheme):
    g = np.random.default_rng(31)
    for _ in range(20):
        counts = g.integers(0, 1000, size=g.integers(1, 12))
        counts[g.random(counts.size) < 0.3] = 0
        ours = weights_from_histogram(torch.from_numpy(counts), scheme, dtype=torch.float64).numpy()
        np.testing.assert_allclose(ours, oracle_class_weights(counts, scheme), rtol=1e-12, atol=0)


def test_sqrt_inverse_weights_against_the_float64_formula():
    """w_c = 1 / (sqrt(f_c) sum_k sqrt(f_k)) for present classes, 0 for absent ones; sum_c f_c w_c = 1."""
    counts = [400, 100, 0, 25]
    roots = [math.sqrt(n / 525) for n in counts]
    expected = [1 / (root * sum(roots)) if root else 0.0 for root in roots]
    ours = weights_from_histogram(torch.tensor(counts), "sqrt_inverse", dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-14, atol=0)
    assert float((ours * torch.tensor(counts) / 525).sum()) == pytest.approx(1.0, rel=1e-14)
    # rarer classes weigh more, but less than with "inverse"
    inverse = weights_from_histogram(torch.tensor(counts), "inverse", dtype=torch.float64)
    assert ours[3] > ours[1] > ours[0] and ours[3] / ours[0] < inverse[3] / inverse[0]


def test_weight_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert weights_from_histogram(COUNTS, "enet", dtype=dtype).dtype == dtype
        assert class_weights(torch.tensor([0, 1, 1]), 3, "median", dtype=dtype).dtype == dtype
    assert weights_from_histogram(COUNTS, "enet").dtype == torch.float32
    # float counts (e.g. an all-reduced float histogram) are accepted
    torch.testing.assert_close(weights_from_histogram(COUNTS.double(), "inverse"),
                               weights_from_histogram(COUNTS, "inverse"))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_class_histogram(dtype):
    target = torch.tensor([[0, 1, 1, 255], [2, 2, 2, 255], [5, 6, 1, 0]], dtype=dtype)
    histogram = class_histogram(target, 4)
    assert histogram.dtype == torch.int64
    assert histogram.tolist() == [2, 3, 3, 0]  # 255, 5 and 6 are not counted
    if dtype != torch.uint8:
        signed = torch.tensor([-1, -100, 0, 3, 4], dtype=dtype)
        assert class_histogram(signed, 4).tolist() == [1, 0, 0, 1]
    assert class_histogram(torch.tensor([], dtype=dtype), 3).tolist() == [0, 0, 0]


def test_class_weights_is_weights_of_histogram():
    _, target = make_batch((2, 5, 7, 7), seed=33, ignore_fraction=0.2, num_used=3)
    for scheme in WEIGHT_SCHEMES:
        expected = oracle_class_weights(np.bincount(target[target != 255].numpy(), minlength=5), scheme)
        np.testing.assert_allclose(class_weights(target, 5, scheme, dtype=torch.float64).numpy(), expected,
                                   rtol=1e-12)


def test_class_weight_parameter_validation():
    with pytest.raises(ValueError, match="bogus"):
        weights_from_histogram(COUNTS, "bogus")
    with pytest.raises(ValueError, match="enet_c"):
        weights_from_histogram(COUNTS, "enet", enet_c=1.0)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="effective_beta"):
            weights_from_histogram(COUNTS, "effective", effective_beta=beta)


# =============================================================================================
# module
# =============================================================================================

MODULE_OPTIONS = [
    dict(),
    dict(gamma=0.0, weight=None),
    dict(gamma=1.5, alpha=0.25, weight="inverse"),
    dict(alpha=[0.125, 0.5, 1.0, 2.0], weight="median", normalize="weights"),
    dict(weight=[1.0, 2.0, 3.0, 4.0], normalize="weights", poly_epsilon=1.0),
    dict(weight="effective", effective_beta=0.99, reduction="sum"),
    dict(weight="enet", enet_c=1.02, reduction="none", ignore_index=-100),
    dict(weight="enet", ignore_index=0),
]


@pytest.mark.parametrize("options", MODULE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_equals_functional(options, dtype):
    ignore_index = options.get("ignore_index", 255)
    logits, target = make_batch((2, 4, 5, 6), seed=41, ignore_fraction=0.2, ignore_index=ignore_index, dtype=dtype)
    module = FocalLoss(**options).to(dtype)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = module(x1, target)
    b = focal_loss(x2, target, **options)
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-20)
    # the module is stateless between calls: the same value twice, then a different batch works
    torch.testing.assert_close(module(logits, target), a.detach(), rtol=0, atol=0)
    other_logits, other_target = make_batch((1, 4, 3, 3), seed=42, dtype=dtype, ignore_index=ignore_index)
    torch.testing.assert_close(module(other_logits, other_target), focal_loss(other_logits, other_target, **options),
                               rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


def test_module_buffers():
    module = FocalLoss(weight=[1.0, 2.0, 3.0], alpha=[0.5, 0.25, 0.25])
    state = module.state_dict()
    assert set(state) == {"weight", "alpha"}
    torch.testing.assert_close(state["weight"], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(state["alpha"], torch.tensor([0.5, 0.25, 0.25]))
    assert module.weight.dtype == torch.float32
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64 and module.alpha.dtype == torch.float64
    assert dict(module.named_buffers()).keys() == {"weight", "alpha"}
    # the state dict round-trips into a fresh module
    fresh = FocalLoss(weight=[0.0, 0.0, 0.0], alpha=[0.0, 0.0, 0.0]).to(torch.float64)
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh.weight, module.weight)
    logits, target = make_batch((2, 3, 4, 4), seed=43)
    torch.testing.assert_close(fresh(logits, target), module(logits, target), rtol=0, atol=0)


def test_module_scheme_and_scalar_alpha_have_no_buffers():
    module = FocalLoss(weight="enet", alpha=0.25)
    assert module.state_dict() == {}
    assert module.weight is None and module.alpha is None


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
def test_module_last_class_weights(scheme):
    module = FocalLoss(weight=scheme)
    assert module.last_class_weights is None
    for seed in (44, 45):
        logits, target = make_batch((2, 6, 5, 5), seed=seed, ignore_fraction=0.3, num_used=4)
        module(logits.float().requires_grad_(True), target)
        torch.testing.assert_close(module.last_class_weights, class_weights(target, 6, scheme), rtol=1e-6, atol=0)
        assert not module.last_class_weights.requires_grad


def test_module_last_class_weights_exclude_an_in_range_ignore_index():
    _, target = make_batch((2, 4, 6, 6), seed=46, ignore_fraction=0.3, ignore_index=0)
    target = torch.where(target == 0, 0, target)  # class 0 only appears as the ignore label
    module = FocalLoss(weight="inverse", ignore_index=0)
    module(torch.randn(2, 4, 6, 6), target)
    counts = np.bincount(target[target != 0].numpy(), minlength=4)
    np.testing.assert_allclose(module.last_class_weights.numpy(), oracle_class_weights(counts, "inverse"), rtol=1e-6)
    assert module.last_class_weights[0] == 0


def test_module_repr():
    text = repr(FocalLoss(gamma=1.5, alpha=0.25, weight="median", ignore_index=-1, reduction="sum",
                          normalize="weights", poly_epsilon=0.5))
    for part in ("FocalLoss", "gamma=1.5", "alpha=0.25", "weight=median", "ignore_index=-1", "reduction='sum'",
                 "normalize='weights'", "poly_epsilon=0.5"):
        assert part in text, (part, text)
    text = repr(FocalLoss(weight=[1.0, 2.0], alpha=[0.5, 0.5]))
    assert "weight=fixed" in text and "alpha=per-class" in text
    assert "weight=None" in repr(FocalLoss(weight=None))
