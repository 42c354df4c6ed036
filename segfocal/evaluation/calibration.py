"""Per-class decision calibration: a bias per class added to the logits before the argmax, fitted on a
labelled split to maximise one metric, and its honest (cross-fitted) estimate.

A class-balanced loss moves every decision towards the rare classes, and the common classes pay
with false positives. Shifting class ``c``'s logit by ``b_c`` moves the decision back where the
metric is best (logit adjustment, as in long-tailed classification: Menon et al., ICLR 2021).

**The fit** is coordinate ascent over the classes, every step the exact optimum of the metric over
one class's bias on a grid of :data:`GRID_STEP` logits in ``[-GRID_LIMIT, GRID_LIMIT]``. A step is
one pass over the pixels, no re-argmax per candidate: with the other biases fixed, pixel ``i`` is
predicted ``c`` exactly when ``b_c > d_i``, its margin to its best other class ``o_i``, so one
histogram of (grid cell of ``d_i``, true class, ``o_i``) gives the confusion matrix at every
candidate by a cumulative sum. Sweeps repeat until one gains nothing. The first class is stepped
too (raising it is lowering all the others at once, a move single steps of the others cannot make:
without it the fit stalls where the first class is predicted too rarely), and the biases are
shifted to ``b_0 = 0`` at the end: only differences matter. A class with no pixel in the split is
not fitted: it moves with the first class, so it keeps its raw decision against it.

**The estimate**: fitting on the pixels it scores flatters the fit. The images, in the split's
order, are cut into ``folds`` contiguous blocks; each block is scored with the bias fitted on the
others, and the held-out confusion matrices are summed: the cross-fitted metric. Blocks, not every
other image: neighbouring images are often frames of one video or tiles of one slide, and an
image's neighbour in the fitting set would flatter the estimate almost as much as itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..config.schema import check_metric_name
from .metrics import metric_tensors, metric_value, segmentation_metrics

GRID_STEP = 0.02  # logits between two candidate biases
GRID_LIMIT = 8.0  # the largest |bias| tried: a prior ratio of e^8 ~ 3000 between two classes
MAX_SWEEPS = 10
MIN_PIXELS = 100  # a class with fewer pixels in the split is fitted to noise: warned


@dataclass
class PixelSet:
    """The counted (not ignored) pixels of a split, image by image: ``[n, C]`` logits and ``[n]`` labels."""

    images: List[Tuple[torch.Tensor, torch.Tensor]]
    num_classes: int

    @classmethod
    def gather(cls, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
               ignore_index: int) -> "PixelSet":
        """From ``(logits [B, C, H, W], target [B, H, W])`` batches: each image's counted pixels,
        on the CPU (the logits as they come, float32 or float64)."""
        images = []
        for logits, target in batches:
            for scores, labels in zip(logits.detach().cpu(), target.cpu()):
                counted = labels != ignore_index
                images.append((scores.permute(1, 2, 0)[counted].contiguous(), labels[counted].long()))
        return cls(images, num_classes)

    def subset(self, indices: Sequence[int]) -> "PixelSet":
        return PixelSet([self.images[index] for index in indices], self.num_classes)

    def support(self) -> torch.Tensor:
        return sum((torch.bincount(labels, minlength=self.num_classes) for _, labels in self.images),
                   torch.zeros(self.num_classes, dtype=torch.long))

    def confusion(self, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[C, C]`` counts (rows true, columns predicted) of the argmax of the logits plus ``bias``."""
        num_classes, matrix = self.num_classes, torch.zeros(self.num_classes ** 2, dtype=torch.long)
        for logits, labels in self.images:
            scores = logits if bias is None else logits + bias.to(logits.dtype)
            matrix += torch.bincount(labels * num_classes + scores.argmax(1), minlength=num_classes ** 2)
        return matrix.view(num_classes, num_classes)


@dataclass
class Calibration:
    """A fitted calibration: the bias per class, the metric it maximises, the split it was fitted on,
    and that metric before (raw argmax), after (in-sample) and cross-fitted over ``folds`` folds of
    images (``None`` when the split has fewer images than folds), with the three confusion matrices
    (rows true, columns predicted) that every other metric of the split can be read from."""

    bias: List[float]
    metric: str
    split: str
    before: float
    after: float
    cross_fitted: Optional[float]
    folds: int
    num_images: int
    confusion_before: List[List[int]]
    confusion_after: List[List[int]]
    confusion_cross_fitted: Optional[List[List[int]]]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Any, num_classes: int, source: str) -> "Calibration":
        """A stored calibration, checked against the model's class count; ``ValueError`` naming ``source``."""
        try:
            calibration = cls(**saved)
            bias = [float(value) for value in calibration.bias]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: its calibration is not one segfocal wrote ({error}); calibrate again "
                             f"or pass --no-calibration") from None
        if len(bias) != num_classes:
            raise ValueError(f"{source}: its calibration has {len(bias)} biases for a model of {num_classes} classes; "
                             f"calibrate again or pass --no-calibration")
        wrong = [f"{index}: {value}" for index, value in enumerate(bias) if not math.isfinite(value)]
        if wrong:
            raise ValueError(f"{source}: its calibration has non-finite biases (class {', '.join(wrong)}); calibrate "
                             f"again or pass --no-calibration")
        calibration.bias = bias
        return calibration

    def tensor(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(self.bias, device=device, dtype=dtype)


def calibrate(pixels: PixelSet, metric: str, class_names: Sequence[str], split: str, folds: int = 2) -> Calibration:
    """Fit the bias maximising ``metric`` on all of ``pixels``, and estimate it by cross-fitting.

    ``metric`` is a name of :func:`~segfocal.evaluation.metrics.metric_value` (``miou``,
    ``mean_accuracy``, ``iou.<class>``, ...). Warns, naming the class, for a class with fewer than
    :data:`MIN_PIXELS` pixels in the split, and when the split has fewer images than ``folds``.
    """
    check_request(metric, folds, class_names)
    support = pixels.support() if pixels.images else None
    if support is None or int(support.sum()) == 0:
        raise ValueError(f"split '{split}' has no counted pixel to calibrate on")
    for name, count in zip(class_names, support.tolist()):
        if count == 0:
            warnings.warn(f"calibration: class {name} has no pixel in split '{split}': its bias is not fitted (it "
                          f"keeps its raw decision against class {class_names[0]})", RuntimeWarning, stacklevel=2)
        elif count < MIN_PIXELS:
            warnings.warn(f"calibration: class {name} has {count} pixels in split '{split}' (fewer than {MIN_PIXELS}): "
                          f"its bias is fitted to little evidence", RuntimeWarning, stacklevel=2)
    bias = fit_bias(pixels, metric, class_names)
    held_out = None
    if len(pixels.images) < folds:
        warnings.warn(f"calibration: split '{split}' has {len(pixels.images)} image(s), fewer than the {folds} folds: "
                      f"no cross-fitted estimate (the in-sample one flatters the fit)", RuntimeWarning, stacklevel=2)
    else:
        held_out = torch.zeros(pixels.num_classes, pixels.num_classes, dtype=torch.long)
        for scored in fold_blocks(len(pixels.images), folds):
            fitted_on = [index for index in range(len(pixels.images)) if index not in scored]
            held_out += pixels.subset(scored).confusion(fit_bias(pixels.subset(fitted_on), metric, class_names))
    before, after = pixels.confusion(), pixels.confusion(bias)
    return Calibration(bias=bias.tolist(), metric=metric, split=split, before=score(before, metric, class_names),
                       after=score(after, metric, class_names),
                       cross_fitted=None if held_out is None else score(held_out, metric, class_names),
                       folds=folds, num_images=len(pixels.images), confusion_before=before.tolist(),
                       confusion_after=after.tolist(),
                       confusion_cross_fitted=None if held_out is None else held_out.tolist())


def check_request(metric: str, folds: int, class_names: Sequence[str]) -> None:
    """``ValueError`` naming ``--metric`` or ``--folds`` unless they can be fitted: checked before the
    split's logits are computed, which may take long."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2 (each fold is scored with a bias fitted on the others), "
                         f"got {folds}")
    check_metric_name(metric, class_names, "--metric")


def fold_blocks(count: int, folds: int) -> List[List[int]]:
    """The indices ``0 .. count - 1`` cut into ``folds`` contiguous blocks of (nearly) equal size."""
    bounds = [round(count * fold / folds) for fold in range(folds + 1)]
    return [list(range(bounds[fold], bounds[fold + 1])) for fold in range(folds)]


def fit_bias(pixels: PixelSet, metric: str, class_names: Sequence[str]) -> torch.Tensor:
    """The bias ``[C]`` (``b_0 = 0``) maximising ``metric`` on ``pixels``, by coordinate ascent over
    :func:`grid`; each sweep never lowers the metric."""
    dtype = pixels.images[0][0].dtype
    bias = torch.zeros(pixels.num_classes, dtype=dtype)
    support = pixels.support().tolist()
    absent = [klass for klass in range(1, pixels.num_classes) if support[klass] == 0]
    groups = [[0, *absent]] if support[0] > 0 else []  # the first class, and the absent ones with it
    groups += [[klass] for klass in range(1, pixels.num_classes) if support[klass] > 0]
    best = score(pixels.confusion(bias), metric, class_names)
    for _ in range(MAX_SWEEPS):
        start = best
        for group in groups:
            best, lead_bias = best_step(pixels, bias, group, metric, class_names)
            bias[group] += lead_bias - bias[group[0]]
        if not best > start + 1e-12:
            break
    return bias - bias[0]


def grid(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The candidate biases of one step: ``-GRID_LIMIT, ..., 0, ..., GRID_LIMIT`` every :data:`GRID_STEP`."""
    count = round(GRID_LIMIT / GRID_STEP)
    return torch.arange(-count, count + 1, dtype=torch.float64).mul_(GRID_STEP).to(dtype)


def best_step(pixels: PixelSet, bias: torch.Tensor, group: Sequence[int], metric: str,
              class_names: Sequence[str]) -> Tuple[float, float]:
    """The best value of ``metric`` over the bias of ``group[0]`` on :func:`grid` (the rest of ``group``
    keeping its offsets to it, the other classes fixed), and that bias: the middle of the widest run
    of candidates that reach it."""
    confusions = step_confusions(pixels, bias, group)
    values = metric_value(metric_tensors(confusions), metric, class_names)
    best = values.max()
    if torch.isnan(best):
        return float("nan"), float(bias[group[0]])
    reach = torch.cat([(values == best).to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    starts = torch.nonzero(torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), reach])) == 1).flatten()
    ends = torch.nonzero(torch.diff(reach) == -1).flatten()  # inclusive
    widest = int(torch.argmax(ends - starts))
    return float(best), float(grid(bias.dtype)[(starts[widest] + ends[widest]) // 2])


def step_confusions(pixels: PixelSet, bias: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """``[G, C, C]``: the confusion matrix at each candidate bias of class ``group[0]`` on :func:`grid`,
    the rest of ``group`` moving with it (keeping its offsets to it).

    With the other biases fixed, a pixel is predicted its best class ``g`` of the group exactly when
    ``b > d`` (``d``: its best biased logit outside the group minus its best logit in the group, biased
    relative to ``group[0]``), else its best class ``o`` outside the group. Its first candidate with
    ``b > d`` is ``j = floor((d - low) / step) + 1``; histograms over (``j``, true class, ``o``) and
    (``j``, true class, ``g``) and cumulative sums over ``j`` give every candidate's matrix in one pass.
    """
    num_classes, candidates = pixels.num_classes, grid(bias.dtype)
    count, low = len(candidates), float(candidates[0])
    members = torch.tensor(list(group))
    offsets = bias[members] - bias[members[0]]
    moves_out = torch.zeros((count + 1) * num_classes ** 2, dtype=torch.long)
    moves_in = torch.zeros_like(moves_out)
    for logits, labels in pixels.images:
        best_in, in_index = (logits[:, members] + offsets.to(logits.dtype)).max(1)
        outside = logits + bias.to(logits.dtype)
        outside[:, members] = -math.inf
        best_out, out_class = outside.max(1)
        first = torch.floor((best_out - best_in - low) / GRID_STEP).add_(1).clamp_(0, count).long()
        cells = (first * num_classes + labels) * num_classes
        moves_out += torch.bincount(cells + out_class, minlength=moves_out.numel())
        moves_in += torch.bincount(cells + members[in_index], minlength=moves_in.numel())
    shape = (count + 1, num_classes, num_classes)  # [first candidate, true, predicted]
    moves_out, moves_in = moves_out.view(shape), moves_in.view(shape)
    without = moves_out.sum(0)  # the matrix were the group never predicted: every pixel goes to its best other
    return without.unsqueeze(0) - moves_out[:count].cumsum(0) + moves_in[:count].cumsum(0)


def score(confusion: torch.Tensor, metric: str, class_names: Sequence[str]) -> float:
    """``metric`` of one confusion matrix, through :func:`segmentation_metrics` (NaN where undefined)."""
    return metric_value(segmentation_metrics(confusion), metric, class_names)
