"""The fused focal loss on CUDA: a Triton kernel pair over ``[B, C, S]`` logits of any dense layout.

* :func:`pixel_sums` (forward) reads every pixel's logits and label once and accumulates, per
  class, the pixel count and the sum of the focal terms, plus the sum of the Poly-1 terms: each
  program reduces its pixels in registers and adds one vector to the ``float64`` totals with
  atomics, so the histogram costs no extra pass and nothing per pixel is written.
* :func:`gradient` (backward) reads the logits and labels again, recomputes the softmax and writes
  the gradient once, in the logits' dtype and memory format, with the upstream gradient folded in.

Global memory traffic is therefore logits x2 + labels x2 + gradient x1, with no saved per-pixel
state. Arithmetic is float32 whatever the input dtype. This module imports Triton; it is loaded
only when CUDA logits arrive (or by the tests, under ``TRITON_INTERPRET=1`` on the CPU).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 4096  # programs loop over pixel blocks, so the float64 atomics stay few per class


@triton.jit
def _pixel_terms(logits_ptr, target_ptr, start, num_pixels, spatial, stride_b, stride_c, stride_s,
                 target_stride_b, target_stride_s, num_classes, ignore_index, gamma,
                 HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One block of pixels: float32 logits, label one-hot and the focal quantities.

    ``1 - p_t`` is the mass of the other classes, accurate when ``p_t`` rounds to 1, where
    ``-log p_t = -log1p(-(1 - p_t))`` is used (log1p by Goldberg's correction).
    """
    pixels = start + tl.arange(0, BLOCK_P).to(tl.int64)
    in_range = pixels < num_pixels
    batch = pixels // spatial
    position = pixels % spatial
    classes = tl.arange(0, BLOCK_C)
    labels = tl.load(target_ptr + batch * target_stride_b + position * target_stride_s, mask=in_range,
                     other=0).to(tl.int64)
    valid = in_range
    if HAS_IGNORE:
        valid = valid & (labels != ignore_index)
    mask = in_range[:, None] & (classes < num_classes)[None, :]
    offsets = batch[:, None] * stride_b + position[:, None] * stride_s + classes[None, :].to(tl.int64) * stride_c
    z = tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    peak = tl.where(in_range, tl.max(z, axis=1), 0.0)
    shifted = z - peak[:, None]
    is_label = (classes[None, :] == labels[:, None]) & valid[:, None]
    exps = tl.exp(shifted)
    other_mass = tl.sum(tl.where(is_label, 0.0, exps), axis=1)
    label_shifted = tl.sum(tl.where(is_label, shifted, 0.0), axis=1)
    normaliser = other_mass + tl.exp(label_shifted)
    log_normaliser = tl.log(normaliser)
    one_minus_pt = other_mass / normaliser
    small = tl.minimum(one_minus_pt, 0.5)
    shifted_one = 1.0 - small
    log1p_small = tl.where(shifted_one == 1.0, -small,
                           tl.log(shifted_one) * (-small) / tl.where(shifted_one == 1.0, 1.0, shifted_one - 1.0))
    neg_log_pt = tl.where(one_minus_pt < 0.5, -log1p_small, -tl.minimum(label_shifted - log_normaliser, 0.0))
    tiny = 1.1754943508222875e-38  # float32's smallest normal
    one_minus_pt = tl.maximum(one_minus_pt, tiny)
    modulated = tl.exp2(gamma * tl.log2(one_minus_pt))
    return valid, is_label, shifted, log_normaliser, one_minus_pt, neg_log_pt, modulated


@triton.jit
def _forward_kernel(logits_ptr, target_ptr, counts_ptr, focal_ptr, poly_ptr, num_pixels, spatial,
                    stride_b, stride_c, stride_s, target_stride_b, target_stride_s, num_classes, ignore_index,
                    gamma, HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    counts = tl.zeros((BLOCK_C,), dtype=tl.float32)
    focal_sums = tl.zeros((BLOCK_C,), dtype=tl.float32)
    poly_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    num_blocks = tl.cdiv(num_pixels, BLOCK_P)
    for block in range(tl.program_id(0).to(tl.int64), num_blocks, tl.num_programs(0).to(tl.int64)):
        valid, is_label, _, _, one_minus_pt, neg_log_pt, modulated = _pixel_terms(
            logits_ptr, target_ptr, block * BLOCK_P, num_pixels, spatial, stride_b, stride_c,
            stride_s, target_stride_b, target_stride_s, num_classes, ignore_index, gamma, HAS_IGNORE, BLOCK_P,
            BLOCK_C)
        focal = modulated * neg_log_pt
        counts += tl.sum(is_label.to(tl.float32), axis=0)
        focal_sums += tl.sum(tl.where(is_label, focal[:, None], 0.0), axis=0)
        poly_sum += tl.where(valid, modulated * one_minus_pt, 0.0)
    classes = tl.arange(0, BLOCK_C)
    present = classes < num_classes
    tl.atomic_add(counts_ptr + classes, counts.to(tl.float64), mask=present)
    tl.atomic_add(focal_ptr + classes, focal_sums.to(tl.float64), mask=present)
    tl.atomic_add(poly_ptr, tl.sum(poly_sum, axis=0).to(tl.float64))


@triton.jit
def _backward_kernel(logits_ptr, target_ptr, grad_ptr, coefficients_ptr, poly_coefficient_ptr, grad_loss_ptr,
                     num_pixels, spatial, stride_b, stride_c, stride_s, target_stride_b, target_stride_s,
                     grad_stride_b, grad_stride_c, grad_stride_s, num_classes, ignore_index, gamma,
                     HAS_IGNORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK_P
    valid, is_label, shifted, log_normaliser, one_minus_pt, neg_log_pt, modulated = _pixel_terms(
        logits_ptr, target_ptr, start, num_pixels, spatial, stride_b, stride_c, stride_s, target_stride_b,
        target_stride_s, num_classes, ignore_index, gamma, HAS_IGNORE, BLOCK_P, BLOCK_C)
    p_t = tl.exp(-neg_log_pt)
    # d/dp_t [-(1-p)^g log p] * p = g (1-p)^g p log(p)/(1-p) - (1-p)^g, finite as p -> 1
    log_ratio = tl.where(one_minus_pt > 1.1754943508222875e-38, -neg_log_pt / one_minus_pt, -1.0)
    focal_slope = gamma * modulated * p_t * log_ratio - modulated
    poly_slope = -(gamma + 1.0) * modulated * p_t  # d/dp_t [(1-p)^(g+1)] * p
    classes = tl.arange(0, BLOCK_C)
    # the label's coefficient; ignored pixels (and padding) read the zero appended at index C
    label = tl.sum(tl.where(is_label, classes[None, :], 0), axis=1)
    label = tl.where(valid, label, num_classes)
    coefficient = tl.load(coefficients_ptr + label)
    poly_coefficient = tl.load(poly_coefficient_ptr)
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    scalar = (coefficient * focal_slope + tl.where(valid, poly_coefficient * poly_slope, 0.0)) * grad_loss
    softmax = tl.exp(shifted - log_normaliser[:, None])
    grad = tl.where(is_label, (scalar * one_minus_pt)[:, None], -scalar[:, None] * softmax)
    pixels = start + tl.arange(0, BLOCK_P).to(tl.int64)
    batch = pixels // spatial
    position = pixels % spatial
    offsets = (batch[:, None] * grad_stride_b + position[:, None] * grad_stride_s
               + classes[None, :].to(tl.int64) * grad_stride_c)
    mask = (pixels < num_pixels)[:, None] & (classes < num_classes)[None, :]
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def pixel_sums(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 per-class pixel counts ``[C]``, per-class focal sums ``[C]`` and the Poly-1 sum ``[]``."""
    num_classes = logits.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    focal_sums = torch.zeros_like(counts)
    poly_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    logits, strides, target, target_strides, num_pixels, spatial = _flat_views(logits, target)
    block_p, block_c = _blocks(num_classes)
    if num_pixels > 0:
        grid = (min(triton.cdiv(num_pixels, block_p), MAX_PROGRAMS),)
        _forward_kernel[grid](logits, target, counts, focal_sums, poly_sum, num_pixels, spatial, *strides,
                              *target_strides, num_classes, ignore_index, float(gamma),
                              HAS_IGNORE=_fits(ignore_index, target.dtype), BLOCK_P=block_p, BLOCK_C=block_c)
    return counts, focal_sums, poly_sum


def gradient(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             poly_coefficient: torch.Tensor, grad_loss: torch.Tensor, gamma: float, ignore_index: int) -> torch.Tensor:
    """The logits' gradient (their dtype and memory format), for per-class ``coefficients`` ``[C + 1]``
    (the last one, for ignored pixels, zero), the Poly-1 coefficient and the upstream gradient."""
    num_classes = logits.shape[1]
    grad = torch.empty_like(logits)  # the logits' memory format ...
    flat_grad, grad_strides = _flat_logits(grad)
    if flat_grad.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr():  # ... unless it flattens to a copy
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        flat_grad, grad_strides = _flat_logits(grad)
    flat_logits, strides, flat_target, target_strides, num_pixels, spatial = _flat_views(logits, target)
    block_p, block_c = _blocks(num_classes)
    if num_pixels > 0:
        grid = (triton.cdiv(num_pixels, block_p),)
        _backward_kernel[grid](flat_logits, flat_target, flat_grad, coefficients.float(), poly_coefficient.float(),
                               grad_loss, num_pixels, spatial, *strides, *target_strides, *grad_strides,
                               num_classes, ignore_index, float(gamma), HAS_IGNORE=_fits(ignore_index, target.dtype),
                               BLOCK_P=block_p, BLOCK_C=block_c)
    return grad


def _flat_views(logits: torch.Tensor, target: torch.Tensor):
    """``[B, C, S]`` logits and ``[B, S]`` labels (``[N, C]`` as ``B = 1``), views where the layout
    allows (copies otherwise), with their strides, the pixel count and ``S``."""
    logits, strides = _flat_logits(logits)
    labels = target.reshape(1, -1) if target.ndim == 1 else target.reshape(target.shape[0], -1)
    batch, spatial = labels.shape
    return logits, strides, labels, labels.stride(), batch * spatial, spatial


def _flat_logits(tensor: torch.Tensor):
    """``tensor`` as ``[B, C, S]`` (a view when its spatial dims merge) and the strides of B, C, S."""
    flat = tensor.t().unsqueeze(0) if tensor.ndim == 2 else tensor.flatten(2)
    return flat, flat.stride()


def _blocks(num_classes: int) -> Tuple[int, int]:
    """Tile sizes: all classes of a pixel in one row (a power of two), about 4096 elements per tile."""
    block_c = triton.next_power_of_2(num_classes)
    return max(16, min(1024, 4096 // block_c)), block_c


def _fits(ignore_index: int, dtype: torch.dtype) -> bool:
    """Whether ``ignore_index`` is a value ``dtype`` can hold (otherwise no label is ignored)."""
    info = torch.iinfo(dtype)
    return info.min <= ignore_index <= info.max
