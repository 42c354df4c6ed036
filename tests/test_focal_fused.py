"""The fused implementation against the composite reference (the oracle), values and gradients."""
import pytest
import torch

import segfocal.losses.fused as fused_module
from segfocal.losses import FocalLoss, focal_loss

from focal_cases import OPTIONS, batch, far_off_labels, options_id, value_and_grad


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
@pytest.mark.parametrize("shape", [(37, 5), (2, 5, 9, 11), (2, 5, 3, 4, 6)])
def test_fused_equals_reference_in_float64(options, shape, monkeypatch):
    monkeypatch.setattr(fused_module, "CHUNK_ELEMENTS", 64)  # many chunks, ragged last ones
    logits, target = batch(shape, seed=len(shape))
    fused_loss, fused_grad = value_and_grad(logits, target, "fused", **options)
    ref_loss, ref_grad = value_and_grad(logits, target, "reference", **options)
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_fused_reads_strided_logits_in_place(layout):
    logits, target = batch((2, 6, 12, 10), dtype=torch.float32)
    if layout == "channels_last":
        strided = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros(2, 6, 12, 20)
        wide[..., ::2] = logits
        strided = wide[..., ::2]
    else:
        strided = logits.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    ref_loss, ref_grad = value_and_grad(logits, target, "reference")
    loss, grad = value_and_grad(strided, target, "fused")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    if layout == "channels_last":  # the gradient keeps the logits' memory format
        x = strided.detach().requires_grad_(True)
        focal_loss(x, target, implementation="fused").backward()
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_agrees_with_reference_at_float32_precision(dtype):
    logits, target = batch((2, 19, 64, 64), dtype=dtype, scale=4.0)
    loss, grad = value_and_grad(logits, target, "fused")
    ref_loss, ref_grad = value_and_grad(logits, target, "reference")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-9)


def test_fused_all_ignored_gives_zero_and_zero_gradient():
    logits, target = batch((2, 4, 5, 5), ignore_fraction=1.0)
    loss, grad = value_and_grad(logits, target, "fused", weight="median", normalize="weights", poly_epsilon=1.0)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_fused_saturated_pixels_keep_finite_gradients_for_small_gamma():
    logits = torch.full((1, 3, 4, 4), -50.0)
    logits[:, 1] = 50.0
    target = torch.ones(1, 4, 4, dtype=torch.long)
    for gamma in (0.25, 0.5):
        _, grad = value_and_grad(logits, target, "fused", gamma=gamma)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_a_large_gamma_on_far_off_labels_follows_the_closed_form(implementation, dtype, monkeypatch):
    # 1 - p_t rounds to 1 there, but gamma p_t does not vanish: (1 - p_t)^gamma must come from p_t
    monkeypatch.setattr(fused_module, "_kernels", lambda logits: None)  # the chunked pass, any dtype
    logits, target, gamma, expected_loss, expected_grad = far_off_labels(dtype)
    loss, grad = value_and_grad(logits, target, implementation, gamma=gamma, weight=None)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=rtol * float(expected_grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C++ kernel, the chunked pass
def test_a_second_order_gradient_raises_in_fused_and_is_exact_in_reference(dtype):
    logits, target = batch((2, 4, 5, 5), dtype=dtype)

    def penalised_gradient(implementation):
        x = logits.detach().clone().requires_grad_(True)
        loss = focal_loss(x, target, implementation=implementation)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(loss + (grad ** 2).sum(), x)[0]

    with pytest.raises(RuntimeError, match="no second derivative"):
        penalised_gradient("fused")
    # the reference's second derivative, against a central difference of the penalty's gradient
    x = logits.double()
    _, plain = value_and_grad(x, target, "reference")
    step, direction = 1e-6, torch.randn_like(x)
    penalty = [value_and_grad(x + sign * step * direction, target, "reference")[1].pow(2).sum()
               for sign in (1, -1)]
    expected = (penalty[0] - penalty[1]) / (2 * step)
    measured = ((penalised_gradient("reference").double() - plain) * direction).sum()
    torch.testing.assert_close(measured, expected, rtol=1e-3 if dtype == torch.float32 else 1e-6, atol=1e-9)


def test_fused_rejects_reduction_none_and_auto_falls_back():
    logits, target = batch((2, 3, 4, 4))
    with pytest.raises(ValueError, match="implementation='fused' reduces"):
        focal_loss(logits, target, reduction="none", implementation="fused")
    per_pixel = focal_loss(logits, target, reduction="none")
    assert per_pixel.shape == target.shape
    with pytest.raises(ValueError, match="implementation must be one of"):
        focal_loss(logits, target, implementation="triton")


def test_module_reports_the_weights_the_fused_pass_used():
    logits, target = batch((2, 5, 8, 8))
    module = FocalLoss(weight="median")
    module(logits, target)
    reference = FocalLoss(weight="median", implementation="reference")
    reference(logits, target)
    torch.testing.assert_close(module.last_class_weights, reference.last_class_weights)


def test_the_chunked_pass_compiles_as_one_graph_and_matches_eager(monkeypatch):
    """``torch.compile(fullgraph=True)`` fails on any graph break (e.g. a data-dependent shape). Float64
    logits take the chunked pass, as CUDA logits do under ``torch.compile``."""
    monkeypatch.setattr(fused_module, "CHUNK_ELEMENTS", 90)  # 3 + 1 rows of 5 x 6 per image: strided chunks
    logits, target = batch((2, 5, 4, 6), dtype=torch.float64)
    options = dict(weight="enet", alpha=0.25, poly_epsilon=1.0, validate=False)
    compiled = torch.compile(lambda x, t: focal_loss(x, t, implementation="fused", **options), fullgraph=True)
    x = logits.clone().requires_grad_(True)
    loss = compiled(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    eager_loss, eager_grad = value_and_grad(logits, target, "fused", **options)
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-8)
