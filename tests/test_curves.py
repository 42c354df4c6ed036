"""The run directory's training-curves PNG (segfocal.engine.curves), from hand-built metrics.jsonl entries."""
from __future__ import annotations

import json
import math
import os

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from segfocal.engine.curves import (DPI, FIGSIZE, RAREST, best_point, curve_series, curves_figure, latest_history,
                                    plot_curves, plot_curves_file, read_entries, shown_classes)

NAN = math.nan
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def _val(miou, accuracy, iou, support=(100, 10)):
    return {"miou": miou, "mean_accuracy": accuracy, "pixel_accuracy": 0.9, "iou": list(iou), "support": list(support)}


# a resumed run: epochs 3-4 were logged, the run went back to epoch 2's checkpoint and logged 3-4 again
ENTRIES = [
    {"epoch": 1, "step": 10, "train_loss": 2.0, "epoch_seconds": 1.0},
    {"epoch": 2, "step": 20, "train_loss": None, "epoch_seconds": 1.0, "val": _val(0.2, 0.3, [0.3, 0.1])},
    {"epoch": 3, "step": 30, "train_loss": 9.0, "epoch_seconds": 1.0},
    {"epoch": 4, "step": 40, "train_loss": 9.0, "epoch_seconds": 1.0, "val": _val(0.9, 0.9, [0.9, 0.9])},
    {"epoch": 3, "step": 30, "train_loss": 1.0, "epoch_seconds": 1.0},
    {"epoch": 4, "step": 40, "train_loss": 0.5, "epoch_seconds": 1.0, "val": _val(None, 0.4, [0.5, None])},
    {"epoch": 5, "step": 50, "train_loss": 0.4, "epoch_seconds": 1.0, "val": _val(0.4, 0.5, [0.6, 0.2])},
]
SERIES = {  # ENTRIES by hand: the second epochs 3-4 win, null is NaN
    "epoch": [1, 2, 3, 4, 5],
    "train_loss": [2.0, NAN, 1.0, 0.5, 0.4],
    "val_epoch": [2, 4, 5],
    "miou": [0.2, NAN, 0.4],
    "mean_accuracy": [0.3, 0.4, 0.5],
    "iou": [[0.3, 0.5, 0.6], [0.1, NAN, 0.2]],
    "support": [100, 10],
}


def _same(actual, expected):
    """Equal, NaN equal to NaN, through nested lists and dicts."""
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_same(actual[key], expected[key]) for key in expected)
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return actual == pytest.approx(expected)


def _lines(axes):
    """``{label: (xs, ys)}`` of the lines drawn on ``axes``."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def _percent(values):
    return [100 * value for value in values]


def test_series_resolve_nulls_and_repeated_epochs():
    assert _same(curve_series(ENTRIES), SERIES)


def test_series_of_another_metric_are_added_under_its_name():
    assert _same(curve_series(ENTRIES, "pixel_accuracy")["pixel_accuracy"], [0.9, 0.9, 0.9])


def test_an_entry_replaces_its_epoch_and_every_later_one():
    """A new run appending to an old run's log: the old run's later epochs are not its history."""
    epochs = [1, 2, 3, 4, 1, 2, 2]
    history = latest_history([{"epoch": epoch, "order": order} for order, epoch in enumerate(epochs)])
    assert [(entry["epoch"], entry["order"]) for entry in history] == [(1, 4), (2, 6)]


def test_best_point_is_the_first_highest_and_skips_nan():
    series = {"val_epoch": [1, 2, 3, 4], "miou": [0.5, NAN, 0.7, 0.7]}
    assert best_point(series) == (3, 0.7)
    assert best_point({"val_epoch": [1], "miou": [NAN]}) is None
    assert best_point(curve_series(ENTRIES[:1])) is None


def test_every_class_up_to_twelve_then_the_rarest_present_ones():
    assert shown_classes([5] * 12, 12) == list(range(12))
    support = [100 + index for index in range(14)]
    support[0], support[13], support[7] = 0, 1, 2  # class 0 is absent from the val split: no line
    assert shown_classes(support, 14) == [1, 2, 3, 4, 7, 13]


def test_figure_draws_the_series():
    figure = curves_figure(ENTRIES, class_names=["sky", "cat"])
    loss_axes, val_axes = figure.axes
    assert _same(_lines(loss_axes)["train loss"], (SERIES["epoch"], SERIES["train_loss"]))
    lines = _lines(val_axes)
    assert _same(lines["mIoU"], (SERIES["val_epoch"], _percent(SERIES["miou"])))
    assert _same(lines["class-avg acc"], (SERIES["val_epoch"], _percent(SERIES["mean_accuracy"])))
    assert _same(lines["sky"], (SERIES["val_epoch"], _percent(SERIES["iou"][0])))
    assert _same(lines["cat"], (SERIES["val_epoch"], _percent(SERIES["iou"][1])))
    assert _same(lines["best miou 40.0 (ep 5)"], ([5], [40.0]))
    assert [text.get_text() for text in val_axes.get_legend().get_texts()] == [
        "mIoU", "class-avg acc", "best miou 40.0 (ep 5)", "sky", "cat"]


def test_figure_of_another_metric_draws_it_with_its_best_epoch():
    lines = _lines(curves_figure(ENTRIES, metric="mean_accuracy").axes[1])
    assert "best mean_accuracy 50.0 (ep 5)" in lines
    lines = _lines(curves_figure(ENTRIES, metric="pixel_accuracy").axes[1])
    assert _same(lines["pixel_accuracy"], (SERIES["val_epoch"], [90.0] * 3))
    assert "best pixel_accuracy 90.0 (ep 2)" in lines


def test_a_run_counted_in_steps_is_drawn_against_steps():
    # entries of a train.iters run: one per validation, several within one epoch, a resumed one redone
    entries = [{"epoch": 0, "step": 5, "train_loss": 2.0, "val": _val(0.1, 0.2, [0.1, 0.1])},
               {"epoch": 0, "step": 10, "train_loss": 9.0, "val": _val(0.9, 0.9, [0.9, 0.9])},
               {"epoch": 0, "step": 10, "train_loss": 1.0, "val": _val(0.3, 0.4, [0.2, 0.4])},
               {"epoch": 1, "step": 15, "train_loss": 0.5, "val": _val(0.2, 0.5, [0.3, 0.1])}]
    series = curve_series(entries, unit="step")
    assert series["step"] == series["val_step"] == [5, 10, 15] and series["train_loss"] == [2.0, 1.0, 0.5]
    loss_axes, val_axes = curves_figure(entries, unit="step").axes
    assert loss_axes.get_xlabel() == val_axes.get_xlabel() == "step"
    assert _same(_lines(val_axes)["best miou 30.0 (step 10)"], ([10], [30.0]))


def test_many_classes_draw_only_the_rarest():
    num_classes = 19
    entry = {"epoch": 1, "train_loss": 1.0,
             "val": _val(0.5, 0.5, [0.5] * num_classes, support=[1000 - index for index in range(num_classes)])}
    val_axes = curves_figure([entry]).axes[1]
    rarest = [f"class_{index}" for index in range(num_classes - RAREST, num_classes)]
    assert [label for label in _lines(val_axes) if label.startswith("class_")] == rarest
    assert f"{RAREST} rarest" in val_axes.get_title()


def test_no_validation_yet_draws_the_loss_alone(tmp_path):
    figure = curves_figure(ENTRIES[:1])
    assert _same(_lines(figure.axes[0])["train loss"], ([1], [2.0]))
    assert all(xs == [] for xs, _ in _lines(figure.axes[1]).values())
    assert [text.get_text() for text in figure.axes[1].texts] == ["no validation yet"]
    assert plot_curves(ENTRIES[:1], tmp_path / "curves.png") == tmp_path / "curves.png"


def test_class_names_must_match_the_classes():
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        curves_figure(ENTRIES, class_names=["a", "b", "c"])


@pytest.mark.parametrize("entries", [ENTRIES, ENTRIES[:1], ENTRIES[1:2]], ids=["resumed", "loss-only", "one-point"])
def test_png_is_small_and_of_the_figure_size(tmp_path, entries):
    path = plot_curves(entries, tmp_path / "curves.png", class_names=["sky", "cat"])
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", SIZE)
        image.verify()
    assert path.stat().st_size < 100_000
    assert os.listdir(tmp_path) == ["curves.png"]
    assert plt.get_fignums() == []


def test_a_long_noisy_run_of_twelve_classes_stays_small(tmp_path):
    num_classes, wobble = 12, [0.1, 0.9, 0.4, 0.7, 0.2]
    entries = [{"epoch": epoch, "train_loss": wobble[epoch % 5],
                "val": _val(0.5, wobble[epoch % 3], [wobble[(epoch + index) % 5] for index in range(num_classes)],
                            support=[1] * num_classes)} for epoch in range(1, 301)]
    names = [f"a rather long class name {index}" for index in range(num_classes)]
    assert plot_curves(entries, tmp_path / "curves.png", names).stat().st_size < 100_000


def test_no_entries_write_nothing(tmp_path):
    assert curves_figure([]) is None
    assert plot_curves([], tmp_path / "curves.png") is None
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    assert plot_curves_file(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_an_existing_png_is_replaced_not_rewritten(tmp_path):
    """A reader holding the old file open keeps reading the old file whole; no temporary is left."""
    path = tmp_path / "curves.png"
    path.write_bytes(b"old picture")
    with open(path, "rb") as reader:
        plot_curves(ENTRIES, path)
        assert reader.read() == b"old picture"
    with Image.open(path) as image:
        assert image.size == SIZE
    assert os.listdir(tmp_path) == ["curves.png"]


def test_file_of_a_run_cut_short_then_resumed(tmp_path):
    """The line being written when the run died runs into the resumed run's first line: both are skipped."""
    lines = [json.dumps(entry) for entry in ENTRIES[:4]]
    cut = json.dumps(ENTRIES[4])[:12] + json.dumps(ENTRIES[4])
    text = "\n".join(lines + [cut, "", json.dumps(ENTRIES[5]), json.dumps(ENTRIES[6])]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    entries = read_entries(tmp_path / "metrics.jsonl")
    assert entries == ENTRIES[:4] + ENTRIES[5:]
    expected = dict(SERIES, train_loss=[2.0, NAN, 9.0, 0.5, 0.4])  # epoch 3 of the first run: its redo was lost
    assert _same(curve_series(entries), expected)
    png = plot_curves_file(tmp_path / "metrics.jsonl", tmp_path / "curves.png", class_names=["sky", "cat"])
    assert png == tmp_path / "curves.png" and png.is_file()
