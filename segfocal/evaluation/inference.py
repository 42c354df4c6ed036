"""Dense inference for images of any size: whole image or sliding window, optional flip TTA.

Call these under ``torch.no_grad()`` (or ``torch.inference_mode()``) with the model in eval mode;
autocast may be active: logits are accumulated and returned in float32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.regions import sliding_windows

Size2 = Union[int, Sequence[int]]


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop_size: Size2 = (512, 512),
    stride: Size2 = (341, 341),
    flip: bool = False,
    size_divisor: Optional[int] = None,
) -> torch.Tensor:
    """Float32 logits ``[B, C, H, W]`` of ``model`` for ``images [B, 3, H, W]``, at the input size.

    * ``mode="whole"``: one forward pass on the whole image.
    * ``mode="slide"``: overlapping ``crop_size`` windows every ``stride`` pixels, the last one
      aligned to the bottom/right border; the logits of overlapping windows are averaged. A
      window larger than the image is zero-padded up to ``crop_size``, so the model always sees
      its training crop size.
    * ``flip=True``: the mean of the logits of the image and of its horizontal mirror (flipped
      back). Logits, not probabilities, are averaged: the result stays a logit map for argmax,
      softmax or a loss, and equals the no-flip output for a mirror-invariant model.

    Inputs whose height or width is not a multiple of ``size_divisor`` are zero-padded at the
    bottom/right (0 is the mean colour after normalisation; reflection would fail for pads as
    large as the image) and the output is cropped back. ``size_divisor=None`` asks the model
    (:func:`model_size_divisor`). An output at another resolution than its input is resized
    bilinearly.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    crop = _pair(crop_size, "crop_size")
    step = _pair(stride, "stride")
    if mode == "slide" and (step[0] > crop[0] or step[1] > crop[1]):
        raise ValueError(f"stride {step} larger than crop_size {crop} would leave pixels uncovered")
    divisor = model_size_divisor(model) if size_divisor is None else int(size_divisor)
    if divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor!r}")

    def infer(batch: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return _forward(model, batch, num_classes, divisor)
        return _slide(model, batch, num_classes, crop, step, divisor)

    logits = infer(images)
    if flip:
        logits = (logits + infer(images.flip(-1)).flip(-1)).mul_(0.5)
    return logits.contiguous()


def predict(model: nn.Module, images: torch.Tensor, num_classes: int, **kwargs) -> torch.Tensor:
    """Class-index map ``int64 [B, H, W]``: the argmax of :func:`predict_logits` (same keyword arguments)."""
    return predict_logits(model, images, num_classes, **kwargs).argmax(dim=1)


def model_size_divisor(model: nn.Module) -> int:
    """What input heights and widths must be multiples of, as far as the model says; else 1.

    For a segmentation-models-pytorch model, its encoder's output stride (``2 ** encoder_depth``
    at most: 32 for a 5-stage encoder), unless the model declares
    ``requires_divisible_input_shape = False`` (smp 0.6 does for ``Unet``, which resizes its skip
    connections itself; versions without the attribute check every model). DataParallel,
    DistributedDataParallel and ``torch.compile`` wrappers are looked through.
    """
    model = unwrap_model(model)
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    if callable(getattr(model, "check_input_shape", None)) and isinstance(stride, int):
        return stride if getattr(model, "requires_divisible_input_shape", True) else 1
    return 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _pair(value: Size2, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _forward(model: nn.Module, images: torch.Tensor, num_classes: int, divisor: int,
             min_size: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """One forward pass with the input zero-padded to ``min_size`` and to multiples of ``divisor``."""
    height, width = images.shape[-2:]
    padded_h = -(-max(height, min_size[0]) // divisor) * divisor
    padded_w = -(-max(width, min_size[1]) // divisor) * divisor
    if (padded_h, padded_w) != (height, width):
        images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
    output = model(images)
    if isinstance(output, dict):  # torchvision segmentation models
        output = output["out"]
    if output.ndim != 4 or output.shape[:2] != (images.shape[0], num_classes):
        raise ValueError(f"model output has shape {tuple(output.shape)}, expected [{images.shape[0]}, {num_classes}, H, W]")
    output = output.float()
    if output.shape[-2:] != (padded_h, padded_w):
        output = F.interpolate(output, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
    return output[..., :height, :width]


def window_rows(height: int, width: int, crop: Size2, stride: Size2) -> List[List[Tuple[int, int, int, int]]]:
    """The sliding windows over a ``height`` x ``width`` image as boxes ``(top, bottom, left, right)``, one list
    per row of windows, in the order slide mode adds their logits (so another caller adding them in this
    order gets the same float sums)."""
    crop, stride = _pair(crop, "crop_size"), _pair(stride, "stride")
    return [[(top, min(top + crop[0], height), left, min(left + crop[1], width))
             for left in sliding_windows(width, crop[1], stride[1])]
            for top in sliding_windows(height, crop[0], stride[0])]


def window_logits(model: nn.Module, window: torch.Tensor, num_classes: int, crop: Size2,
                  size_divisor: Optional[int] = None, flip: bool = False) -> torch.Tensor:
    """Float32 logits of one sliding ``window`` [B, C, h, w] as slide mode computes them: zero-padded to
    ``crop`` and to the model's size divisor; ``flip``: averaged with its mirror's (the window's own)."""
    divisor = model_size_divisor(model) if size_divisor is None else int(size_divisor)
    crop = _pair(crop, "crop_size")
    logits = _forward(model, window, num_classes, divisor, min_size=crop)
    if flip:
        logits = (logits + _forward(model, window.flip(-1), num_classes, divisor, min_size=crop).flip(-1)).mul_(0.5)
    return logits


def _slide(model: nn.Module, images: torch.Tensor, num_classes: int, crop: Tuple[int, int],
           stride: Tuple[int, int], divisor: int) -> torch.Tensor:
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in window_rows(height, width, crop, stride):
        for top, bottom, left, right in row:
            tile = images[:, :, top:bottom, left:right]
            logits[:, :, top:bottom, left:right] += window_logits(model, tile, num_classes, crop, divisor)
            count[:, :, top:bottom, left:right] += 1
    return logits.div_(count)
