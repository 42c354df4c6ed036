"""Colour overlays of segmentation masks on images (TensorBoard, prediction output)."""
from __future__ import annotations

from typing import Sequence

import torch


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` on ``[N, 3, H, W]`` images scaled to [0, 1]; returns uint8."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return ((images.float() * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)


def overlay_masks(
    images: torch.Tensor,
    masks: torch.Tensor,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    opacity: float = 0.5,
) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` blended with colour-coded masks ``[N, H, W]``; ignored pixels stay uncoloured."""
    colours = torch.tensor(palette, dtype=torch.float32, device=images.device)
    valid = (masks >= 0) & (masks < len(palette)) & (masks != ignore_index)
    coloured = colours[torch.where(valid, masks, 0).long()].permute(0, 3, 1, 2)
    rgb = images.float()
    blend = torch.where(valid.unsqueeze(1), (1 - opacity) * rgb + opacity * coloured, rgb)
    return blend.round().to(torch.uint8)
