"""The soft Dice loss against independent float64 formulas: a numpy one written as loops over samples and
classes, and MONAI's DiceLoss convention (and MONAI itself where it is installed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segfocal.losses import DiceLoss, DiceOptions, FocalLoss, class_weights, dice_loss

IGNORE = 255
SHAPES = [(9, 4), (2, 3, 5, 4), (3, 5, 6, 6), (2, 3, 2, 3, 4)]  # [N, C], [B, C, H, W], [B, C, D, H, W]


def _batch(shape, seed, ignored=0.0, dtype=torch.float64):
    """Logits of ``shape`` and skewed labels (so class weights differ; some classes may be absent)."""
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    num_classes = shape[1]
    label_shape = (shape[0],) + tuple(shape[2:])
    probs = torch.linspace(1.0, 0.1, num_classes, dtype=torch.float64)
    target = torch.multinomial(probs, int(np.prod(label_shape)), replacement=True, generator=g).view(label_shape)
    drop = torch.rand(label_shape, generator=g) < ignored
    return logits, torch.where(drop, IGNORE, target)


def reference(logits, target, *, weight=None, ignore_index=IGNORE, smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
              reduction="mean"):
    """The Dice loss in numpy float64: loops over samples (or one group of all) and classes."""
    x = logits.detach().double().numpy()
    t = target.numpy().astype(np.int64)
    if x.ndim == 2:  # [N, C]: one sample of N pixels
        x, t = x.T[None], t[None]
    x = x.reshape(x.shape[0], x.shape[1], -1)
    t = t.reshape(t.shape[0], -1)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    groups = [list(range(x.shape[0]))] if batch else [[b] for b in range(x.shape[0])]
    losses = np.zeros((len(groups), x.shape[1]))
    for g, members in enumerate(groups):
        for c in range(x.shape[1]):
            intersection = predicted = truth = 0.0
            for b in members:
                counted = t[b] != ignore_index
                predicted += p[b, c][counted].sum()
                intersection += p[b, c][counted & (t[b] == c)].sum()
                truth += np.count_nonzero(counted & (t[b] == c))
            losses[g, c] = 1.0 - (2.0 * intersection + smooth_nr) / (predicted + truth + smooth_dr)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    weighted = losses * w
    if reduction == "none":
        return weighted[0] if batch else weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / (w.sum() * len(groups))


def _close(actual, expected, rtol=1e-12, atol=1e-14):
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_float64_formula(shape, batch, reduction):
    logits, target = _batch(shape, seed=sum(shape), ignored=0.2)
    ours = dice_loss(logits, target, batch=batch, reduction=reduction)
    assert ours.dtype == torch.float64
    _close(ours, reference(logits, target, batch=batch, reduction=reduction))


@pytest.mark.parametrize("shape", SHAPES)
def test_ignored_pixels_change_neither_value_nor_gradient(shape):
    logits, target = _batch(shape, seed=3, ignored=0.3)
    ignored = target == IGNORE
    assert ignored.any()
    logits.requires_grad_(True)
    loss = dice_loss(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    noisy = logits.detach().clone()
    mask = ignored.unsqueeze(1).expand_as(noisy)
    noisy[mask] = 50.0  # scores at ignored pixels must not matter
    assert dice_loss(noisy, target).item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.all(grad[mask] == 0)


def test_ignore_index_inside_the_class_range_drops_those_pixels_everywhere():
    logits, target = _batch((2, 4, 5, 5), seed=4)
    assert (target == 0).any()
    ours = dice_loss(logits, target, ignore_index=0, reduction="none")
    _close(ours, reference(logits, target, ignore_index=0, reduction="none"))


@pytest.mark.parametrize("batch", [False, True])
def test_fixed_class_weights_give_the_weighted_mean(batch):
    logits, target = _batch((3, 4, 6, 5), seed=5, ignored=0.1)
    weight = [0.0, 1.0, 2.5, 0.5]
    for reduction in ("mean", "sum", "none"):
        ours = dice_loss(logits, target, weight=weight, batch=batch, reduction=reduction)
        _close(ours, reference(logits, target, weight=weight, batch=batch, reduction=reduction))
    module = DiceLoss(weight=weight, batch=batch)
    assert module.state_dict()["weight"].tolist() == weight  # a buffer, saved in checkpoints
    _close(module(logits, target), reference(logits, target, weight=weight, batch=batch))


@pytest.mark.parametrize("scheme", ["enet", "inverse", "median", "effective"])
def test_weight_schemes_come_from_the_batch_histogram_like_the_focal_loss(scheme):
    logits, target = _batch((2, 5, 6, 6), seed=6, ignored=0.1)
    dice = DiceLoss(weight=scheme)
    focal = FocalLoss(weight=scheme)
    value = dice(logits, target)
    focal(logits, target)
    expected_weights = class_weights(target, 5, scheme, ignore_index=IGNORE, dtype=torch.float64)
    torch.testing.assert_close(dice.last_class_weights, expected_weights, rtol=0, atol=0)
    torch.testing.assert_close(dice.last_class_weights, focal.last_class_weights, rtol=0, atol=0)
    _close(value, reference(logits, target, weight=expected_weights.numpy()))


def test_inverse_weights_written_out():
    """The "inverse" scheme by hand on a small batch: 1 / (K f_c) for present classes, 0 for absent ones."""
    target = torch.tensor([[0, 0, 0, 1, 1, IGNORE]])  # class 2 absent
    logits = torch.randn(1, 3, 6, dtype=torch.float64)
    loss = DiceLoss(weight="inverse")
    loss(logits, target)
    f0, f1 = 3 / 5, 2 / 5
    assert loss.last_class_weights.tolist() == pytest.approx([1 / (2 * f0), 1 / (2 * f1), 0.0], rel=1e-12)


@pytest.mark.parametrize("smooth_nr, smooth_dr", [(0.0, 1e-5), (1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("batch", [False, True])
def test_smoothing_terms(smooth_nr, smooth_dr, batch):
    logits, target = _batch((2, 3, 4, 4), seed=7, ignored=0.1)
    ours = dice_loss(logits, target, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, reduction="none")
    _close(ours, reference(logits, target, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, reduction="none"))


def test_a_class_absent_from_target_and_prediction_costs_nothing_and_predicted_mass_costs_almost_one():
    target = torch.zeros(1, 4, 4, dtype=torch.long)  # only class 0
    logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    logits[:, 0] = 40.0  # class 0 everywhere with certainty: classes 1 and 2 get ~4e-18 each
    per_class = dice_loss(logits, target, reduction="none")[0]
    assert per_class.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)  # 1 - s / (P + s), P ~ 1e-16
    logits[:, 2] = 40.0  # half of the mass moves to the absent class 2
    per_class = dice_loss(logits, target, reduction="none")[0]
    assert per_class[2].item() == pytest.approx(1.0 - 1e-5 / (8.0 + 1e-5), rel=1e-12)
    assert per_class[0].item() == pytest.approx(1.0 - (2 * 8.0 + 1e-5) / (8.0 + 16.0 + 1e-5), rel=1e-12)


def test_all_ignored_and_all_zero_weights_give_zero_with_a_zero_gradient():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    assert dice_loss(logits, target).item() == 0.0  # every class: 1 - s / s
    loss = dice_loss(logits, _batch((2, 3, 4, 4), 1)[1], weight=[0.0, 0.0, 0.0])
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("weight", [None, [0.5, 1.0, 2.0]])
def test_gradcheck_float64(batch, weight):
    logits, target = _batch((2, 3, 2, 3), seed=8, ignored=0.2)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dice_loss(x, target, batch=batch, weight=weight), (logits,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_summed_in_float32(dtype):
    """fp16/bf16 logits give the float64 formula's value on the same (rounded) numbers to 1e-5."""
    logits, target = _batch((2, 4, 16, 16), seed=9, ignored=0.1, dtype=dtype)
    ours = dice_loss(logits, target, reduction="none")
    assert ours.dtype == torch.float32
    _close(ours, reference(logits, target, reduction="none"), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = DiceLoss()(logits, target)
    assert under_autocast.dtype == torch.float32
    _close(under_autocast, reference(logits, target), rtol=1e-5, atol=1e-6)


def test_a_large_fp16_image_does_not_overflow_the_sums():
    """300 x 300 pixels: a class's pixel count (90,000) is beyond fp16's largest number (65,504)."""
    logits, target = _batch((1, 2, 300, 300), seed=10, dtype=torch.float16)
    target = torch.zeros_like(target)  # class 0 everywhere: its count is the whole image
    ours = dice_loss(logits, target, reduction="none")
    assert torch.isfinite(ours).all()
    _close(ours, reference(logits, target, reduction="none"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layouts_agree(reduction):
    """channels_last and [N, C] views of the same pixels give the same loss."""
    logits, target = _batch((2, 3, 4, 5), seed=11, ignored=0.1)
    expected = dice_loss(logits, target, reduction=reduction)
    channels_last = dice_loss(logits.contiguous(memory_format=torch.channels_last), target, reduction=reduction)
    assert channels_last.item() == pytest.approx(expected.item(), rel=1e-12)
    flat_logits = logits[:1].permute(0, 2, 3, 1).reshape(-1, 3)
    one_sample = dice_loss(logits[:1], target[:1], reduction=reduction)
    assert dice_loss(flat_logits, target[:1].reshape(-1), reduction=reduction).item() == pytest.approx(
        one_sample.item(), rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"smooth_dr": 0.0}, "smooth_dr must be a finite number > 0"),
    ({"smooth_nr": -1.0}, "smooth_nr must be a finite number >= 0"),
    ({"reduction": "batchmean"}, "reduction must be one of"),
    ({"weight": "inverse_sqrt"}, "unknown weight 'inverse_sqrt'"),
    ({"weight": [1.0, 2.0]}, r"weight must have one value per class \(3\)"),
    ({"weight": [1.0, -1.0, 1.0]}, "weight must be finite and non-negative"),
])
def test_invalid_options_raise_naming_them(kwargs, message):
    logits, target = _batch((2, 3, 4, 4), seed=12)
    with pytest.raises(ValueError, match=message):
        dice_loss(logits, target, **kwargs)


def test_labels_out_of_range_are_rejected():
    logits, target = _batch((2, 3, 4, 4), seed=13)
    target[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"label\(s\) 3 outside \[0, 3\)"):
        dice_loss(logits, target)


# ------------------------------------------------------------------------------ MONAI


def monai_convention(logits, target, *, batch=False, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5):
    """MONAI's ``DiceLoss(softmax=True, to_onehot_y=True, reduction="mean")`` as documented, in float64:
    softmax over channels, one-hot target ``[B, C, ...]``, the background channel dropped after the
    softmax when ``include_background=False``, sums over the spatial dimensions (and the batch when
    ``batch=True``), ``f = 1 - (2 I + smooth_nr) / (G + P + smooth_dr)``, ``torch.mean(f)``. MONAI has
    no ignore_index."""
    probs = torch.softmax(logits.double(), dim=1)
    one_hot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).double()
    if not include_background:
        probs, one_hot = probs[:, 1:], one_hot[:, 1:]
    dims = [0] * batch + list(range(2, logits.ndim))
    f = 1.0 - (2.0 * (probs * one_hot).sum(dims) + smooth_nr) / (one_hot.sum(dims) + probs.sum(dims) + smooth_dr)
    return f.mean()


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("batch", [False, True])
def test_matches_monai_convention_where_they_coincide(shape, batch):
    """Without ignored pixels: no weights is MONAI's default; weights [0, 1, ..., 1] (our weighted mean
    over the other classes) are MONAI's ``include_background=False``."""
    logits, target = _batch(shape, seed=14)
    _close(dice_loss(logits, target, batch=batch), monai_convention(logits, target, batch=batch).numpy())
    no_background = [0.0] + [1.0] * (shape[1] - 1)
    _close(dice_loss(logits, target, batch=batch, weight=no_background),
           monai_convention(logits, target, batch=batch, include_background=False).numpy())


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_matches_monai_itself(batch, include_background):
    monai_losses = pytest.importorskip("monai.losses")
    logits, target = _batch((2, 4, 6, 5), seed=15)
    expected = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background,
                                     batch=batch)(logits, target.unsqueeze(1))
    weight = None if include_background else [0.0, 1.0, 1.0, 1.0]
    _close(dice_loss(logits, target, batch=batch, weight=weight), expected.detach().numpy())


def test_the_module_keeps_its_options_as_one_value_read_only_and_its_state_dict_as_before():
    loss = DiceLoss(weight=[0.0, 1.0, 1.0], smooth_nr=0.5, smooth_dr=2.0, batch=True, ignore_index=7)
    assert isinstance(loss.options, DiceOptions)
    assert (loss.smooth_nr, loss.smooth_dr, loss.batch, loss.ignore_index, loss.reduction) == (0.5, 2.0, True, 7, "mean")
    with pytest.raises(AttributeError):
        loss.smooth_nr = 1.0
    assert list(loss.state_dict()) == ["weight"]  # the fixed weights' buffer, as before the options value
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 4, generator=generator), torch.randint(0, 3, (2, 4, 4), generator=generator)
    target[0, 0, 0] = 7
    expected = dice_loss(logits, target, weight=[0.0, 1.0, 1.0], smooth_nr=0.5, smooth_dr=2.0, batch=True,
                         ignore_index=7)
    assert torch.equal(loss(logits, target), expected)
