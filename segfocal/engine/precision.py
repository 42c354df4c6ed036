"""Automatic mixed precision: which autocast dtype and whether a GradScaler is needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError


@dataclass(frozen=True)
class Precision:
    """``autocast_dtype`` is None for full precision; fp16 needs a gradient scaler, bf16 does not."""

    device_type: str
    autocast_dtype: Optional[torch.dtype]

    @property
    def uses_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that support it, else fp16, and full precision on the CPU."""
    if mode == "fp32" or (mode == "auto" and device.type != "cuda"):
        return Precision(device.type, None)
    if mode == "auto":
        return Precision("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp='fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    return Precision(device.type, torch.bfloat16 if mode == "bf16" else torch.float16)


def inference_precision(mode: str, device: torch.device) -> Precision:
    """The run's precision for inference on ``device``: on the CPU, fp16 (a GPU training choice) becomes fp32."""
    return resolve_precision("fp32" if mode == "fp16" and device.type != "cuda" else mode, device)
