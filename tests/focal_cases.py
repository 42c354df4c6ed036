"""Shared cases for testing a focal-loss implementation against the composite reference, and the
guard that makes a test of a kernel back end fail when the fused loss turned that back end off."""
import contextlib
import math

import pytest
import torch

import segfocal.losses.fused as fused_module
from segfocal.losses import focal_loss

#: Option sets covering every weight scheme, alpha form, normalisation, reduction and Poly-1 sign;
#: ``upstream`` is the gradient the loss is multiplied by before differentiating.
OPTIONS = [
    dict(gamma=2.0),
    dict(gamma=0.0, weight=None),
    dict(gamma=0.5, weight="median", normalize="weights"),
    dict(gamma=2.0, weight="inverse", alpha=0.25, poly_epsilon=1.0),
    dict(gamma=1.0, weight="effective", alpha=[0.5, 1.0, 1.5, 2.0, 0.7], reduction="sum"),
    dict(gamma=3.0, weight=[0.2, 1.0, 3.0, 0.5, 1.0], normalize="weights", poly_epsilon=-0.3),
    dict(gamma=2.0, weight=None, alpha=0.75, normalize="weights", upstream=3.5),
]


def options_id(options: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items())


def batch(shape, seed=0, dtype=torch.float64, ignore_fraction=0.2, scale=3.0, ignore_index=255, device="cpu"):
    """Logits ~ N(0, scale^2) of ``shape`` ([N, C] or [B, C, ...]) and uniform labels, a fraction ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    target_shape = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, shape[1], target_shape, generator=generator)
    target[torch.rand(target_shape, generator=generator) < ignore_fraction] = ignore_index
    return logits.to(device), target.to(device)


def value_and_grad(logits, target, implementation, upstream=1.0, **options):
    """The loss and the gradient of ``upstream * loss`` with respect to the logits."""
    x = logits.detach().clone().requires_grad_(True)
    loss = focal_loss(x, target, implementation=implementation, **options)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss.detach(), grad


def far_off_labels(dtype, num_pixels=64, num_classes=4, seed=0, device="cpu"):
    """Pixels whose label is so unlikely that ``1 - p_t`` rounds to 1 in ``dtype``, with a ``gamma``
    so large that ``(1 - p_t)^gamma`` still goes from ~1 down to ~0 over them: logits, labels, gamma,
    and the mean loss and its gradient from the closed form in float64,
    ``L = -(1-p)^g log p``, ``dL/dz = H (onehot - softmax)``, ``H = g (1-p)^(g-1) p log p - (1-p)^g``."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_pixels, num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (num_pixels,), generator=generator)
    onehot = torch.nn.functional.one_hot(target, num_classes).double()
    epsilon_log = -math.log(torch.finfo(dtype).eps)  # 16 for float32, 36 for float64
    offset = epsilon_log + 4 + 6 * torch.rand(num_pixels, generator=generator, dtype=torch.float64)
    logits = logits - offset.unsqueeze(1) * onehot
    gamma = 4.0 * math.exp(epsilon_log + 8)
    logits = logits.to(dtype).double()  # the values the implementation sees
    softmax = logits.softmax(1)
    p = (softmax * onehot).sum(1)
    modulated = torch.exp(gamma * torch.log1p(-p))
    loss = (-modulated * p.log()).mean()
    slope = gamma * modulated / (1 - p) * p * p.log() - modulated
    grad = slope.unsqueeze(1) * (onehot - softmax) / num_pixels
    return logits.to(dtype).to(device), target.to(device), gamma, loss, grad


@contextlib.contextmanager
def fast_path_kept():
    """Fail the test if a kernel back end was turned off inside the block.

    A kernel that raises is turned off for the process and the chunked pass answers, which equals the
    reference: without this, a broken kernel would pass every test that compares values. The block
    starts with no back end turned off, so an earlier test's failure does not hide this one's kernels.
    """
    failures = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_module, "_KERNEL_FAILURES", failures)
        yield failures
    if failures:
        pytest.fail(f"the fused loss turned a kernel back end off during the test, so its chunked pass answered "
                    f"instead: {failures}")
