"""``[B, C, S]`` views of logits, labels and gradient buffers, shared by the kernel back ends
(:mod:`.triton_kernels`, :mod:`.cpu_kernels`): the kernels address any dense layout through the
strides of these views."""
from __future__ import annotations

import math

import torch


def empty_gradient(logits: torch.Tensor):
    """A gradient buffer in the logits' memory format (contiguous where that would not flatten to
    ``[B, C, S]`` without a copy), its ``[B, C, S]`` view and that view's strides."""
    grad = torch.empty_like(logits)
    if grad.ndim > 2:
        try:
            grad.view(grad.shape[0], grad.shape[1], -1)  # raises where the spatial dims do not merge
        except RuntimeError:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    flat, strides = flat_logits(grad)
    return grad, flat, strides


def forward_outputs(logits: torch.Tensor, write_grad: bool):
    """The outputs a forward kernel returns for ``logits``, allocated and unfilled: the float64 focal sum per
    class, the float64 Poly-1 sum and the gradient (an empty tensor without ``write_grad``); the custom
    operators' fake implementations, which only say their shapes."""
    sums = logits.new_empty(logits.shape[1], dtype=torch.float64), logits.new_empty((), dtype=torch.float64)
    return (*sums, empty_gradient(logits)[0] if write_grad else logits.new_empty(0))


def flat_logits(tensor: torch.Tensor):
    """``tensor`` as ``[B, C, S]`` (``[N, C]`` as ``B = 1``; a view when its spatial dims merge,
    else a copy) and the strides of B, C and S."""
    flat = tensor.t().unsqueeze(0) if tensor.ndim == 2 else tensor.flatten(2)
    return flat, flat.stride()


def flat_labels(target: torch.Tensor):
    """The labels as ``[B, S]``, their strides, the pixel count and ``S``."""
    batch = 1 if target.ndim == 1 else target.shape[0]
    labels = target.reshape(batch, math.prod(target.shape) // batch if batch else 0)  # no -1: sizes may be 0
    batch, spatial = labels.shape
    return labels, labels.stride(), batch * spatial, spatial
