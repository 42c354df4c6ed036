"""Segmentation metrics (IoU, accuracy, Dice, ...) from a confusion matrix, in float64."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch


def segmentation_metrics(matrix: Any) -> Dict[str, Any]:
    """Per-class and summary metrics of a ``[C, C]`` confusion matrix (rows true, columns predicted).

    With ``TP = M[c, c]``, ``FN = row sum - TP``, ``FP = column sum - TP``, in float64:

    ========================  ==========================================================
    ``iou`` (list)            ``TP / (TP + FP + FN)``
    ``accuracy`` (list)       ``TP / (TP + FN)`` (recall of the class)
    ``dice`` (list)           ``2 TP / (2 TP + FP + FN)`` (F1)
    ``support`` (list)        ground-truth pixels of the class (row sum, an int)
    ``miou``                  mean of ``iou`` over present classes
    ``mean_accuracy``         mean of ``accuracy`` over present classes (class-average accuracy)
    ``mean_dice``             mean of ``dice`` over present classes
    ``pixel_accuracy``        ``trace / sum`` (overall pixel accuracy)
    ``fwiou``                 ``sum_c (support_c / total) * iou_c`` (frequency-weighted IoU)
    ``num_pixels``            counted pixels (an int)
    ========================  ==========================================================

    A class absent from the ground truth (row sum 0) gets NaN IoU, accuracy and Dice, even when
    some pixels were predicted as it: there is nothing of it to segment, and those false
    positives already lower the IoU of the classes the pixels truly belong to (as their false
    negatives). NaN classes are left out of the means (a NaN mean means no class was present).

    Values are plain Python floats, ints and lists (JSON-ready; NaN stays ``float('nan')``).
    """
    m = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square [C, C], got shape {tuple(m.shape)}")
    tp = m.diagonal()
    support = m.sum(dim=1)
    predicted = m.sum(dim=0)
    fn = support - tp
    fp = predicted - tp
    present = support > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(present, tp / (tp + fp + fn), nan)
    accuracy = torch.where(present, tp / support, nan)
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn), nan)
    total = m.sum()
    frequency = support / total
    fwiou = (frequency[present] * iou[present]).sum() if total > 0 else nan
    return {
        "iou": iou.tolist(),
        "accuracy": accuracy.tolist(),
        "dice": dice.tolist(),
        "support": [int(value) for value in support.tolist()],
        "miou": iou.nanmean().item(),
        "mean_accuracy": accuracy.nanmean().item(),
        "mean_dice": dice.nanmean().item(),
        "pixel_accuracy": (tp.sum() / total).item(),
        "fwiou": float(fwiou),
        "num_pixels": int(total.item()),
    }


def metric_value(metrics: Dict[str, Any], name: str, class_names: Sequence[str]) -> float:
    """The metric ``name`` of :func:`segmentation_metrics`' result: a summary (``"miou"``) or one
    class's ``iou``/``accuracy``/``dice`` as ``"iou.<class name>"``; NaN where it is undefined."""
    kind, _, class_name = name.partition(".")
    value = metrics[kind][list(class_names).index(class_name)] if class_name else metrics[name]
    return math.nan if value is None else float(value)
