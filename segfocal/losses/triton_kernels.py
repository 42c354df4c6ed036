"""The fused focal loss on CUDA: Triton kernels over ``[B, C, S]`` logits of any dense layout.

The class weights depend on the whole batch's label histogram, so the forward runs two passes:

* :func:`histogram` reads the labels only (a few bytes per pixel) and counts the classes;
* :func:`forward` then reads every pixel's logits and label once, accumulates the per-class sums
  of the focal terms and the Poly-1 sum (each program reduces in registers and adds one vector to
  the ``float64`` totals with atomics) and, when the logits need a gradient, writes it in the
  same pass: the weights and the mean's denominator are already known.

The backward then only multiplies that gradient by the upstream gradient, in place, and a kernel
whose programs return at once when it is 1 (the usual ``loss.backward()``) reads nothing:
:func:`scale_`. Global memory traffic is thus about the lower bound (logits read once, gradient
written once, labels read twice). Two cases recompute instead, in :func:`gradient`: float16
logits (a gradient of order ``1 / pixels`` would lose its precision in float16 before a
GradScaler's factor reaches it) and a second backward through the same graph.

Arithmetic is float32 whatever the input dtype. This module imports Triton; it is loaded only when
CUDA logits arrive (or by the tests, under ``TRITON_INTERPRET=1`` on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .labels import ignore_index_fits
from .layout import empty_gradient, flat_labels, flat_logits, forward_outputs
from .options import FocalOptions

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the logits' dtypes it takes
MAX_CLASSES = 1024  # a pixel's classes are one tile row: more would spill (the chunked pass takes them)
MAX_PROGRAMS = 4096  # programs loop over pixel blocks, so the float64 atomics stay few per class
SCALE_BLOCK = 4096
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal (a constexpr: kernels read no other globals)


@triton.jit
def _labels(target_ptr, start, num_pixels, spatial, target_stride_b, target_stride_s, ignore_index,
            HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr):
    """A block of pixels: their batch and position indices, labels (int64) and which count."""
    pixels = start + tl.arange(0, BLOCK_P).to(tl.int64)
    in_range = pixels < num_pixels
    batch = pixels // spatial
    position = pixels % spatial
    labels = tl.load(target_ptr + batch * target_stride_b + position * target_stride_s, mask=in_range,
                     other=0).to(tl.int64)
    valid = in_range
    if HAS_IGNORE:
        valid = valid & (labels != ignore_index)
    return in_range, batch, position, labels, valid


@triton.jit
def _pixel_terms(logits_ptr, in_range, batch, position, labels, valid, stride_b, stride_c, stride_s, num_classes,
                 gamma, BLOCK_C: tl.constexpr):
    """float32 logits of a block of pixels and their focal quantities.

    ``1 - p_t`` is the mass of the other classes and ``p_t`` the label's, each over the normaliser.
    The log of the larger is log1p of minus the smaller (by Goldberg's correction): ``-log p_t`` as
    ``p_t`` rounds to 1, ``(1 - p_t)^gamma = exp(gamma log(1 - p_t))`` as ``1 - p_t`` does.
    """
    classes = tl.arange(0, BLOCK_C)
    mask = in_range[:, None] & (classes < num_classes)[None, :]
    offsets = batch[:, None] * stride_b + position[:, None] * stride_s + classes[None, :].to(tl.int64) * stride_c
    z = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    peak = tl.where(in_range, tl.max(z, axis=1), 0.0)
    shifted = z - peak[:, None]
    is_label = (classes[None, :] == labels[:, None]) & valid[:, None]
    exps = tl.exp(shifted)
    other_mass = tl.sum(tl.where(is_label, 0.0, exps), axis=1)
    label_shifted = tl.sum(tl.where(is_label, shifted, 0.0), axis=1)
    label_mass = tl.exp(label_shifted)
    normaliser = other_mass + label_mass
    log_normaliser = tl.log(normaliser)
    one_minus_pt = other_mass / normaliser
    p_t = label_mass / normaliser
    near_one = one_minus_pt < 0.5  # p_t is the larger; NaN goes to the other side
    small = tl.where(near_one, one_minus_pt, tl.minimum(p_t, 0.5))
    shifted_one = 1.0 - small
    log_larger = tl.where(shifted_one == 1.0, -small,
                          tl.log(shifted_one) * (-small) / tl.where(shifted_one == 1.0, 1.0, shifted_one - 1.0))
    neg_log_pt = tl.where(near_one, -log_larger, -tl.minimum(label_shifted - log_normaliser, 0.0))
    one_minus_pt = tl.maximum(one_minus_pt, FLOAT32_TINY)
    modulated = tl.exp(gamma * tl.where(near_one, tl.log(one_minus_pt), log_larger))
    return is_label, shifted, log_normaliser, one_minus_pt, p_t, neg_log_pt, modulated


@triton.jit
def _store_gradient(grad_ptr, coefficients_ptr, poly_coefficient, upstream, in_range, batch, position, valid,
                    is_label, shifted, log_normaliser, one_minus_pt, p_t, neg_log_pt, modulated, grad_stride_b,
                    grad_stride_c, grad_stride_s, num_classes, gamma, BLOCK_C: tl.constexpr):
    """Write ``H * (onehot - softmax)`` for a block of pixels, ``H = dL/dp_t * p_t * upstream``."""
    # d/dp_t [-(1-p)^g log p] * p = g (1-p)^g p log(p)/(1-p) - (1-p)^g, finite as p -> 1
    log_ratio = tl.where(one_minus_pt > FLOAT32_TINY, -neg_log_pt / one_minus_pt, -1.0)
    focal_slope = gamma * modulated * p_t * log_ratio - modulated
    poly_slope = -(gamma + 1.0) * modulated * p_t  # d/dp_t [(1-p)^(g+1)] * p
    classes = tl.arange(0, BLOCK_C)
    # the label's coefficient; ignored pixels (and padding) read the zero appended at index C
    label = tl.where(valid, tl.sum(tl.where(is_label, classes[None, :], 0), axis=1), num_classes)
    coefficient = tl.load(coefficients_ptr + label)
    scalar = (coefficient * focal_slope + tl.where(valid, poly_coefficient * poly_slope, 0.0)) * upstream
    softmax = tl.exp(shifted - log_normaliser[:, None])
    grad = tl.where(is_label, (scalar * one_minus_pt)[:, None], -scalar[:, None] * softmax)
    offsets = (batch[:, None] * grad_stride_b + position[:, None] * grad_stride_s
               + classes[None, :].to(tl.int64) * grad_stride_c)
    mask = in_range[:, None] & (classes < num_classes)[None, :]
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _histogram_kernel(target_ptr, counts_ptr, num_pixels, spatial, target_stride_b, target_stride_s, num_classes,
                      ignore_index, HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    classes = tl.arange(0, BLOCK_C)
    counts = tl.zeros((BLOCK_C,), dtype=tl.int32)
    num_blocks = tl.cdiv(num_pixels, BLOCK_P)
    for block in range(tl.program_id(0).to(tl.int64), num_blocks, tl.num_programs(0).to(tl.int64)):
        _, _, _, labels, valid = _labels(target_ptr, block * BLOCK_P, num_pixels, spatial, target_stride_b,
                                         target_stride_s, ignore_index, HAS_IGNORE, BLOCK_P)
        counts += tl.sum(((classes[None, :] == labels[:, None]) & valid[:, None]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + classes, counts.to(tl.float64), mask=classes < num_classes)


@triton.jit
def _forward_kernel(logits_ptr, target_ptr, grad_ptr, coefficients_ptr, poly_coefficient_ptr, focal_ptr, poly_ptr,
                    num_pixels, spatial, stride_b, stride_c, stride_s, target_stride_b, target_stride_s,
                    grad_stride_b, grad_stride_c, grad_stride_s, num_classes, ignore_index, gamma,
                    HAS_IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    focal_sums = tl.zeros((BLOCK_C,), dtype=tl.float32)
    poly_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    poly_coefficient = tl.load(poly_coefficient_ptr)
    num_blocks = tl.cdiv(num_pixels, BLOCK_P)
    for block in range(tl.program_id(0).to(tl.int64), num_blocks, tl.num_programs(0).to(tl.int64)):
        in_range, batch, position, labels, valid = _labels(
            target_ptr, block * BLOCK_P, num_pixels, spatial, target_stride_b, target_stride_s, ignore_index,
            HAS_IGNORE, BLOCK_P)
        is_label, shifted, log_normaliser, one_minus_pt, p_t, neg_log_pt, modulated = _pixel_terms(
            logits_ptr, in_range, batch, position, labels, valid, stride_b, stride_c, stride_s, num_classes,
            gamma, BLOCK_C)
        focal_sums += tl.sum(tl.where(is_label, (modulated * neg_log_pt)[:, None], 0.0), axis=0)
        poly_sum += tl.where(valid, modulated * one_minus_pt, 0.0)
        if WRITE_GRAD:
            _store_gradient(grad_ptr, coefficients_ptr, poly_coefficient, 1.0, in_range, batch, position, valid,
                            is_label, shifted, log_normaliser, one_minus_pt, p_t, neg_log_pt, modulated,
                            grad_stride_b, grad_stride_c, grad_stride_s, num_classes, gamma, BLOCK_C)
    classes = tl.arange(0, BLOCK_C)
    tl.atomic_add(focal_ptr + classes, focal_sums.to(tl.float64), mask=classes < num_classes)
    tl.atomic_add(poly_ptr, tl.sum(poly_sum, axis=0).to(tl.float64))


@triton.jit
def _backward_kernel(logits_ptr, target_ptr, grad_ptr, coefficients_ptr, poly_coefficient_ptr, grad_loss_ptr,
                     num_pixels, spatial, stride_b, stride_c, stride_s, target_stride_b, target_stride_s,
                     grad_stride_b, grad_stride_c, grad_stride_s, num_classes, ignore_index, gamma,
                     HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    in_range, batch, position, labels, valid = _labels(
        target_ptr, tl.program_id(0).to(tl.int64) * BLOCK_P, num_pixels, spatial, target_stride_b, target_stride_s,
        ignore_index, HAS_IGNORE, BLOCK_P)
    is_label, shifted, log_normaliser, one_minus_pt, p_t, neg_log_pt, modulated = _pixel_terms(
        logits_ptr, in_range, batch, position, labels, valid, stride_b, stride_c, stride_s, num_classes, gamma,
        BLOCK_C)
    _store_gradient(grad_ptr, coefficients_ptr, tl.load(poly_coefficient_ptr), tl.load(grad_loss_ptr).to(tl.float32),
                    in_range, batch, position, valid, is_label, shifted, log_normaliser, one_minus_pt, p_t,
                    neg_log_pt, modulated, grad_stride_b, grad_stride_c, grad_stride_s, num_classes, gamma, BLOCK_C)


@triton.jit
def _scale_kernel(grad_ptr, numel, grad_loss_ptr, BLOCK: tl.constexpr):
    upstream = tl.load(grad_loss_ptr).to(tl.float32)
    if upstream != 1.0:  # decided on the device: no host synchronisation
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(grad_ptr + offsets, (values * upstream).to(grad_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its run-time arguments by name, its compile-time
    constants and warp count. Calling it launches the kernel; :mod:`.triton_aot` compiles the same
    object ahead of time for a GPU architecture, so what the tests compile is what runs."""
    kernel: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)


def histogram(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """float64 pixel count of each class ``[C]`` (ignored and out-of-range labels are not counted)."""
    return torch.ops.segfocal.triton_histogram(target, num_classes, ignore_index)


def forward(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, poly_coefficient: torch.Tensor,
            options: FocalOptions, write_grad: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """float64 per-class focal sums ``[C]`` and the Poly-1 sum ``[]``; with ``write_grad`` also the
    logits' gradient for an upstream gradient of 1 (else ``None``).

    ``coefficients`` ``[C + 1]``: each class's factor ``w a / D`` and a zero for ignored pixels;
    ``poly_coefficient``: ``poly_epsilon / D``; ``options``: the loss's, for ``gamma`` and ``ignore_index``.
    """
    focal_sums, poly_sum, grad = torch.ops.segfocal.triton_forward(
        logits, target, coefficients, poly_coefficient, float(options.gamma), options.ignore_index, write_grad)
    return focal_sums, poly_sum, grad if write_grad else None


def gradient(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             poly_coefficient: torch.Tensor, grad_loss: torch.Tensor, options: FocalOptions) -> torch.Tensor:
    """The logits' gradient recomputed from the logits (their dtype and memory format), with the
    upstream gradient folded in; ``coefficients`` as for :func:`forward`."""
    return torch.ops.segfocal.triton_gradient(logits, target, coefficients, poly_coefficient, grad_loss,
                                              float(options.gamma), options.ignore_index)


def scale_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_loss`` in place (a gradient from :func:`forward`: dense); nothing is read or
    written when ``grad_loss`` is 1."""
    if grad.numel() > 0:
        scale_launch(grad, grad_loss)()
    return grad


# The launches as custom operators, so that torch.compile keeps them in its graph as opaque calls (their
# fake implementations say the outputs' shapes) instead of breaking the graph on a Triton launch.
@torch.library.custom_op("segfocal::triton_histogram", mutates_args=())
def _histogram_op(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.float64, device=target.device)
    if target.numel() > 0:
        histogram_launch(target, counts, ignore_index)()
    return counts


@_histogram_op.register_fake
def _(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return target.new_empty(num_classes, dtype=torch.float64)


@torch.library.custom_op("segfocal::triton_forward", mutates_args=())
def _forward_op(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
                poly_coefficient: torch.Tensor, gamma: float, ignore_index: int,
                write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    focal_sums = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
    poly_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    grad = empty_gradient(logits)[0] if write_grad else None
    if target.numel() > 0:
        forward_launch(logits, target, grad, coefficients, poly_coefficient, focal_sums, poly_sum, gamma,
                       ignore_index)()
    return focal_sums, poly_sum, grad if grad is not None else logits.new_empty(0)


@_forward_op.register_fake
def _(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, poly_coefficient: torch.Tensor,
      gamma: float, ignore_index: int, write_grad: bool):
    return forward_outputs(logits, write_grad)


@torch.library.custom_op("segfocal::triton_gradient", mutates_args=())
def _gradient_op(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
                 poly_coefficient: torch.Tensor, grad_loss: torch.Tensor, gamma: float,
                 ignore_index: int) -> torch.Tensor:
    grad = empty_gradient(logits)[0]
    if target.numel() > 0:
        gradient_launch(logits, target, grad, coefficients, poly_coefficient, grad_loss, gamma, ignore_index)()
    return grad


@_gradient_op.register_fake
def _(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, poly_coefficient: torch.Tensor,
      grad_loss: torch.Tensor, gamma: float, ignore_index: int) -> torch.Tensor:
    return empty_gradient(logits)[0]


def histogram_launch(target: torch.Tensor, counts: torch.Tensor, ignore_index: int) -> Launch:
    labels, label_strides, num_pixels, spatial = flat_labels(target)
    tiles = tiles_for(counts.shape[0])
    return Launch(_histogram_kernel, (_programs(num_pixels, tiles.block_p),),
                  dict(target_ptr=labels, counts_ptr=counts, num_pixels=num_pixels, spatial=spatial,
                       target_stride_b=label_strides[0], target_stride_s=label_strides[1],
                       num_classes=counts.shape[0], ignore_index=ignore_index),
                  dict(HAS_IGNORE=ignore_index_fits(ignore_index, target.dtype), BLOCK_P=tiles.block_p,
                       BLOCK_C=tiles.block_c),
                  tiles.num_warps)


def forward_launch(logits, target, grad, coefficients, poly_coefficient, focal_sums, poly_sum, gamma,
                   ignore_index) -> Launch:
    """The one pass over the logits; it writes ``grad`` (dense, the logits' shape) unless that is ``None``."""
    args = _pixel_arguments(logits, target, grad, coefficients, poly_coefficient, gamma, ignore_index)
    tiles = tiles_for(logits.shape[1])
    return Launch(_forward_kernel, (_programs(args["num_pixels"], tiles.block_p),),
                  dict(args, focal_ptr=focal_sums, poly_ptr=poly_sum),
                  dict(HAS_IGNORE=ignore_index_fits(ignore_index, target.dtype), WRITE_GRAD=grad is not None,
                       BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c),
                  tiles.num_warps)


def gradient_launch(logits, target, grad, coefficients, poly_coefficient, grad_loss, gamma, ignore_index) -> Launch:
    args = _pixel_arguments(logits, target, grad, coefficients, poly_coefficient, gamma, ignore_index)
    tiles = tiles_for(logits.shape[1])
    return Launch(_backward_kernel, (triton.cdiv(args["num_pixels"], tiles.block_p),),
                  dict(args, grad_loss_ptr=grad_loss),
                  dict(HAS_IGNORE=ignore_index_fits(ignore_index, target.dtype), BLOCK_P=tiles.block_p,
                       BLOCK_C=tiles.block_c),
                  tiles.num_warps)


def scale_launch(grad: torch.Tensor, grad_loss: torch.Tensor) -> Launch:
    return Launch(_scale_kernel, (triton.cdiv(grad.numel(), SCALE_BLOCK),),
                  dict(grad_ptr=grad, numel=grad.numel(), grad_loss_ptr=grad_loss), dict(BLOCK=SCALE_BLOCK), 4)


def _pixel_arguments(logits, target, grad, coefficients, poly_coefficient, gamma, ignore_index) -> Dict[str, Any]:
    """The run-time arguments the forward and backward kernels share (``grad`` ``None``: not written;
    the logits stand in for its pointer)."""
    logits_view, strides = flat_logits(logits)
    labels, label_strides, num_pixels, spatial = flat_labels(target)
    grad_view, grad_strides = (logits_view, strides) if grad is None else flat_logits(grad)
    return dict(logits_ptr=logits_view, target_ptr=labels, grad_ptr=grad_view, coefficients_ptr=coefficients.float(),
                poly_coefficient_ptr=poly_coefficient.float(), num_pixels=num_pixels, spatial=spatial,
                stride_b=strides[0], stride_c=strides[1], stride_s=strides[2], target_stride_b=label_strides[0],
                target_stride_s=label_strides[1], grad_stride_b=grad_strides[0], grad_stride_c=grad_strides[1],
                grad_stride_s=grad_strides[2], num_classes=logits.shape[1], ignore_index=ignore_index,
                gamma=float(gamma))


class Tiles(NamedTuple):
    block_p: int  # pixels per block
    block_c: int  # classes per block: all of them, padded to a power of two
    num_warps: int


def tiles_for(num_classes: int) -> Tiles:
    """Tile sizes and warps for ``num_classes`` (at most :data:`MAX_CLASSES`): all classes of a pixel
    in one row, padded to a power of two; at most 2048 elements a tile over 8 warps (8 a thread) and
    at most 256 pixels (each pixel's indices and label are int64 vectors: with 512 or 1024 pixels a
    tile, 2 to 8 classes reached ptxas's 128-register cap on sm_80 and spilled), 4 pixels over 16
    warps at 1024 classes. Measured: ``benchmarks/triton_resources.py`` (benchmarks/RESULTS.md)."""
    block_c = triton.next_power_of_2(num_classes)
    block_p = 256 if block_c <= 4 else 128 if block_c <= 16 else max(4, 2048 // block_c)
    return Tiles(block_p, block_c, 16 if block_c >= 1024 else 8)


def _programs(num_pixels: int, block_p: int) -> int:
    return min(triton.cdiv(num_pixels, block_p), MAX_PROGRAMS)
