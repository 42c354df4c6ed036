"""Shared cases for testing a focal-loss implementation against the composite reference."""
import torch

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
