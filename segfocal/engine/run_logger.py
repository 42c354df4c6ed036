"""What a run records: TensorBoard scalars and images, and a JSON-lines metrics log."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping

import torch


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under the run directory (rank 0 only)."""

    def __init__(self, work_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is only needed for training

            self.writer = SummaryWriter(log_dir=str(work_dir / "tb"))
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

    def forget_after(self, epoch: int) -> None:
        """Drop ``metrics.jsonl`` entries of epochs after ``epoch`` (a resumed run logs them again)."""
        if self.jsonl is None:
            return
        self.jsonl.close()
        kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        self.jsonl_path.write_text("".join(kept), encoding="utf-8")
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``images``: uint8 ``[N, 3, H, W]``."""
        if self.writer is not None and len(images):
            self.writer.add_images(tag, images, step, dataformats="NCHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value
