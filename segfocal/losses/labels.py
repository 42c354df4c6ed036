"""Bookkeeping shared by the loss implementations: which pixels count, the histogram over ranks,
and the mean's denominator."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def ignore_index_fits(ignore_index: int, dtype: torch.dtype) -> bool:
    """Whether ``ignore_index`` is a value integer ``dtype`` can hold (otherwise no label is ignored)."""
    info = torch.iinfo(dtype)
    return info.min <= ignore_index <= info.max


def not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target != ignore_index``, all true where ``ignore_index`` does not fit ``target``'s dtype.

    (A plain comparison casts the index to the dtype: ``uint8 != -100`` would treat 156 as ignored.)
    """
    if not target.is_floating_point() and target.dtype != torch.bool \
            and not ignore_index_fits(ignore_index, target.dtype):
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def sum_over_ranks(counts: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``counts`` summed over the default process group (a copy), and the world size.

    Returns ``counts`` itself and 1 when no process group with more than one rank is active.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts, 1
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total, dist.get_world_size()


def mean_denominator(
    counts: torch.Tensor, pixel_factor: Optional[torch.Tensor], normalize: str, world_size: int
) -> torch.Tensor:
    """The mean's denominator from the class histogram: the number of pixels, or the sum of
    their weights; divided by the world size when the histogram was summed over ranks. It is 0
    when no pixel counts (then the loss's numerator is 0 as well)."""
    if normalize == "weights" and pixel_factor is not None:
        denominator = (pixel_factor.to(counts.dtype) * counts).sum()
    else:
        denominator = counts.sum()
    return denominator / world_size


def per_class_factor(class_weight: Optional[torch.Tensor], alpha: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The factor ``w * a`` that weighs each class's pixels (either may be absent; ``None`` if both are)."""
    if class_weight is None:
        return alpha
    return class_weight if alpha is None else class_weight * alpha
