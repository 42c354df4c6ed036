"""The state of the streaming metrics: one int64 count vector on a device."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist


class DeviceCounts:
    """``int64`` counts that live on a device, are summed over ranks, and are saved and restored.

    ``device=None`` places them on the device of the first update's tensors (see :meth:`_follow`).
    Subclasses name what fixes the counts' layout in :meth:`_layout` (checked on load).
    """

    def __init__(self, size: int, device: Optional[Union[str, torch.device]]) -> None:
        self._device_fixed = device is not None
        self._counts = torch.zeros(size, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self._counts.device

    def to(self, device: Union[str, torch.device]) -> "DeviceCounts":
        """Move the counts to ``device`` (kept from then on); returns ``self``."""
        self._counts = self._counts.to(device)
        self._device_fixed = True
        return self

    def reset(self) -> None:
        """Zero every count (the device is kept)."""
        self._counts.zero_()

    def all_reduce(self) -> None:
        """Sum the counts over ranks (``torch.distributed``); a no-op without a process group.

        Call it once, after the last update on every rank: each call adds the other ranks' counts.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)

    def state_dict(self) -> Dict[str, Any]:
        return {**self._layout(), "counts": self._counts.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        theirs = {key: state.get(key) for key in self._layout()}
        if theirs != self._layout() or state["counts"].shape != self._counts.shape:
            raise ValueError(f"state is for {theirs}, this {type(self).__name__} has {self._layout()}")
        self._counts.copy_(state["counts"])

    def _follow(self, tensor: torch.Tensor) -> None:
        """Move to ``tensor``'s device on the first update when no device was given."""
        if not self._device_fixed:
            self.to(tensor.device)

    def _layout(self) -> Dict[str, int]:
        raise NotImplementedError


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
