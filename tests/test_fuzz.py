"""Fuzzing the public edges: the focal loss (functional and module) and the config loader.

Random, mostly invalid input must either be rejected with ``ValueError`` (``ConfigError`` for
configs, naming the file or key) or be accepted; nothing else may escape (no TypeError,
IndexError, ZeroDivisionError, RuntimeError, yaml error, ...). Inputs that a small independent
predicate calls valid must be accepted and give finite values and gradients, with the fused and
reference implementations agreeing.
"""
from __future__ import annotations

import math
import os
import tempfile
import typing
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from segfocal.config import Config, ConfigError, SyntheticConfig, load_config, save_config, to_dict
from segfocal.losses import WEIGHT_SCHEMES, FocalLoss, class_histogram, class_weights, focal_loss, weights_from_histogram
from segfocal.losses import fused as fused_module

# SEGFOCAL_FUZZ_EXAMPLES=5000 for a longer search than the default run's
EXAMPLES = int(os.environ.get("SEGFOCAL_FUZZ_EXAMPLES", "200"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
NAN, INF = math.nan, math.inf

# ======================================================================================= loss

LOGIT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
TARGET_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.uint16, torch.float32,
                 torch.bool]
INT_RANGES = {torch.int8: (-2**7, 2**7 - 1), torch.uint8: (0, 2**8 - 1), torch.int16: (-2**15, 2**15 - 1),
              torch.int32: (-2**31, 2**31 - 1), torch.int64: (-2**63, 2**63 - 1)}

GAMMAS = st.one_of(st.floats(0, 10), st.sampled_from(
    [0, 1, 2.0, 0.5, 1e6, 1e30, 1e300, -1.0, -1e-9, NAN, INF, -INF, "2", None]))
ALPHAS = st.one_of(
    st.none(), st.floats(0, 1), st.sampled_from([0, 1, 0.0, 0.25, 1.0, 1.5, -0.5, NAN]),
    st.lists(st.floats(0, 2), max_size=7),
    st.lists(st.floats(0, 2), max_size=7).map(lambda v: torch.tensor(v, dtype=torch.float64)),
)
PER_CLASS_VALUES = st.one_of(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0, 1e3, -1.0]), st.floats(1e-3, 1e3))
WEIGHTS = st.one_of(
    st.none(), st.sampled_from(list(WEIGHT_SCHEMES) + ["ENet", "balanced", ""]),
    st.lists(PER_CLASS_VALUES, max_size=7),
    st.lists(PER_CLASS_VALUES, max_size=7).map(torch.tensor),
    st.lists(PER_CLASS_VALUES, min_size=1, max_size=4).map(lambda v: [v]),  # 2-D
    st.sampled_from([1, 2.5]),  # a scalar is not one value per class
)
IGNORE_INDICES = st.one_of(st.integers(-300, 300), st.sampled_from([255, -100, -1, 0, 1, 2**40, 2**63, -2**63 - 1]))


@st.composite
def loss_cases(draw):
    """Half the cases are 'wild' (anything goes, mostly invalid), half 'tame' (valid by construction
    apart from the occasional non-finite logit), so both sides of the property get exercised."""
    tame = draw(st.booleans())
    if tame:
        ndim = draw(st.sampled_from([2, 3, 4, 4, 5]))
        shape = [draw(st.integers(0, 4) if i != 1 else st.integers(1, 5)) for i in range(ndim)]
    else:
        ndim = draw(st.sampled_from([0, 1, 2, 2, 3, 4, 4, 5]))
        shape = [draw(st.integers(0, 4)) for _ in range(ndim)]
        if ndim >= 2:
            shape[1] = draw(st.sampled_from([0, 1, 2, 3, 5]))
    num_classes = shape[1] if ndim >= 2 else 1
    expected_target = shape[:1] + shape[2:] if ndim >= 2 else shape
    if tame:
        target_shape = expected_target
        logit_dtype = draw(st.sampled_from([torch.float32, torch.float64] * 3 + [torch.float16, torch.bfloat16]))
        target_dtype = draw(st.sampled_from(list(INT_RANGES)))
        per_class = st.lists(st.floats(0, 2), min_size=num_classes, max_size=num_classes)
        options = dict(
            gamma=draw(st.one_of(st.floats(0, 10), st.sampled_from([0, 1, 2.0, 0.5, 1e6, 1e30]))),
            alpha=draw(st.one_of(st.none(), st.floats(0, 1), per_class, per_class.map(torch.tensor))),
            weight=draw(st.one_of(st.none(), st.sampled_from(WEIGHT_SCHEMES), per_class,
                                  per_class.map(lambda v: torch.tensor(v, dtype=torch.float64)))),
            ignore_index=draw(st.one_of(st.sampled_from([255, -100, -1, 0, 2**40]), st.integers(-3, 6))),
            reduction=draw(st.sampled_from(["mean", "sum", "none"])),
            normalize=draw(st.sampled_from(["pixels", "weights"])),
            implementation=draw(st.sampled_from(["auto", "reference"])),
            poly_epsilon=draw(st.one_of(st.just(0.0), st.floats(-2, 2))),
        )
        if draw(st.integers(0, 3)) == 0:
            options["enet_c"] = draw(st.one_of(st.sampled_from([1.02, INF, 1 + 2**-50]), st.floats(1.001, 10)))
        if draw(st.integers(0, 3)) == 0:
            options["effective_beta"] = draw(st.sampled_from([0.5, 1e-300, 0.9, 0.999999]))
        if options["reduction"] != "none" and draw(st.booleans()):
            options["implementation"] = "fused"
    else:
        target_shape = draw(st.one_of(
            st.just(expected_target), st.just(expected_target), st.just(expected_target),
            st.lists(st.integers(0, 4), max_size=5), st.just(shape),
        ))
        logit_dtype = draw(st.sampled_from(LOGIT_DTYPES[:2] * 4 + LOGIT_DTYPES[2:]))
        target_dtype = draw(st.sampled_from(TARGET_DTYPES[:1] * 4 + TARGET_DTYPES[1:]))
        options = dict(
            gamma=draw(GAMMAS),
            alpha=draw(ALPHAS),
            weight=draw(WEIGHTS),
            ignore_index=draw(IGNORE_INDICES),
            reduction=draw(st.sampled_from(["mean", "sum", "none", "avg", "MEAN", None])),
            normalize=draw(st.sampled_from(["pixels", "weights", "batch"])),
            implementation=draw(st.sampled_from(["auto", "auto", "fused", "reference", "cuda"])),
            poly_epsilon=draw(st.one_of(st.just(0.0), st.floats(-2, 2), st.sampled_from([1e3, NAN, INF, "1"]))),
        )
        if draw(st.integers(0, 4)) == 0:
            options["enet_c"] = draw(st.sampled_from([1.02, 1.0, 0.5, -1.0, NAN, INF, 1e300, 1 + 2**-50]))
        if draw(st.integers(0, 4)) == 0:
            options["effective_beta"] = draw(st.sampled_from([0.5, 0.0, 1.0, -0.1, 1.5, NAN, 1e-300, 0.999999]))
    return dict(
        shape=shape,
        logit_dtype=logit_dtype,
        scale=draw(st.sampled_from([1.0, 1.0, 10.0, 100.0])),
        nonfinite=draw(st.sampled_from([None] * 8 + [NAN, INF, -INF])),
        channels_last=draw(st.booleans()),
        target_shape=target_shape,
        target_dtype=target_dtype,
        wide_labels=not tame and draw(st.integers(0, 3)) == 0,
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        options=options,
        module=draw(st.booleans()),
        module_options=draw(st.one_of(st.just({}), st.fixed_dictionaries({
            # FocalLoss only: weights from a running histogram of num_classes bins
            "histogram_momentum": st.sampled_from([None, 0.0, 0.5, 0.9, 0, 1.0, -0.1, NAN, "0.9"]),
            "num_classes": st.sampled_from([None, num_classes, num_classes, num_classes + 1, 0, -1, 2.5]),
        }))),
        chunk=draw(st.sampled_from([None, None, 1, 3, 7, 64])),
    )


def _make_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["logit_dtype"]
    values = torch.randn(shape, generator=g, dtype=torch.float64) * case["scale"]
    if case["nonfinite"] is not None and values.numel():
        values.view(-1)[torch.randint(values.numel(), (), generator=g)] = case["nonfinite"]
    if dtype == torch.bool:
        logits = values > 0
    elif dtype.is_floating_point:
        logits = values.to(dtype)
    else:
        logits = values.clamp(-1e6, 1e6).nan_to_num().to(dtype)
    if case["channels_last"] and logits.dim() >= 3:  # class dimension innermost in memory
        logits = logits.movedim(1, -1).contiguous().movedim(-1, 1)
    num_classes = shape[1] if len(shape) >= 2 else 1
    tshape = case["target_shape"]
    labels = (torch.randint(-300, 300, tshape, generator=g) if case["wide_labels"]
              else torch.randint(0, max(num_classes, 1), tshape, generator=g))
    ignore = case["options"]["ignore_index"]
    if case["ignore_fraction"] and INT_RANGES[torch.int64][0] <= ignore <= INT_RANGES[torch.int64][1]:
        mask = torch.rand(tshape, generator=g) < case["ignore_fraction"]
        labels = torch.where(mask, torch.tensor(ignore), labels)
    return logits, labels.to(case["target_dtype"])


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _per_class_shape(values):
    return tuple(torch.as_tensor(values).shape)


def _classify(logits, target, options, module_options=None):
    """Independent predicate: 'raise' (must be ValueError), 'valid' (finite, implementations agree)
    or 'accept' (well-formed but outside the finite-result guarantee: must not raise)."""
    momentum = (module_options or {}).get("histogram_momentum")
    if momentum is not None:
        num_classes = module_options["num_classes"]
        if not (_is_number(momentum) and 0 <= momentum < 1) or not isinstance(options["weight"], str):
            return "raise"
        if not (isinstance(num_classes, int) and logits.dim() >= 2 and num_classes == logits.shape[1]):
            return "raise"
    gamma, poly = options["gamma"], options["poly_epsilon"]
    weight, alpha = options["weight"], options["alpha"]
    if not (_is_number(gamma) and 0 <= gamma < INF):
        return "raise"
    if not (_is_number(poly) and math.isfinite(poly)):
        return "raise"
    if options["reduction"] not in ("mean", "sum", "none") or options["normalize"] not in ("pixels", "weights"):
        return "raise"
    if options["implementation"] not in ("auto", "fused", "reference"):
        return "raise"
    if options["implementation"] == "fused" and options["reduction"] == "none":
        return "raise"
    if isinstance(weight, str) and weight not in WEIGHT_SCHEMES:
        return "raise"
    if not logits.is_floating_point() or logits.dim() < 2 or logits.shape[1] == 0:
        return "raise"
    if target.dtype not in INT_RANGES or list(target.shape) != [logits.shape[0], *logits.shape[2:]]:
        return "raise"
    num_classes = logits.shape[1]
    ignore = options["ignore_index"]
    low, high = INT_RANGES[target.dtype]
    labels = target.reshape(-1).tolist()
    if any(not (0 <= v < num_classes) and not (low <= ignore <= high and v == ignore) for v in labels):
        return "raise"
    if weight is not None and not isinstance(weight, str) and _per_class_shape(weight) != (num_classes,):
        return "raise"
    if alpha is not None and not _is_number(alpha) and _per_class_shape(alpha) != (num_classes,):
        return "raise"
    if weight == "enet" and not options.get("enet_c", 1.10) > 1:
        return "raise"
    if weight == "effective" and not 0 < options.get("effective_beta", 0.9999) < 1:
        return "raise"
    valid = bool(torch.isfinite(logits).all()) and gamma <= 1e30
    # per-class factors: 0 or of a sane size (a subnormal alpha would make the mean's denominator
    # subnormal and its reciprocal infinite); read in float64 so that no factor rounds to 0 here
    factors = []
    if _is_number(alpha):
        factors += [alpha, 1 - alpha]
    elif alpha is not None:
        factors += torch.as_tensor(alpha, dtype=torch.float64).tolist()
    if weight is not None and not isinstance(weight, str):
        factors += torch.as_tensor(weight, dtype=torch.float64).tolist()
    valid &= all(f == 0 or 1e-30 <= f <= 1e30 for f in factors)
    return "valid" if valid else "accept"


def _call(logits, target, options, module_options):
    """The functional (``module_options`` None) or a fresh FocalLoss. A module with a running
    histogram sees the batch twice: the running histogram is then the batch's own."""
    if module_options is None:
        return focal_loss(logits, target, **options)
    criterion = FocalLoss(**options, **module_options)
    if module_options.get("histogram_momentum") is not None:
        with torch.no_grad():
            criterion(logits, target)
    return criterion(logits, target)


def _leaf(logits):
    leaf = logits.detach().clone(memory_format=torch.preserve_format)
    return leaf.requires_grad_() if leaf.is_floating_point() else leaf


def _loss_and_grad(logits, target, options, module_options):
    leaf = _leaf(logits)
    loss = _call(leaf, target, options, module_options)
    grad = None
    if loss.requires_grad:
        loss.sum().backward()
        grad = leaf.grad
    return loss, grad


def _found_case(logit_dtype, scale, **options):
    """A one-pixel, two-class case a search once found, kept so that every run checks it."""
    options = dict(dict(gamma=0.0, alpha=None, weight=None, ignore_index=255, reduction="mean",
                        normalize="pixels", implementation="auto", poly_epsilon=0.0), **options)
    return dict(shape=[1, 2], logit_dtype=logit_dtype, scale=scale, nonfinite=None, channels_last=False,
                target_shape=[1], target_dtype=torch.int8, wide_labels=False, ignore_fraction=0.0, seed=0,
                options=options, module=False, module_options={}, chunk=None)


@FUZZ
@given(case=loss_cases())
# a subnormal per-class alpha: outside the finite guarantee, which the predicate once missed
@example(case=_found_case(torch.float64, 1.0, alpha=[0.0, 1.1125369292536007e-308], weight=[0.0, 0.5],
                          normalize="weights"))
@example(case=_found_case(torch.float64, 1.0, alpha=[0.0, 1.1125369292536007e-308], normalize="weights"))
# gamma 1e30 on a far-off label: (1 - p_t)^gamma was taken as 1, and the float16 gradient overflowed
@example(case=_found_case(torch.float16, 10.0, gamma=1e30))
def test_fuzz_focal_loss(case):
    logits, target = _make_inputs(case)
    options = case["options"]
    module_options = case["module_options"] if case["module"] else None
    verdict = _classify(logits, target, options, module_options)
    event(f"verdict: {verdict}")
    patch = (mock.patch.object(fused_module, "CHUNK_ELEMENTS", case["chunk"]) if case["chunk"]
             else mock.patch.object(fused_module, "CHUNK_ELEMENTS", fused_module.CHUNK_ELEMENTS))
    with patch:
        try:
            loss, grad = _loss_and_grad(logits, target, options, module_options)
        except ValueError:
            assert verdict == "raise", f"valid input rejected ({verdict})"
            return
        assert verdict != "raise", "invalid input accepted"
        assert isinstance(loss, torch.Tensor)
        expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        assert loss.dtype == expected_dtype
        assert loss.shape == (target.shape if options["reduction"] == "none" else ())
        if grad is not None:
            assert grad.shape == logits.shape and grad.dtype == logits.dtype
        if verdict != "valid":
            return
        assert torch.isfinite(loss).all(), loss
        if grad is not None:
            assert torch.isfinite(grad).all(), grad
        if _every_label_ignored(target, options):  # also when there are no pixels
            assert (loss == 0).all()
            if grad is not None:
                assert (grad == 0).all()
        if options["reduction"] == "none" or logits.dtype not in (torch.float32, torch.float64):
            return
        # (1 - p_t)^gamma amplifies a rounding of 1 - p_t by gamma: beyond this the dtype decides
        if options["gamma"] > (10 if logits.dtype == torch.float32 else 1e6):
            return
        # the other implementation gives the same value and gradient
        impl = options["implementation"]
        other = dict(options, implementation="reference" if impl in ("auto", "fused") else "fused")
        other_loss, other_grad = _loss_and_grad(logits, target, other, module_options)
    scale = max(1.0, float(loss.detach().abs()))
    tol = dict(rtol=1e-5, atol=(1e-12 if logits.dtype == torch.float64 else 1e-6) * scale)
    torch.testing.assert_close(other_loss, loss, **tol)
    if grad is not None:
        torch.testing.assert_close(other_grad, grad, **tol)


def _every_label_ignored(target, options):
    ignore = options["ignore_index"]
    low, high = INT_RANGES[target.dtype]
    return target.numel() == 0 or (low <= ignore <= high and bool((target == ignore).all()))


@pytest.mark.parametrize("implementation", ["fused", "reference"])
@pytest.mark.parametrize("shape", [(0, 3), (2, 3, 4, 0), (2, 3, 0, 4), (0, 3, 2, 2), (1, 2, 3, 0, 2), (2, 3, 0)])
def test_zero_pixel_batches_give_zero(shape, implementation):
    logits = torch.randn(shape, requires_grad=True)
    target = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64)
    for reduction in ("mean", "sum"):
        loss = focal_loss(logits, target, reduction=reduction, implementation=implementation, poly_epsilon=1.0)
        assert loss.item() == 0
        loss.backward()
        assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (2, 0, 4, 4)])
def test_zero_classes_is_a_value_error(shape):
    target = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64)
    for implementation in ("fused", "reference"):
        with pytest.raises(ValueError, match="class"):
            focal_loss(torch.randn(shape), target, implementation=implementation)


def test_zero_denominator_with_poly_term_agrees_between_implementations():
    """normalize='weights' with every counted pixel weighted 0: both give 0, not poly/tiny."""
    logits = torch.randn(4, 3, dtype=torch.float64)
    target = torch.zeros(4, dtype=torch.int64)  # only class 0, whose alpha is 0
    for implementation in ("fused", "reference"):
        x = logits.clone().requires_grad_()
        loss = focal_loss(x, target, alpha=0.0, weight=None, poly_epsilon=1.0, normalize="weights",
                          implementation=implementation)
        loss.backward()
        assert loss.item() == 0 and torch.all(x.grad == 0), implementation


@pytest.mark.parametrize("options", [dict(histogram_momentum="0.9", num_classes=3),
                                     dict(histogram_momentum=0.9, num_classes=2.5),
                                     dict(histogram_momentum=0.9, num_classes=0)])
def test_bad_running_histogram_options(options):
    with pytest.raises(ValueError, match="histogram_momentum|num_classes"):
        FocalLoss(weight="enet", **options)


@pytest.mark.parametrize("validate", [True, False])
def test_running_histogram_size_must_match_the_logits(validate):
    criterion = FocalLoss(weight="enet", histogram_momentum=0.9, num_classes=5, validate=validate)
    with pytest.raises(ValueError, match="num_classes=5"):
        criterion(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64))


# ================================================================================ class weights


@settings(deadline=None, max_examples=150)
@given(
    dtype=st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]),
    num_classes=st.integers(1, 8),
    labels=st.lists(st.integers(-20, 300), max_size=60),
    ignore_index=st.one_of(st.none(), st.integers(-5, 12), st.sampled_from([255, -100, 2**40, -2**63])),
)
def test_class_histogram_is_bincount(dtype, num_classes, labels, ignore_index):
    target = torch.tensor(labels, dtype=torch.int64).to(dtype)  # narrow dtypes wrap, as data would
    values = target.to(torch.int64).numpy()
    keep = (values >= 0) & (values < num_classes)
    low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    if ignore_index is not None and low <= ignore_index <= high:
        keep &= values != ignore_index
    expected = np.bincount(values[keep], minlength=num_classes)
    got = class_histogram(target.reshape(-1, 1) if labels else target, num_classes, ignore_index)
    assert got.dtype == torch.int64
    assert got.tolist() == expected.tolist()


HISTOGRAMS = st.lists(st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 2**40)), max_size=12)


@settings(deadline=None, max_examples=150)
@given(
    counts=HISTOGRAMS,
    as_float=st.booleans(),
    scheme=st.sampled_from(WEIGHT_SCHEMES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    enet_c=st.one_of(st.just(1.10), st.floats(1.0, 1e6, exclude_min=True)),
    effective_beta=st.one_of(st.just(0.9999), st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
)
def test_weights_from_any_histogram_are_finite_and_non_negative(counts, as_float, scheme, dtype, enet_c,
                                                                 effective_beta):
    histogram = torch.tensor(counts, dtype=torch.float64 if as_float else torch.int64)
    weights = weights_from_histogram(histogram, scheme, enet_c=enet_c, effective_beta=effective_beta, dtype=dtype)
    assert weights.shape == (len(counts),) and weights.dtype == dtype
    assert torch.isfinite(weights).all() and (weights >= 0).all(), weights
    present = histogram > 0
    if scheme == "enet":
        assert (weights > 0).all()
    else:
        assert (weights[~present] == 0).all() and (weights[present] > 0).all(), weights


@settings(deadline=None, max_examples=100)
@given(
    enet_c=st.one_of(st.floats(max_value=1.0), st.just(NAN)),
    effective_beta=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(NAN)),
    counts=HISTOGRAMS,
)
def test_bad_scheme_parameters_raise_value_error(enet_c, effective_beta, counts):
    histogram = torch.tensor(counts, dtype=torch.int64)
    with pytest.raises(ValueError, match="enet_c"):
        weights_from_histogram(histogram, "enet", enet_c=enet_c)
    with pytest.raises(ValueError, match="effective_beta"):
        weights_from_histogram(histogram, "effective", effective_beta=effective_beta)
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="enet_c"):
        class_weights(target, 3, "enet", enet_c=enet_c)
    with pytest.raises(ValueError, match="effective_beta"):
        focal_loss(torch.randn(3, 3), target, weight="effective", effective_beta=effective_beta)


# ================================================================================ config loader


def _schema_keys(model, prefix=""):
    """(dotted key, annotation) of every field of the pydantic ``model``, its sections' fields included."""
    for name, field in model.model_fields.items():
        dotted = prefix + name
        yield dotted, field.annotation
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _schema_keys(field.annotation, dotted + ".")


def _literal_choices(annotation):
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return next((choices for arg in typing.get_args(annotation) for choices in [_literal_choices(arg)] if choices), ())


def _defaults(data, prefix=""):
    for key, value in data.items():
        yield prefix + key, value
        if isinstance(value, dict):
            yield from _defaults(value, prefix + key + ".")


SCHEMA_KEYS = dict(_schema_keys(Config))
SCHEMA_KEYS.update(_schema_keys(SyntheticConfig, "data.synthetic."))
VALID_KEYS = sorted(SCHEMA_KEYS)
CHOICES = {key: choices for key, annotation in SCHEMA_KEYS.items() for choices in [_literal_choices(annotation)]
           if choices}
DEFAULTS = dict(_defaults(Config().model_dump()))
DEFAULTS.update(_defaults(SyntheticConfig().model_dump(), "data.synthetic."))
LEAF_KEYS = sorted(key for key in VALID_KEYS if not isinstance(DEFAULTS[key], dict) or key.endswith("kwargs"))
KEY_TEXT = st.text(alphabet="abcdefglmnorstu._ 0", min_size=0, max_size=10)
KEYS = st.one_of(st.sampled_from(VALID_KEYS), st.sampled_from(VALID_KEYS), KEY_TEXT, st.sampled_from(["_base_", "3"]))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([10**400, -10**30, 2**63]),
    st.floats(), st.text(max_size=6),
    st.sampled_from(sorted({v for choices in CHOICES.values() for v in choices} | {"enet", "median", "bogus"})),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(KEY_TEXT, st.integers(0, 3)), inner, max_size=3)),
    max_leaves=6)


def _typed_value(key):
    """A value of the key's type (from its default), mostly accepted by the schema."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-5, 500)
    if isinstance(default, float):
        return st.one_of(st.floats(-10, 10), st.integers(0, 9), st.just(NAN))
    if isinstance(default, str):
        return st.sampled_from(CHOICES[key]) if key in CHOICES else st.text(max_size=5)
    if isinstance(default, list) and default and isinstance(default[0], float):
        return st.lists(st.floats(0, 1), max_size=3)
    if isinstance(default, dict):
        return st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.text(max_size=3)), max_size=2)
    if key.endswith("synthetic"):
        return st.one_of(st.none(), st.fixed_dictionaries({}, optional={"seed": st.integers(0, 9)}))
    return st.just(default)


@st.composite
def documents(draw, tame=False):
    """A nested mapping built from (dotted key, value) pairs: any keys and values, or (tame)
    schema keys with values of their type."""
    doc = {}
    for key in draw(st.lists(st.sampled_from(LEAF_KEYS) if tame else KEYS, max_size=6)):
        if tame:
            value = draw(_typed_value(key))
        else:
            value = DEFAULTS[key] if key in DEFAULTS and draw(st.booleans()) else draw(VALUES)
        if "." in key and not tame and draw(st.integers(0, 4)) == 0:
            doc[key] = value  # a dotted key literally in the file
            continue
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return doc


BASES = st.sampled_from([
    "base.yaml", ["base.yaml"], ["base.yaml", "base.yaml"], "missing.yaml", ["missing.yaml"], "", [""], 3, None,
    ["base.yaml", 3], [["base.yaml"]], {"base.yaml": 1}, "c.yaml", "sub", "a\0b.yaml", "x" * 300, [], 2.5, True,
])


def _yaml_text(value):
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


OVERRIDES = st.one_of(
    st.builds(lambda k, v: f"{k}={_yaml_text(v)}", KEYS, VALUES),
    st.builds(lambda k, v: f"{k}={v}", KEYS, st.sampled_from(["[unclosed", "2001-13-45", "2024-02-30", "a: b: c",
                                                              "!!python/object:os.system", "1\n---\n2", ""])),
    st.text(max_size=12),
)


@st.composite
def tame_overrides(draw):
    key = draw(st.sampled_from(LEAF_KEYS))
    return f"{key}={_yaml_text(draw(_typed_value(key)))}"


@st.composite
def config_files(draw, tame=False):
    """The main file's bytes: a YAML mapping (maybe with _base_), other YAML, text or bytes; or
    (tame) a mapping of schema keys, maybe based on base.yaml."""
    if tame:
        doc = draw(documents(tame=True))
        if draw(st.booleans()):
            doc = {"_base_": draw(st.sampled_from(["base.yaml", ["base.yaml"], []])), **doc}
        return yaml.safe_dump(doc, sort_keys=False).encode()
    kind = draw(st.sampled_from(["doc"] * 6 + ["yaml", "text", "bytes", "doc+junk"]))
    if kind in ("doc", "doc+junk"):
        doc = draw(documents())
        if draw(st.booleans()):
            doc = {"_base_": draw(BASES), **doc}
        text = yaml.safe_dump(doc, sort_keys=False)
        if kind == "doc+junk":
            text += draw(st.text(max_size=10))
        return text.encode()
    if kind == "yaml":
        return yaml.safe_dump(draw(VALUES)).encode()
    if kind == "text":
        return draw(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)).encode()
    return draw(st.binary(max_size=40))


@st.composite
def config_trees(draw):
    """(main file bytes, base.yaml mapping, overrides): half wild, half tame."""
    tame = draw(st.booleans())
    return (draw(config_files(tame)), draw(documents(tame)),
            draw(st.lists(tame_overrides() if tame else OVERRIDES, max_size=3)))


def _write_tree(root: Path, main: bytes, base_doc) -> Path:
    (root / "sub").mkdir()
    (root / "base.yaml").write_text(yaml.safe_dump(base_doc), encoding="utf-8")
    path = root / "c.yaml"
    path.write_bytes(main)
    return path


def _names_the_problem(message, root, overrides):
    if str(root) in message:  # the file (or a _base_ file next to it)
        return True
    for override in overrides:
        key = override.partition("=")[0].strip()
        if repr(override) in message or (key and key in message):
            return True
    return False


@FUZZ
@given(tree=config_trees())
def test_fuzz_load_config(tree):
    main, base_doc, overrides = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        path = _write_tree(root, main, base_doc)
        try:
            config = load_config(path, overrides)
        except ConfigError as error:
            event("ConfigError")
            assert _names_the_problem(str(error), root, overrides), str(error)
            return
        event("Config")
        assert isinstance(config, Config)
        # whatever loads, round-trips through save_config
        saved = root / "resolved.yaml"
        save_config(config, saved)
        assert yaml.safe_dump(to_dict(load_config(saved))) == yaml.safe_dump(to_dict(config))


@pytest.mark.parametrize("base", [3, None, [3], ["base.yaml", 2.5], [["base.yaml"]], "", [""], "a\0b", "x" * 300])
def test_bad_base_values_are_config_errors_naming_the_file(tmp_path, base):
    (tmp_path / "base.yaml").write_text("seed: 1\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"_base_": base}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(tmp_path.resolve()) in str(info.value)


@pytest.mark.parametrize("text", [b"\xff\xfe\x00seed: 1", b"work_dir: 2001-13-45\n", b"seed: " + b"1" * 5000,
                                  b"loss: {gamma: " + b"9" * 400 + b"}"])
def test_unreadable_or_unconvertible_files_are_config_errors(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)


@pytest.mark.parametrize("override", ["work_dir=2024-02-30", "loss.gamma=" + "9" * 400, "loss..gamma=1", ".seed=1",
                                      "seed.=1", "model.encoder_weights=3", "data.synthetic.image_size=null",
                                      "data.synthetic=3", "loss.alpha=abc"])
def test_bad_overrides_are_config_errors(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert override.partition("=")[0] in str(info.value) or "c.yaml" in str(info.value)
