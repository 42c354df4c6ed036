"""Reports: strict JSON with NaN as null, the text table, the confusion-matrix PNG, and the import
of segfocal.evaluation staying free of matplotlib."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from segfocal.evaluation import format_table, plot_confusion_matrix, segmentation_metrics, write_json

# class 3 ("bus") is absent from the ground truth; see test_eval_metrics for the hand computation
MATRIX = torch.tensor([[3, 1, 0, 0], [0, 5, 1, 0], [0, 0, 2, 1], [0, 0, 0, 0]])
NAMES = ["road", "car", "person", "bus"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_loads(text: str):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_write_json_is_strict_json_with_nan_as_null(tmp_path):
    metrics = segmentation_metrics(MATRIX)
    path = write_json(metrics, tmp_path / "sub" / "metrics.json",
                      extra={"confusion_matrix": MATRIX, "auroc": [0.5, float("nan"), float("inf")],
                             "checkpoint": tmp_path / "best.pt", "num_images": np.int64(7)})
    data = _strict_loads(path.read_text(encoding="utf-8"))
    assert data["metrics"]["iou"][3] is None and data["metrics"]["dice"][3] is None
    assert data["metrics"]["iou"][1] == pytest.approx(5 / 7)
    assert data["metrics"]["miou"] == pytest.approx((3 / 4 + 5 / 7 + 2 / 4) / 3)
    assert data["confusion_matrix"] == MATRIX.tolist()
    assert data["auroc"] == [0.5, None, None]
    assert data["checkpoint"] == str(tmp_path / "best.pt") and data["num_images"] == 7
    assert not list((tmp_path / "sub").glob("*.tmp"))  # the temporary file was renamed
    assert math.isnan(metrics["iou"][3])  # the caller's dict is untouched


def test_write_json_rejects_a_clashing_key_and_unknown_objects(tmp_path):
    with pytest.raises(ValueError, match="metrics"):
        write_json({}, tmp_path / "m.json", extra={"metrics": 1})
    with pytest.raises(TypeError, match="object"):
        write_json({"x": object()}, tmp_path / "m.json")


def test_format_table_lists_classes_values_and_summaries():
    table = format_table(segmentation_metrics(MATRIX), NAMES)
    lines = table.splitlines()
    for name in NAMES:
        assert any(line.startswith(name) for line in lines), name
    bus = next(line for line in lines if line.startswith("bus"))
    assert bus.split()[1:4] == ["n/a", "n/a", "n/a"]
    car = next(line for line in lines if line.startswith("car"))
    assert car.split()[1:] == [f"{100 * 5 / 7:.2f}", f"{100 * 5 / 6:.2f}", f"{100 * 10 / 12:.2f}", "6"]
    miou = next(line for line in lines if line.startswith("mIoU"))
    assert miou.split()[-1] == f"{100 * (3 / 4 + 5 / 7 + 2 / 4) / 3:.2f}"
    assert any(line.startswith("Pixel acc") and line.endswith(f"{100 * 10 / 13:.2f}") for line in lines)
    assert any(line.startswith("Class-avg acc") for line in lines)
    assert any(line.startswith("Mean Dice") for line in lines)
    with pytest.raises(ValueError, match="class names"):
        format_table(segmentation_metrics(MATRIX), NAMES[:3])


def test_format_table_with_every_class_absent_shows_na():
    table = format_table(segmentation_metrics(torch.zeros(2, 2, dtype=torch.long)), ["a", "b"])
    assert next(line for line in table.splitlines() if line.startswith("mIoU")).split()[-1] == "n/a"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), len(data)


@pytest.mark.parametrize("normalize", ["true", None])
def test_plot_confusion_matrix_writes_a_png(tmp_path, normalize):
    path = plot_confusion_matrix(MATRIX, NAMES, tmp_path / "plots" / "cm.png", normalize=normalize)
    width, height, size = _png_size(path)
    assert width >= 300 and height >= 300
    assert size > 10_000  # axes, labels, colour bar and annotations, not an empty canvas
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def test_plot_confusion_matrix_many_classes_without_annotations(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 100, size=(25, 25))
    width, height, size = _png_size(plot_confusion_matrix(matrix, [f"c{i}" for i in range(25)], tmp_path / "cm.png"))
    assert width > 1000 and size > 10_000


def test_plot_confusion_matrix_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(MATRIX, NAMES[:2], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="normalize"):
        plot_confusion_matrix(MATRIX, NAMES, tmp_path / "cm.png", normalize="rows")


def test_importing_evaluation_does_not_import_matplotlib():
    probe = "import sys, segfocal.evaluation; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
