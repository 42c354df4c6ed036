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
    values = metric_tensors(m)
    return {
        **{name: values[name].tolist() for name in ("iou", "accuracy", "dice")},
        "support": [int(value) for value in values["support"].tolist()],
        **{name: values[name].item() for name in ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou")},
        "num_pixels": int(m.sum().item()),
    }


def metric_tensors(matrix: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The metrics of :func:`segmentation_metrics` as float64 tensors, for a ``[..., C, C]`` stack of
    matrices at once (per-class values ``[..., C]``, summaries ``[...]``)."""
    m = matrix.double()
    tp = m.diagonal(dim1=-2, dim2=-1)
    support, predicted = m.sum(-1), m.sum(-2)
    present = support > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    iou = torch.where(present, tp / (support + predicted - tp), nan)
    accuracy = torch.where(present, tp / support, nan)
    dice = torch.where(present, 2 * tp / (support + predicted), nan)
    total = support.sum(-1)
    fwiou = torch.where(total > 0, (support / total.unsqueeze(-1) * torch.where(present, iou, 0.0)).sum(-1), nan)
    return {"iou": iou, "accuracy": accuracy, "dice": dice, "support": support, "miou": iou.nanmean(-1),
            "mean_accuracy": accuracy.nanmean(-1), "mean_dice": dice.nanmean(-1), "pixel_accuracy": tp.sum(-1) / total,
            "fwiou": fwiou}


def metric_value(metrics: Dict[str, Any], name: str, class_names: Sequence[str]) -> Any:
    """The metric ``name`` of :func:`segmentation_metrics`' result (a float, NaN where it is undefined),
    or of :func:`metric_tensors`' (a tensor over its matrices): a summary (``"miou"``) or one class's
    ``iou``/``accuracy``/``dice`` as ``"iou.<class name>"``."""
    kind, _, class_name = name.partition(".")
    if isinstance(metrics[kind], torch.Tensor):
        return metrics[kind][..., list(class_names).index(class_name)] if class_name else metrics[name]
    value = metrics[kind][list(class_names).index(class_name)] if class_name else metrics[name]
    return math.nan if value is None else float(value)
