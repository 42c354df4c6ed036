"""A segmentation confusion matrix accumulated on the device, without host synchronisation."""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .counts import DeviceCounts, check_positive_int


class ConfusionMatrix(DeviceCounts):
    """Pixel counts ``matrix[true, predicted]`` over every ``update``, for ``num_classes`` classes.

    ``update`` costs one ``scatter_add_`` of ``target * C + pred`` into ``int64`` counts on the
    device and never waits for the device (no ``.item()``, no boolean-mask indexing with a
    data-dependent size; excluded pixels go to extra bins through ``torch.where``), so it can be
    called on every batch of a CUDA evaluation loop; metrics are read once at the end.
    (``torch.bincount`` is avoided: on CUDA it reads the input's maximum back to size its output.)

    Excluded pixels (they are counted apart, not in :attr:`matrix`):

    * ``target == ignore_index``: counted in :attr:`num_ignored`.
    * any other ``target`` outside ``[0, num_classes)``, or a ``pred`` outside that range: counted
      in :attr:`num_invalid`. Raising on them would need a host sync on every batch; check
      ``num_invalid`` once after the loop if such labels are possible.

    ``device`` is where the counts live; ``None`` means the device of the first ``update``'s
    tensors. Inputs on another device are copied to it.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        # C*C cells, then one bin for ignored pixels and one for invalid labels/predictions.
        super().__init__(num_classes * num_classes + 2, device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` are integer label maps of the same shape (any)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex():
                raise ValueError(f"{name} must hold integer class indices, got dtype {tensor.dtype} "
                                 f"(take the argmax of the logits first)")
        self._follow(pred)
        num_classes = self.num_classes
        pred = pred.reshape(-1).to(self.device, torch.int64, non_blocking=True)
        target = target.reshape(-1).to(self.device, torch.int64, non_blocking=True)
        ignored = target == self.ignore_index
        valid = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes) & ~ignored
        cells = num_classes * num_classes
        excluded = torch.where(ignored, cells, cells + 1)
        index = torch.where(valid, target * num_classes + pred, excluded)
        ones = torch.ones((), dtype=torch.int64, device=self.device).expand_as(index)
        self._counts.scatter_add_(0, index, ones)

    @property
    def matrix(self) -> torch.Tensor:
        """``int64 [C, C]`` counts (a copy, on the device): rows are true classes, columns predictions."""
        cells = self.num_classes * self.num_classes
        return self._counts[:cells].view(self.num_classes, self.num_classes).clone()

    @property
    def num_ignored(self) -> torch.Tensor:
        """0-d ``int64`` tensor: pixels whose target was ``ignore_index``."""
        return self._counts[-2].clone()

    @property
    def num_invalid(self) -> torch.Tensor:
        """0-d ``int64`` tensor: pixels excluded for a target or prediction outside ``[0, C)``."""
        return self._counts[-1].clone()

    def _layout(self) -> Dict[str, int]:
        return {"num_classes": self.num_classes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, device={self.device})"
