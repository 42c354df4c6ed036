"""Human- and machine-readable outputs of an evaluation: a text table, a JSON file, a confusion-matrix PNG."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..text import counted
from .metrics import segmentation_metrics

PathLike = Union[str, "os.PathLike[str]"]

_SUMMARY = (("mIoU", "miou"), ("Class-avg acc", "mean_accuracy"), ("Pixel acc", "pixel_accuracy"),
            ("Mean Dice", "mean_dice"), ("fwIoU", "fwiou"))


def format_table(metrics: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU / accuracy / Dice (in %) and pixel support, then summary rows; NaN shows as ``n/a``.

    ``metrics`` is what :func:`~segfocal.evaluation.segmentation_metrics` returns.
    """
    names = [str(name) for name in class_names]
    if len(names) != len(metrics["iou"]):
        raise ValueError(f"{len(names)} class names for {len(metrics['iou'])} classes")
    support = metrics.get("support", [None] * len(names))
    width = max([len(name) for name in names] + [len(label) for label, _ in _SUMMARY] + [5])
    header = f"{'Class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'Dice':>7}  {'Pixels':>12}"
    lines = [header, "-" * len(header)]
    for index, name in enumerate(names):
        pixels = "" if support[index] is None else str(support[index])
        lines.append(f"{name:<{width}}  {_percent(metrics['iou'][index]):>7}  {_percent(metrics['accuracy'][index]):>7}"
                     f"  {_percent(metrics['dice'][index]):>7}  {pixels:>12}")
    lines.append("-" * len(header))
    for label, key in _SUMMARY:
        if key in metrics:
            lines.append(f"{label:<{width}}  {_percent(metrics[key]):>7}")
    return "\n".join(lines)


def write_json(metrics: Mapping[str, Any], path: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``{"metrics": metrics, **extra}`` to ``path`` as strict JSON; returns the path.

    NaN and infinities become ``null`` (JSON has no NaN); tensors and NumPy values become lists
    and numbers. The file is written to a temporary name and renamed, so it is never half written.
    """
    extra = dict(extra or {})
    if "metrics" in extra:
        raise ValueError("extra must not contain the key 'metrics'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable({"metrics": dict(metrics), **extra}), indent=2, allow_nan=False)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def plot_confusion_matrix(matrix: Any, class_names: Sequence[str], path: PathLike,
                          normalize: Optional[str] = "true", title: Optional[str] = None) -> Path:
    """Save the confusion matrix (rows true, columns predicted) as a PNG heat map; returns the path.

    ``normalize``: ``"true"`` divides each row by its sum (each true class's distribution of
    predictions; the diagonal is the class accuracy), ``"pred"`` each column, ``"all"`` by the
    total, ``None`` keeps counts. Empty rows/columns stay 0. Cells are annotated when there are
    at most 20 classes. Drawn with matplotlib's Agg canvas, without pyplot's global state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("plot_confusion_matrix needs matplotlib: pip install matplotlib") from None
    counts = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    num_classes = counts.shape[0]
    if counts.ndim != 2 or counts.shape[1] != num_classes:
        raise ValueError(f"matrix must be square [C, C], got shape {tuple(counts.shape)}")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if normalize not in ("true", "pred", "all", None):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}")
    if normalize == "true":
        values = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    elif normalize == "pred":
        values = counts / counts.sum(dim=0, keepdim=True).clamp(min=1)
    elif normalize == "all":
        values = counts / counts.sum().clamp(min=1)
    else:
        values = counts
    values = values.numpy()

    side = min(max(4.0, 0.45 * num_classes + 2.5), 30.0)
    figure = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    font = 10 if num_classes <= 20 else max(4, 10 - num_classes // 20)
    ticks = list(range(num_classes))
    axes.set_xticks(ticks, [str(name) for name in class_names], rotation=45, ha="right", fontsize=font)
    axes.set_yticks(ticks, [str(name) for name in class_names], fontsize=font)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    suffix = {"true": " (each row sums to 1)", "pred": " (each column sums to 1)", "all": " (fraction of pixels)",
              None: " (pixels)"}[normalize]
    axes.set_title(title or "Confusion matrix" + suffix)
    if num_classes <= 20:
        threshold = (1.0 if normalize else max(float(values.max()), 1.0)) / 2
        for row in range(num_classes):
            for column in range(num_classes):
                value = values[row, column]
                axes.text(column, row, f"{value:.2f}" if normalize else f"{int(value)}", ha="center", va="center",
                          fontsize=max(5, font - 2), color="white" if value > threshold else "black")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # torch / NumPy tensors and scalars
        return _jsonable(value.tolist())
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def format_calibration(calibration: Any, class_names: Sequence[str]) -> str:
    """A :class:`~segfocal.evaluation.calibration.Calibration` as text: the bias per class, then per-class IoU,
    mIoU and class-average accuracy (in %) of the raw decision, the calibrated one on the pixels it was
    fitted on, and the cross-fitted one (each fold scored with the bias fitted on the others)."""
    names = [str(name) for name in class_names]
    rows = [("raw", calibration.confusion_before), ("calibrated (in-sample)", calibration.confusion_after)]
    if calibration.confusion_cross_fitted is not None:
        rows.append((f"calibrated ({calibration.folds}-fold cross-fitted)", calibration.confusion_cross_fitted))
    width = max(len(label) for label, _ in rows)
    columns = [max(6, len(name)) for name in names]
    lines = [f"Calibration for {calibration.metric} on split '{calibration.split}' ({counted(calibration.num_images, 'image')})",
             "bias: " + ", ".join(f"{name} {value:+.2f}" for name, value in zip(names, calibration.bias)),
             f"{'IoU %':<{width}}  " + "  ".join(f"{name:>{size}}" for name, size in zip(names, columns))
             + "    mIoU  class-acc"]
    for label, matrix in rows:
        metrics = segmentation_metrics(torch.tensor(matrix))
        cells = "  ".join(f"{_percent(value):>{size}}" for value, size in zip(metrics["iou"], columns))
        lines.append(f"{label:<{width}}  {cells}  {_percent(metrics['miou']):>6}  {_percent(metrics['mean_accuracy']):>9}")
    return "\n".join(lines)
