"""A small PNG of the training curves in the run directory, for readers without TensorBoard at hand.

Drawn from ``metrics.jsonl`` (one object per epoch, or per validation when the run counts steps; see
:class:`~segfocal.engine.run_logger.RunLogger`): left the train loss, right the validation mIoU,
class-average accuracy and per-class IoU (in %), with a star at the best by the checkpoint metric.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import class_names as default_class_names
from ..files import replaced_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = Union[str, Path]

FIGSIZE = (8.0, 3.0)  # inches; at DPI, 800 x 300 pixels
DPI = 100
MAX_CLASSES = 12  # a thin IoU line for every class up to this many classes...
RAREST = 6  # ...beyond it, for the rarest present classes only
SUMMARY = {"miou": ("mIoU", "black", "-"), "mean_accuracy": ("class-avg acc", "tab:gray", "--")}  # label, colour, style
LEGEND_CHARS = 16  # longer class names are cut, so that the legend leaves room for the panels


def curve_series(entries: Iterable[Mapping[str, Any]], metric: str = "miou", unit: str = "epoch") -> Dict[str, Any]:
    """The series :func:`curves_figure` draws, in ``unit`` order (see :func:`latest_history`); null becomes NaN.

    Keys: ``<unit>`` (``epoch`` or ``step``), ``train_loss``; over the validated entries ``val_<unit>``,
    ``miou``, ``mean_accuracy``, ``metric``'s own values (under its name) and ``iou`` (one list per
    class); ``support``: the last validation's pixels per class.
    """
    history = latest_history(entries, unit)
    vals = [entry["val"] for entry in history if entry.get("val")]
    series = {
        unit: [entry[unit] for entry in history],
        "train_loss": [_number(entry.get("train_loss")) for entry in history],
        f"val_{unit}": [entry[unit] for entry in history if entry.get("val")],
        "iou": [[_number(val["iou"][index]) for val in vals] for index in range(len(vals[-1]["iou"]) if vals else 0)],
        "support": list(vals[-1].get("support", [])) if vals else [],
    }
    for key in dict.fromkeys((*SUMMARY, metric)):
        series[key] = [_number(val.get(key)) for val in vals]
    return series


def latest_history(entries: Iterable[Mapping[str, Any]], unit: str = "epoch") -> List[Mapping[str, Any]]:
    """The entries of the latest run, in ``unit`` order: an entry replaces every earlier one of its epoch
    (step) or later (a resumed run logging it again, a new run appending to an old ``metrics.jsonl``)."""
    history: List[Mapping[str, Any]] = []
    for entry in entries:
        while history and history[-1][unit] >= entry[unit]:
            history.pop()
        history.append(entry)
    return history


def best_point(series: Mapping[str, Any], metric: str = "miou", unit: str = "epoch") -> Optional[Tuple[int, float]]:
    """``(epoch or step, value)`` of the highest ``metric`` (the first such, as the trainer picks ``best.pt``),
    or None before any validation with a value."""
    points = [(value, -at) for at, value in zip(series[f"val_{unit}"], series[metric]) if not math.isnan(value)]
    if not points:
        return None
    value, negative_epoch = max(points)
    return -negative_epoch, value


def shown_classes(support: Sequence[int], num_classes: int) -> List[int]:
    """Classes that get an IoU line: all up to ``MAX_CLASSES``, else the ``RAREST`` present classes with
    the fewest pixels (where mIoU hides collapses, and what a focal loss is for)."""
    if num_classes <= MAX_CLASSES:
        return list(range(num_classes))
    present = sorted((pixels, index) for index, pixels in enumerate(support) if pixels > 0)
    return sorted(index for _, index in present[:RAREST])


def curves_figure(entries: Iterable[Mapping[str, Any]], class_names: Optional[Sequence[str]] = None,
                  metric: str = "miou", unit: str = "epoch") -> Optional["Figure"]:
    """The two-panel figure of ``entries`` (Agg canvas, no pyplot state); None when there are none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = curve_series(entries, metric, unit)
    if not series[unit]:
        return None
    num_classes = len(series["iou"])  # 0 before the first validation: any names will do
    names = default_class_names(class_names, num_classes)
    if num_classes and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    loss_axes, val_axes = figure.subplots(1, 2, sharex=True)
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    margin = 0.5 if unit == "epoch" else 0.02 * max(1, series[unit][-1] - series[unit][0])
    loss_axes.set_xlim(series[unit][0] - margin, series[unit][-1] + margin)
    loss_axes.plot(series[unit], series["train_loss"], color="tab:blue", marker=".", label="train loss")
    loss_axes.set(title="Train loss", xlabel=unit)
    _draw_validation(val_axes, series, names, metric, unit)
    for axes in (loss_axes, val_axes):
        axes.title.set_fontsize(9)
        axes.tick_params(labelsize=7)
        axes.xaxis.label.set_fontsize(8)
        axes.grid(alpha=0.3)
    figure.tight_layout(pad=0.4)
    return figure


def plot_curves(entries: Iterable[Mapping[str, Any]], path: PathLike, class_names: Optional[Sequence[str]] = None,
                metric: str = "miou", unit: str = "epoch") -> Optional[Path]:
    """Save :func:`curves_figure` as a PNG at ``path``, replaced atomically; returns the path, or None
    (nothing written) when there are no entries."""
    figure = curves_figure(entries, class_names, metric, unit)
    if figure is None:
        return None
    path = Path(path)
    with replaced_atomically(path) as handle:
        _save_palette_png(figure, handle)
    return path


def plot_curves_file(jsonl_path: PathLike, png_path: PathLike, class_names: Optional[Sequence[str]] = None,
                     metric: str = "miou", unit: str = "epoch") -> Optional[Path]:
    """:func:`plot_curves` of a ``metrics.jsonl``; see :func:`read_entries`."""
    return plot_curves(read_entries(jsonl_path), png_path, class_names, metric, unit)


def read_entries(jsonl_path: PathLike) -> List[Dict[str, Any]]:
    """The objects of a JSON-lines file, skipping blank lines and lines that are not JSON (a line cut
    short by a crash, continued by the resumed run)."""
    entries = []
    for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _draw_validation(axes: Any, series: Mapping[str, Any], names: Sequence[str], metric: str, unit: str) -> None:
    """Summary curves (thick), per-class IoU (thin), the best point's star and a legend beside the panel."""
    from matplotlib import colormaps

    epochs = series[f"val_{unit}"]
    for key in dict.fromkeys((*SUMMARY, metric)):
        label, color, style = SUMMARY.get(key, (key, "tab:purple", "-"))
        axes.plot(epochs, _percent(series[key]), linewidth=1.8, marker=".", zorder=3, label=label, color=color,
                  linestyle=style)
    best = best_point(series, metric, unit)
    if best is not None:
        axes.plot([best[0]], [100 * best[1]], linestyle="none", marker="*", markersize=10, color="gold",
                  markeredgecolor="black", zorder=4, label=f"best {metric} {100 * best[1]:.1f} ({'ep' if unit == 'epoch' else 'step'} {best[0]})")
    colors = colormaps["tab20"]
    shown = shown_classes(series["support"], len(series["iou"]))
    for index in shown:
        axes.plot(epochs, _percent(series["iou"][index]), linewidth=0.8, marker=".", markersize=2, alpha=0.7,
                  color=colors(index % 20), label=str(names[index])[:LEGEND_CHARS])
    if not epochs:
        axes.text(0.5, 0.5, "no validation yet", transform=axes.transAxes, ha="center", va="center", color="gray")
    rarest = f", IoU of the {len(shown)} rarest classes" if len(shown) < len(series["iou"]) else ""
    axes.set(title=f"Validation (%){rarest}", xlabel=unit, ylim=(0, 100))
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _save_palette_png(figure: Any, handle: BinaryIO) -> None:
    """The figure as a 256-colour PNG: a third of the size of Agg's RGBA one (which passes 100 KB for
    long noisy runs), with no visible loss on flat-coloured lines and text."""
    import numpy
    from PIL import Image

    figure.canvas.draw()
    image = Image.fromarray(numpy.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    image.quantize(256).save(handle, format="png")


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _percent(values: Sequence[float]) -> List[float]:
    return [100 * value for value in values]
