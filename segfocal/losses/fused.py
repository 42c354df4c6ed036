"""Fused focal loss: one custom autograd function; no one-hot, no ``[N, C]`` copy, no host sync.

Where a kernel back end takes the logits (:func:`_kernels`), the forward first counts the labels
(a label-only pass), so the class weights and the mean's denominator are known before the one
pass over the logits, which accumulates the per-class focal sums and the Poly-1 sum and writes the
gradient for an upstream gradient of 1; the backward only scales it. Nothing per pixel is saved.
(So a bfloat16 gradient is rounded twice when the upstream is not a power of two: an error of at
most about one bfloat16 ulp instead of half of one, measured.)
The back ends: :mod:`.cpu_kernels` (a C++ kernel, float32/bfloat16 CPU logits) and
:mod:`.triton_kernels` (CUDA, float16/bfloat16/float32). Each is a module with ``histogram(target,
C, ignore_index)``, ``forward(logits, target, coefficients, poly_coefficient, options, write_grad)``,
``gradient(logits, target, coefficients, poly_coefficient, grad_loss, options)`` and ``scale_(grad,
grad_loss)``; ``options`` is the loss's one :class:`~.options.FocalOptions` value.

A back end that raises (a kernel that does not compile or launch on this machine) is turned off
for the process with one warning, and the chunked pass takes over, in the forward or the backward.

Otherwise (float64, which stays exact for the tests; float16 on the CPU; no
compiler or Triton; a failed back end) the chunked PyTorch pass runs: the logits are read in place (any strides), chunk
by chunk, accumulating the label histogram and the focal sums in the same pass; the weights are
applied afterwards to the per-class sums. It saves the logits and labels (references), ``C + 2``
scalars and four floats per pixel (log-normaliser, ``1 - p_t`` and two slopes), and its backward
recomputes the softmax as ``exp(z - log-normaliser)`` straight into the gradient.

For a pixel with label ``y``, ``k = w[y] a[y] / D`` (``D`` the mean's denominator) and
``e = poly_epsilon / D``, the gradient is ``H * (onehot(y) - softmax)`` with the scalar

    H = k * (gamma (1-p)^gamma p log(p)/(1-p) - (1-p)^gamma)  -  e (gamma+1) (1-p)^gamma p

which stays finite for saturated pixels (``log(p)/(1-p) -> -1``). As in the reference, ``1 - p``
is the sum of the other classes' probabilities, accurate when ``p`` rounds to 1, and
``(1-p)^gamma = exp(gamma log1p(-p))`` below ``p = 1/2``, accurate when ``1 - p`` rounds to 1.

The gradient is computed, not traced, so it cannot be differentiated again: a second-order
gradient (``create_graph=True``, e.g. a gradient penalty) raises; ``implementation="reference"``
gives one.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Dict, Iterator, Optional, Set, Tuple

import torch

from .labels import mean_denominator, not_ignored, per_class_factor, sum_over_ranks
from .options import FocalOptions

CHUNK_ELEMENTS = 1 << 20  # logits elements per chunk (4 MiB of float32): cache-sized, few Python-level ops
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_KERNEL_FAILURES: Dict[str, str] = {}  # back-end module name -> why it was turned off in this process
_WARNED: Set[str] = set()
_NO_GRADS = (None, None)  # backward: no gradient for the target and the options


def fused_focal_loss(logits: torch.Tensor, target: torch.Tensor,
                     options: FocalOptions) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The reduced loss (``"mean"`` or ``"sum"``) and the class weights used (``None`` if unweighted).

    Inputs are validated by :func:`segfocal.losses.focal_loss`; ``options`` has its fixed weights and
    ``alpha`` as ``[C]`` tensors (:meth:`FocalOptions.resolved`).
    """
    loss, weight = _FusedFocal.apply(logits, target, options)
    return loss, (weight if options.weight is not None else None)


class _FusedFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, options):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        kernels, counts = _kernels(logits), None
        if kernels is not None:  # histogram first, so the one pass over the logits can write the gradient
            try:
                counts = kernels.histogram(target, logits.shape[1], options.ignore_index)
            except Exception as error:  # a kernel that cannot compile or launch here must not stop training
                kernels = _kernels_failed(kernels, error)
        if kernels is not None:
            weight, pixel_factor, scale, coefficients, poly_coefficient = _coefficients(counts, options, dtype)
            # not for float16: see triton_kernels
            write_grad = ctx.needs_input_grad[0] and logits.dtype != torch.float16
            try:
                focal_sums, poly_sum, grad = kernels.forward(logits, target, coefficients, poly_coefficient, options,
                                                             write_grad)
                saved = None
            except Exception as error:
                kernels = _kernels_failed(kernels, error)
        if kernels is None:
            chunk_counts, focal_sums, poly_sum, saved = _chunked_sums(logits, target, options)
            if counts is None:  # (else the histogram was summed over ranks already: no second all-reduce)
                weight, pixel_factor, scale, coefficients, poly_coefficient = _coefficients(chunk_counts, options,
                                                                                            dtype)
            grad = None
        weighted = focal_sums if pixel_factor is None else pixel_factor * focal_sums
        total = weighted.sum() + options.poly_epsilon * poly_sum
        ctx.save_for_backward(logits, target, saved, coefficients, poly_coefficient)
        ctx.kernels, ctx.options = kernels, options
        ctx.grad = grad  # the gradient for an upstream 1, written by the forward pass (kernels), or None
        used = weight if weight is not None else torch.ones_like(focal_sums)
        ctx.mark_non_differentiable(used)
        return (total * scale).to(dtype), used.to(dtype)

    @staticmethod
    def backward(ctx, grad_loss, _grad_weight):
        if torch.is_grad_enabled():  # create_graph=True: the gradient is computed, not traced
            raise RuntimeError("the fused focal loss has no second derivative (create_graph=True); "
                               "use implementation='reference'")
        logits, target, saved, coefficients, poly_coefficient = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # consumed once: a second backward (retain_graph) recomputes
        kernels = None if ctx.kernels is None else _usable(ctx.kernels)
        try:
            if kernels is not None and grad is not None:
                if torch.compiler.is_compiling():  # a traced graph cannot branch on grad_loss's value: the product
                    return (grad * grad_loss,) + _NO_GRADS
                return (kernels.scale_(grad, grad_loss),) + _NO_GRADS
            if kernels is not None:
                return (kernels.gradient(logits, target, coefficients, poly_coefficient, grad_loss, ctx.options),
                        ) + _NO_GRADS
        except Exception as error:  # as in the forward: the chunked pass takes over
            _kernels_failed(kernels, error)
        if grad is not None:
            return (grad.mul_(grad_loss),) + _NO_GRADS
        if saved is None:  # the forward ran a kernel: the chunked pass's per-pixel terms are recomputed
            saved = _chunked_sums(logits, target, ctx.options, with_poly=False)[3]
        return (_chunked_gradient(logits, target, saved, coefficients, poly_coefficient, grad_loss,
                                  ctx.options.ignore_index),) + _NO_GRADS


def _coefficients(counts: torch.Tensor, options: FocalOptions, dtype: torch.dtype):
    """From the batch's class histogram: the class weights used (or ``None``), the per-class factor
    ``w a`` (or ``None``), the reduction's scale ``1 / D`` (1 for ``"sum"``), each class's gradient
    coefficient ``w a / D`` with a zero appended for ignored pixels (their bin is C), and the
    Poly-1 coefficient ``poly_epsilon / D``."""
    world_size = 1
    if options.sync_histogram:
        counts, world_size = sum_over_ranks(counts)
    if options.scheme is not None:
        weight = options.scheme.weights(counts, torch.float64)
    else:
        weight = None if options.weight is None else options.weight.to(torch.float64)
    pixel_factor = per_class_factor(weight, None if options.alpha is None else options.alpha.double())
    if options.reduction == "sum":
        scale = torch.ones((), dtype=torch.float64, device=counts.device)
    else:  # 1 / denominator, and 0 when no pixel counts (the numerator is then 0 too)
        denominator = mean_denominator(counts, pixel_factor, options.normalize, world_size)
        scale = torch.where(denominator > 0, 1.0 / denominator, 0.0)
    per_class = torch.ones_like(counts) if pixel_factor is None else pixel_factor
    coefficients = torch.cat([per_class * scale, per_class.new_zeros(1)]).to(dtype)
    return weight, pixel_factor, scale, coefficients, (options.poly_epsilon * scale).to(dtype)


def _kernels(logits: torch.Tensor):
    """The kernel module for these logits, or ``None`` for the chunked PyTorch implementation:

    * :mod:`.triton_kernels` for float16/bfloat16/float32 CUDA logits of at most ``MAX_CLASSES``
      classes when Triton is installed, unless ``SEGFOCAL_TRITON=0``;
    * :mod:`.cpu_kernels` for float32/bfloat16 CPU logits when its C++ kernel could be built;
    * ``None`` for float64 (kept exact: the implementations are tested against it), once a back end
      has failed (:func:`_kernels_failed`), and otherwise.

    Both back ends are custom operators, so ``torch.compile`` keeps them in its graph too.
    """
    if logits.is_cuda:
        if logits.dtype == torch.float64 or os.environ.get("SEGFOCAL_TRITON", "1") == "0":
            return None
        if not _HAS_TRITON:
            _warn_once("triton", "Triton is not installed (pip install triton)")
            return None
        from . import triton_kernels

        return _usable(triton_kernels) if logits.shape[1] <= triton_kernels.MAX_CLASSES else None
    from . import cpu_kernels

    return _usable(cpu_kernels) if cpu_kernels.supports(logits) else None


def _usable(kernels):
    """``kernels``, or ``None`` once it has failed in this process."""
    return None if kernels.__name__ in _KERNEL_FAILURES else kernels


def _kernels_failed(kernels, error: Exception) -> None:
    """Turn the back end ``kernels`` off for this process after it raised ``error`` (a kernel that
    does not compile or launch on this machine: old driver, unsupported GPU, a Triton that rejects
    it), with one warning that names the reason. Returns ``None``: the chunked pass takes over."""
    _KERNEL_FAILURES[kernels.__name__] = f"{type(error).__name__}: {error}"
    _warn_once(kernels.__name__, f"{kernels.__name__.rsplit('.', 1)[-1]} failed ({type(error).__name__}: "
               f"{str(error).strip()[:500]})")
    return None


def _warn_once(key: str, reason: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"segfocal: the fused focal loss's fast path is off: {reason}; it runs its chunked PyTorch "
                      f"pass instead (slower, same result). SEGFOCAL_TRITON=0 / SEGFOCAL_CPU_KERNEL=0 choose that "
                      f"pass without trying.", RuntimeWarning, stacklevel=3)


def _chunked_sums(logits, target, options: FocalOptions, with_poly: bool = True):
    """The forward pass in chunks: float64 per-class counts and focal sums ``[C]``, the Poly-1 sum (0 unless
    ``with_poly`` and a Poly-1 term), and the per-pixel buffers the backward reads (log-normaliser, ``1 - p_t``,
    focal and Poly-1 slopes)."""
    num_classes, gamma, ignore_index = logits.shape[1], options.gamma, options.ignore_index
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    counts = torch.zeros(num_classes + 1, dtype=torch.float64, device=logits.device)
    focal_sums = torch.zeros_like(counts)
    poly_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    saved = torch.empty((4,) + tuple(target.shape), dtype=dtype, device=logits.device)
    for index in _chunk_indices(logits.shape):
        labels = target[_target_index(index)]
        log_normaliser, one_minus_pt, focal_slope, poly_slope = saved[(slice(None),) + _target_index(index)]
        valid, bins, focal, poly = _pixel_terms(logits[index], labels, num_classes, ignore_index, dtype, gamma,
                                                log_normaliser, one_minus_pt, focal_slope, poly_slope)
        counts += _per_class_sum(bins, None, num_classes + 1)
        focal_sums += _per_class_sum(bins, focal, num_classes + 1)
        if with_poly and options.poly_epsilon != 0:
            poly_sum += torch.where(valid, poly, 0.0).sum(dtype=torch.float64)
    return counts[:num_classes], focal_sums[:num_classes], poly_sum, saved


def _chunked_gradient(logits, target, saved, coefficients, poly_coefficient, grad_loss, ignore_index):
    """The backward pass in chunks: the softmax recomputed from the saved log-normaliser straight into
    the gradient (the logits' dtype and memory format)."""
    num_classes = logits.shape[1]
    grad = torch.empty_like(logits)
    for index in _chunk_indices(logits.shape):
        pixels = _target_index(index)
        labels = target[pixels]
        log_normaliser, one_minus_pt, focal_slope, poly_slope = saved[(slice(None),) + pixels]
        valid = not_ignored(labels, ignore_index)
        safe = torch.where(valid, labels, 0).long().unsqueeze(1)
        # H = dL/dp_t * p_t for this pixel; ignored pixels take the zero coefficient and Poly-1 slope
        scalar = (coefficients[torch.where(valid, labels, num_classes).long()] * focal_slope
                  + poly_coefficient * poly_slope) * grad_loss.to(focal_slope.dtype)
        z, out = logits[index], grad[index]
        # straight into the gradient, except where a cast follows or under torch.compile (which
        # rejects a non-contiguous out= and fuses the copy anyway)
        direct = out.dtype == focal_slope.dtype and not torch.compiler.is_compiling()
        softmax = torch.sub(z, log_normaliser.unsqueeze(1), out=out) if direct \
            else z.to(focal_slope.dtype) - log_normaliser.unsqueeze(1)
        softmax.exp_().mul_(-scalar.unsqueeze(1))  # -H * softmax_j ...
        softmax.scatter_(1, safe, (scalar * one_minus_pt).unsqueeze(1))  # ... and H (1 - p_t) at the label
        if softmax is not out:
            out.copy_(softmax)
    return grad


def _pixel_terms(z, labels, num_classes, ignore_index, dtype, gamma, log_normaliser, one_minus_pt, focal_slope,
                 poly_slope):
    """One chunk's forward: fills the per-pixel buffers the backward reads; returns
    (valid, histogram bin, focal term, Poly-1 term).

    ``1 - p_t`` is the mass of the other classes (the label's ``exp`` zeroed before the sum) and
    ``p_t`` the label's, both over the normaliser, so neither cancels. The logarithm of the larger of
    the two is ``log1p`` of minus the smaller: ``-log p_t`` stays accurate when ``p_t`` rounds to 1,
    and ``(1 - p_t)^gamma = exp(gamma log(1 - p_t))`` when ``1 - p_t`` does (it matters at large
    ``gamma``, which multiplies the lost ``p_t``).
    """
    valid = not_ignored(labels, ignore_index)
    safe = torch.where(valid, labels, 0).long()
    bins = torch.where(valid, safe, num_classes)
    index = safe.unsqueeze(1)
    z = z.to(dtype)
    peak = z.amax(dim=1, keepdim=True)
    label_shifted = z.gather(1, index) - peak
    exps = (z - peak).exp_()
    exps.scatter_(1, index, 0.0)
    other_mass = exps.sum(1)
    label_mass = label_shifted.squeeze(1).exp()
    normaliser = other_mass + label_mass
    torch.add(peak.squeeze(1), normaliser.log(), out=log_normaliser)
    torch.div(other_mass, normaliser, out=one_minus_pt)
    p_t = label_mass / normaliser
    near_one = one_minus_pt < 0.5  # p_t is the larger; NaN goes to the other side
    log_larger = torch.log1p(-torch.where(near_one, one_minus_pt, p_t).clamp_max(0.5))
    log_pt = (label_shifted.squeeze(1) - normaliser.log()).clamp_max(0.0)
    neg_log_pt = torch.where(near_one, -log_larger, -log_pt)
    one_minus_pt.clamp_(min=torch.finfo(dtype).tiny)
    modulated = (torch.where(near_one, one_minus_pt.log(), log_larger).mul_(gamma).exp_() if gamma != 0
                 else torch.ones_like(one_minus_pt))
    # focal: d/dp_t [-(1-p)^g log p] * p = g (1-p)^g p log(p)/(1-p) - (1-p)^g, finite as p -> 1
    log_ratio = torch.where(one_minus_pt > torch.finfo(dtype).tiny, -neg_log_pt / one_minus_pt, -1.0)
    torch.mul(gamma * modulated * p_t, log_ratio, out=focal_slope).sub_(modulated)
    # Poly-1: d/dp_t [(1-p)^(g+1)] * p = -(g+1) (1-p)^g p
    torch.mul(modulated, p_t, out=poly_slope).mul_(-(gamma + 1)).masked_fill_(~valid, 0.0)
    focal = torch.where(valid, modulated * neg_log_pt, 0.0)
    return valid, bins, focal, modulated * one_minus_pt


def _per_class_sum(bins: torch.Tensor, values: Optional[torch.Tensor], size: int) -> torch.Tensor:
    """float64 sum of ``values`` (or counts) per bin, without host synchronisation.

    ``bincount`` is the fastest on the CPU, but its output size depends on the data, which
    ``torch.compile`` cannot trace without a graph break; ``scatter_add_`` has a fixed size.
    """
    bins = bins.reshape(-1)
    if bins.device.type == "cpu" and not torch.compiler.is_compiling():
        weights = None if values is None else values.reshape(-1).to(torch.float64)
        return torch.bincount(bins, weights=weights, minlength=size).to(torch.float64)
    out = torch.zeros(size, dtype=torch.float64, device=bins.device)
    source = torch.ones_like(bins, dtype=torch.float64) if values is None else values.reshape(-1).to(torch.float64)
    return out.scatter_add_(0, bins, source)


def _chunk_indices(shape: torch.Size) -> Iterator[tuple]:
    """Index tuples that cut a ``[N, C]`` or ``[B, C, S0, ...]`` tensor into cache-sized chunks."""
    if any(size == 0 for size in shape):  # no elements, no chunks
        return
    num_classes = shape[1]
    if len(shape) == 2:
        rows = max(1, CHUNK_ELEMENTS // num_classes)
        for start in range(0, shape[0], rows):
            yield (slice(start, start + rows),)
        return
    plane = num_classes
    for size in shape[3:]:
        plane *= size
    rows = max(1, CHUNK_ELEMENTS // plane)
    for batch in range(shape[0]):
        for start in range(0, shape[2], rows):
            yield (slice(batch, batch + 1), slice(None), slice(start, start + rows))


def _target_index(index: tuple) -> tuple:
    """The chunk of the labels (no class dimension) matching a chunk index of the logits."""
    return index if len(index) == 1 else (index[0],) + index[2:]
