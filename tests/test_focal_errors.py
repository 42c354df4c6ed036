"""Bad input gives a ValueError that names the offending value or shape, from the functional and
the module (whose constructor rejects bad options before any data is seen)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from segfocal.losses import FocalLoss, focal_loss


def _batch(num_classes=6, target_dtype=torch.int64):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 5, 5, generator=g)
    target = torch.randint(0, num_classes, (2, 5, 5), generator=g).to(target_dtype)
    return logits, target


def _both(logits, target, match, **options):
    """The functional and a module built with ``options`` both raise ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match):
        focal_loss(logits, target, **options)
    with pytest.raises(ValueError, match=match):
        FocalLoss(**options)(logits, target)


# ------------------------------------------------------------------------------- labels

WEIGHTS = ["enet", None, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]  # the module has separate code paths for these


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
def test_label_at_or_above_num_classes(weight, target_dtype):
    logits, target = _batch(target_dtype=target_dtype)
    target[1, 2, 3] = 7
    _both(logits, target, r"label\(s\) 7 outside \[0, 6\)", weight=weight)
    target[0, 0, 0] = 6
    _both(logits, target, r"6, 7 outside", weight=weight)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_negative_label(weight):
    logits, target = _batch()
    target[0, 4, 4] = -3
    _both(logits, target, r"label\(s\) -3 outside \[0, 6\).*ignore_index=255", weight=weight)
    # the same value is fine once it is the ignore_index
    focal_loss(logits, target, ignore_index=-3, weight=weight)
    FocalLoss(ignore_index=-3, weight=weight)(logits, target)


def test_many_bad_labels_are_listed_with_an_ellipsis():
    logits, target = _batch()
    target.view(-1)[:15] = torch.arange(10, 25)
    with pytest.raises(ValueError, match=r"label\(s\) 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, \.\.\. outside"):
        focal_loss(logits, target)


def test_out_of_range_ignore_index_does_not_wrap_in_a_narrow_dtype():
    """uint8 cannot hold -100: a plain ``target != -100`` would compare against 156 and hide it."""
    logits, target = _batch(num_classes=3, target_dtype=torch.uint8)
    target[0, 0, 0] = 156
    _both(logits, target, r"label\(s\) 156 outside \[0, 3\)", ignore_index=-100)
    # and nothing is ignored then
    target[0, 0, 0] = 1
    torch.testing.assert_close(focal_loss(logits, target, ignore_index=-100),
                               focal_loss(logits, target.long(), ignore_index=-100), rtol=0, atol=0)


# ------------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("weight", WEIGHTS)
def test_shape_mismatch_names_both_shapes(weight):
    logits, _ = _batch()
    target = torch.zeros(2, 5, 4, dtype=torch.int64)
    _both(logits, target, r"target shape \(2, 5, 4\) does not match logits shape \(2, 6, 5, 5\)", weight=weight)
    # a target with a class dimension (e.g. one-hot) is a mismatch too
    _both(logits, torch.zeros(2, 6, 5, 5, dtype=torch.int64), r"\(2, 6, 5, 5\).*\(2, 6, 5, 5\).*\(2, 5, 5\)",
          weight=weight)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_float_target(weight, dtype):
    logits, target = _batch()
    _both(logits, target.to(dtype), f"integer class indices, got dtype {re.escape(str(dtype))}", weight=weight)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_target_asks_for_a_conversion(dtype):
    logits, target = _batch()
    _both(logits, target.to(dtype), rf"target dtype {re.escape(str(dtype))} is not supported.*target\.long\(\)")


@pytest.mark.parametrize("weight", WEIGHTS)
def test_bool_target(weight):
    logits, target = _batch()
    _both(logits, target > 2, r"got dtype torch\.bool", weight=weight)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_one_dimensional_logits(weight):
    _both(torch.randn(6), torch.tensor(1), r"class dimension.*got shape \(6,\)", weight=weight)
    _both(torch.randn(6), torch.zeros(6, dtype=torch.int64), r"got shape \(6,\)", weight=weight)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_integer_logits(weight):
    _, target = _batch()
    _both(torch.zeros(2, 6, 5, 5, dtype=torch.int64), target, r"floating-point.*torch\.int64", weight=weight)


# ------------------------------------------------------------------------------- scalar options


BAD_OPTIONS = [
    (dict(gamma=-1.0), r"gamma must be a finite number >= 0, got -1\.0"),
    (dict(gamma=-0.5), r"got -0\.5"),
    (dict(gamma=math.nan), r"gamma .* got nan"),
    (dict(gamma=math.inf), r"gamma .* got inf"),
    (dict(gamma="2"), r"gamma .* got '2'"),
    (dict(poly_epsilon=math.nan), r"poly_epsilon .* got nan"),
    (dict(poly_epsilon=-math.inf), r"poly_epsilon .* got -inf"),
    (dict(reduction="avg"), r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(reduction="elementwise_mean"), r"got 'elementwise_mean'"),
    (dict(normalize="batch"), r"normalize must be one of \('pixels', 'weights'\), got 'batch'"),
    (dict(weight="balanced"), r"unknown weight 'balanced'"),
    (dict(weight="ENet"), r"unknown weight 'ENet'"),
]


@pytest.mark.parametrize("options,match", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_option_functional(options, match):
    logits, target = _batch()
    with pytest.raises(ValueError, match=match):
        focal_loss(logits, target, **options)


@pytest.mark.parametrize("options,match", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_option_rejected_by_module_constructor(options, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss(**options)


@pytest.mark.parametrize("scheme,option,value", [("enet", "enet_c", 1.0), ("enet", "enet_c", 0.5),
                                                 ("effective", "effective_beta", 1.0),
                                                 ("effective", "effective_beta", 0.0)])
def test_bad_scheme_parameters(scheme, option, value):
    logits, target = _batch()
    _both(logits, target, f"{option} .*{value}", weight=scheme, **{option: value})


# ------------------------------------------------------------------------------- per-class tensors


@pytest.mark.parametrize("length", [5, 7, 1])
def test_wrong_length_weight(length):
    logits, target = _batch()
    _both(logits, target, rf"weight must have one value per class \(6\), got shape \({length},\)",
          weight=[1.0] * length)
    with pytest.raises(ValueError, match=rf"got shape \({length},\)"):
        focal_loss(logits, target, weight=torch.ones(length))


@pytest.mark.parametrize("length", [5, 7])
def test_wrong_length_alpha(length):
    logits, target = _batch()
    _both(logits, target, rf"alpha must have one value per class \(6\), got shape \({length},\)",
          alpha=[0.5] * length, weight=None)
    _both(logits, target, rf"alpha must have one value per class \(6\), got shape \({length},\)",
          alpha=[0.5] * length, weight="enet")


def test_two_dimensional_weight():
    logits, target = _batch()
    with pytest.raises(ValueError, match=r"weight must have one value per class \(6\), got shape \(2, 3\)"):
        focal_loss(logits, target, weight=torch.ones(2, 3))


def test_errors_are_raised_before_indexing():
    """A label far out of range would make gather raise a RuntimeError (or a CUDA device assert)."""
    logits, target = _batch()
    target[0, 0, 0] = 10**6
    with pytest.raises(ValueError, match="1000000"):
        focal_loss(logits, target)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=[1.0, -1.0, 1.0]), "weight must be finite and non-negative"),
    (dict(weight=torch.tensor([1.0, float("nan"), 1.0])), "weight must be finite and non-negative"),
    (dict(weight=None, alpha=[0.5, float("inf"), 0.5]), "alpha must be finite and non-negative"),
    (dict(weight=None, alpha=[0.5, -0.5, 0.5]), "alpha must be finite and non-negative"),
    (dict(alpha=1.5), "alpha as a number must lie in"),
    (dict(ignore_index=255.0), "ignore_index must be an integer"),
    (dict(ignore_index=True), "ignore_index must be an integer"),
])
def test_weights_alpha_and_ignore_index_that_would_wreck_training_are_refused(kwargs, match):
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        focal_loss(logits, target, **kwargs)


def test_the_module_exposes_its_options_read_only_as_torch_losses_do():
    from segfocal.losses import FocalLoss

    loss = FocalLoss(gamma=3.0, ignore_index=7, reduction="sum", normalize="weights", poly_epsilon=0.5)
    assert (loss.gamma, loss.ignore_index, loss.reduction, loss.normalize, loss.poly_epsilon) == (
        3.0, 7, "sum", "weights", 0.5)
    with pytest.raises(AttributeError):
        loss.gamma = 1.0  # the options are one frozen value: build a new loss instead
