"""Changing what a model's segmentation head outputs, in its own weights."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_logit_bias(model: nn.Module, bias: torch.Tensor, example: torch.Tensor) -> None:
    """Add ``bias[c]`` to every logit of class ``c`` of ``model``, in its weights: to the bias of the last
    convolution of its ``segmentation_head`` (smp's head: the convolution, then upsampling, which keeps
    a constant shift, and no activation), so any runtime gives the shifted logits with no extra code.

    ``example`` (an input the model takes) checks it: the logits must move by ``bias`` exactly (to
    float32 rounding), else ``ValueError`` and the model is left as it was.
    """
    head = getattr(model, "segmentation_head", None)
    convolutions = [module for module in head.modules() if isinstance(module, nn.Conv2d)] if head is not None else []
    if not convolutions or convolutions[-1].out_channels != bias.numel():
        raise ValueError(f"{type(model).__name__} has no segmentation_head ending in a convolution of "
                         f"{bias.numel()} channels to fold the calibration into")
    last = convolutions[-1]
    was_training = model.training
    model.eval()
    before = model(example).float()
    previous = None if last.bias is None else last.bias.detach().clone()
    shift = bias.to(last.weight.device, last.weight.dtype)
    if last.bias is None:
        last.bias = nn.Parameter(shift.clone())
    else:
        last.bias += shift
    moved = model(example).float() - before
    model.train(was_training)
    expected = bias.to(moved.device, moved.dtype).view(1, -1, 1, 1).expand_as(moved)
    if not torch.allclose(moved, expected, rtol=0, atol=1e-4 * max(1.0, float(before.abs().max()))):
        if previous is None:
            last.bias = None
        else:
            last.bias.copy_(previous)
        raise ValueError(f"{type(model).__name__}'s head does not pass a constant shift of its last convolution "
                         f"through to its logits: the calibration cannot be folded into it")
