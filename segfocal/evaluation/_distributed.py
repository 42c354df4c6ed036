"""Sum a state tensor over ranks; kept here so ``segfocal.evaluation`` needs torch alone."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over the default process group when one is initialised; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
