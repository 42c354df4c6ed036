"""Colour overlays of segmentation masks on images (TensorBoard, prediction output), and their legends."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .config.schema import DataConfig

SWATCH, GAP, MARGIN = 12, 4, 6  # legend layout in pixels, before scaling up for a wide image
LEGEND_WIDTH = 640  # a legend for a wider image is drawn at this width and scaled up by a whole factor


def palette_of(data: DataConfig) -> List[List[int]]:
    """The colours of a run's classes: ``data.palette``, else :func:`~segfocal.data.default_palette`."""
    from .data.masks import default_palette  # the data package pulls in albumentations

    return data.palette or default_palette(data.num_classes)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` on ``[N, C, H, W]`` model inputs; returns uint8 ``[N, 3, H, W]`` to show.

    The values shown are the scaled ones (``x * data.scale``; 0..1 by default), clipped to 0..1, of
    the first three channels, or of the first as grey (see :func:`rgb_channels`).
    """
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return rgb_channels(((images.float() * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8))


def display_images(images: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Stored images ``[N, C, H, W]`` (any type) as uint8 ``[N, 3, H, W]`` to draw on: 8-bit ones as they
    are, others as ``x * scale`` (``data.scale``, default the type's full range) clipped to 0..1."""
    from .data.images import value_scale  # the data package pulls in albumentations

    if images.dtype != torch.uint8:
        factor = value_scale(np.dtype(str(images.dtype).removeprefix("torch.")), scale)
        images = ((images.double() * factor).clamp(0, 1) * 255).round().to(torch.uint8)
    return rgb_channels(images)


def rgb_channels(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, 3, H, W]``: the first three channels (e.g. R, G, B of RGB + near-infrared),
    or the first channel repeated as grey when there are fewer than three."""
    return images[:, :3] if images.shape[1] >= 3 else images[:, :1].repeat(1, 3, 1, 1)


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


def legend(colours: Sequence[Sequence[int]], names: Sequence[str], width: int) -> np.ndarray:
    """An (H, W, 3) uint8 strip, white, with a swatch and a name per class in rows that wrap at ``width``.

    W is ``width`` (a few pixels less once scaled), or more where one entry is wider. For a wide
    image the legend is drawn at about :data:`LEGEND_WIDTH` and scaled up by a whole factor (nearest
    neighbour: swatches keep their exact colours), so it stays readable with the image shrunk to a screen.
    """
    scale = max(1, width // LEGEND_WIDTH)
    font = ImageFont.load_default()
    text_top, text_bottom = font.getbbox("Ag")[1::2]
    row = max(SWATCH, text_bottom - text_top) + GAP
    spans = [SWATCH + GAP + math.ceil(font.getlength(name)) for name in names]
    inner = max([1, width // scale - 2 * MARGIN, *spans])
    places, x, y = [], 0, 0
    for span in spans:  # left to right, a new row when the next entry does not fit
        if x and x + span > inner:
            x, y = 0, y + row
        places.append((MARGIN + x, MARGIN + y))
        x += span + 2 * SWATCH
    strip = Image.new("RGB", (inner + 2 * MARGIN, y + row + 2 * MARGIN - GAP), "white")
    draw = ImageDraw.Draw(strip)
    for (left, top), colour, name in zip(places, colours, names):
        draw.rectangle((left, top, left + SWATCH - 1, top + SWATCH - 1), fill=tuple(colour), outline="black")
        draw.text((left + SWATCH + GAP, top + (SWATCH - text_top - text_bottom) // 2), name, fill="black", font=font)
    if scale > 1:
        strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
    return np.array(strip)  # writable, for torch.from_numpy


def with_legend(image: np.ndarray, palette: Sequence[Sequence[int]], names: Sequence[str],
                classes: Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` above the legend of ``classes``, on white where the two widths differ."""
    strip = legend([palette[c] for c in classes], [names[c] for c in classes], image.shape[1])
    canvas = np.full((image.shape[0] + strip.shape[0], max(image.shape[1], strip.shape[1]), 3), 255, np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    canvas[image.shape[0]:, :strip.shape[1]] = strip
    return canvas
