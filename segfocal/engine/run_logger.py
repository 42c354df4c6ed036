"""What a run records: TensorBoard scalars and images, and a JSON-lines metrics log."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..visualize import denormalize, legend, overlay_masks, palette_of


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under the run directory (rank 0 only).

    Logged images are downscaled to ``image_size`` pixels on their longest side (0: as they are),
    so that a dataset of large images does not grow the event file by megabytes per validation;
    once the TensorBoard folder passes ``max_mb`` megabytes (0: never), one warning says so.
    """

    def __init__(self, work_dir: Path, enabled: bool = True, image_size: int = 0, max_mb: int = 0) -> None:
        self.enabled = enabled
        self.image_size, self.max_mb = image_size, max_mb
        self._warned = False
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is only needed for training

            self.tb_dir = work_dir / "tb"
            self.writer = SummaryWriter(log_dir=str(self.tb_dir))
            self.jsonl_path = work_dir / "metrics.jsonl"
            self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def record(self, entry: Dict[str, Any]) -> None:
        """Append one JSON object (NaN written as null) to ``metrics.jsonl``."""
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(_nan_to_none(entry)) + "\n")
        self.jsonl.flush()

    def forget_after(self, step: int) -> None:
        """Drop ``metrics.jsonl`` entries logged after optimiser step ``step`` (a resumed run logs them again)."""
        if self.jsonl is None:
            return
        self.jsonl.close()
        kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _step_of(line) is not None and _step_of(line) <= step]
        self.jsonl_path.write_text("".join(kept), encoding="utf-8")
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``images``: uint8 ``[N, 3, H, W]``, downscaled to ``image_size`` on the longest side."""
        if self.writer is None or not len(images):
            return
        self.writer.add_images(tag, downscaled(images, self.image_size), step, dataformats="NCHW")
        self._check_size()

    def examples(self, examples: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], data: DataConfig,
                 class_names: Sequence[str], step: int) -> None:
        """Validation examples (normalised image, label, prediction): the input, the label and the
        prediction over it in the dataset's palette, and a legend of every class."""
        if self.writer is None or not examples:
            return
        images, targets, predictions = (torch.stack(parts) for parts in zip(*examples))
        palette = palette_of(data)
        rgb = denormalize(images, data.mean, data.std)
        self.images("val/input", rgb, step)
        for tag, masks in (("label", targets), ("prediction", predictions)):
            self.images(f"val/{tag}", overlay_masks(rgb, masks, palette, data.ignore_index), step)
        # every class's colour, as wide as the logged images may be so it is not shrunk: a few kB a validation
        key = legend(palette, class_names, self.image_size or rgb.shape[-1])
        self.images("val/legend", torch.from_numpy(key).permute(2, 0, 1).unsqueeze(0), step)

    def _check_size(self) -> None:
        if self._warned or not self.max_mb:
            return
        self.writer.flush()
        megabytes = sum(path.stat().st_size for path in self.tb_dir.rglob("*") if path.is_file()) / 2**20
        if megabytes > self.max_mb:
            self._warned = True
            warnings.warn(f"the TensorBoard logs in {self.tb_dir} have grown to {megabytes:.0f} MB "
                          f"(train.max_log_mb={self.max_mb}); log fewer or smaller images (train.log_images, "
                          f"train.log_image_size) or validate less often", stacklevel=3)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def downscaled(images: torch.Tensor, longest_side: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images shrunk (area averaging) so that their longest side is at most
    ``longest_side``; unchanged if already that small or ``longest_side`` is 0."""
    height, width = images.shape[-2:]
    if not longest_side or max(height, width) <= longest_side:
        return images
    scale = longest_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images.float(), size=size, mode="area").round_().clamp_(0, 255).to(torch.uint8)


def _step_of(line: str) -> Optional[int]:
    """The step of a ``metrics.jsonl`` line; None for a blank line or one a crash cut short."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value
