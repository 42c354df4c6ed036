"""score_mask_folders: predicted vs ground-truth mask folders scored with the checkpoint metrics,
checked against an independent float64 numpy oracle; matching by stem; every file error named."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.data import DataError
from segfocal.evaluation import (format_table, score_mask_folders, segmentation_metrics,
                                 write_mask_folder_report)

C = 4
IGNORE = 255
COLOURS = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]]
PALETTE = [200, 100, 50, 10, 220, 30, 40, 50, 240, 7, 7, 7]  # colours unlike the indices


# -- writing masks ----------------------------------------------------------------------------

def save_l(path: Path, labels: np.ndarray) -> Path:
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    return path


def save_p(path: Path, labels: np.ndarray) -> Path:
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    image.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"
    return path


def save_rgb(path: Path, labels: np.ndarray) -> Path:
    Image.fromarray(np.asarray(COLOURS, dtype=np.uint8)[labels], mode="RGB").save(path)
    return path


def folders(tmp_path: Path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


def random_pair(rng: np.random.Generator, shape, ignore_fraction=0.15):
    gt = rng.integers(0, C - 1, size=shape)  # class 3 never in the ground truth: a NaN class
    gt[rng.random(shape) < ignore_fraction] = IGNORE
    pred = rng.integers(0, C, size=shape)  # ...but it is predicted
    agree = rng.random(shape) < 0.6
    pred[agree & (gt != IGNORE)] = gt[agree & (gt != IGNORE)]
    return pred, gt


# -- the independent oracle -------------------------------------------------------------------

def oracle(pairs, num_classes, ignore_index):
    """Confusion matrix by np.bincount and the metrics in float64, written from their definitions."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in pairs:
        keep = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index
        m += np.bincount(gt[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64),
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    f = m.astype(np.float64)
    tp, support, predicted = np.diag(f), f.sum(1), f.sum(0)
    fp, fn = predicted - tp, support - tp
    iou, acc, dice = [], [], []
    for c in range(num_classes):
        if support[c] == 0:
            iou.append(math.nan), acc.append(math.nan), dice.append(math.nan)
        else:
            iou.append(tp[c] / (tp[c] + fp[c] + fn[c]))
            acc.append(tp[c] / (tp[c] + fn[c]))
            dice.append(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
    present = [c for c in range(num_classes) if support[c] > 0]
    total = f.sum()
    metrics = {
        "iou": iou, "accuracy": acc, "dice": dice, "support": [int(s) for s in support],
        "miou": sum(iou[c] for c in present) / len(present),
        "mean_accuracy": sum(acc[c] for c in present) / len(present),
        "mean_dice": sum(dice[c] for c in present) / len(present),
        "pixel_accuracy": tp.sum() / total,
        "fwiou": sum(support[c] / total * iou[c] for c in present),
        "num_pixels": int(total),
    }
    return m, metrics


def assert_metrics_match(actual, expected):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        got = actual[key]
        values, gots = (value, got) if isinstance(value, list) else ([value], [got])
        assert len(values) == len(gots), key
        for e, a in zip(values, gots):
            if isinstance(e, float) and math.isnan(e):
                assert math.isnan(a), (key, actual[key], value)
            else:
                assert a == pytest.approx(e, rel=1e-12, abs=1e-15), (key, actual[key], value)


# -- metrics ----------------------------------------------------------------------------------

def test_metrics_and_confusion_match_the_float64_oracle_over_l_p_and_rgb_masks(tmp_path):
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = folders(tmp_path)
    pairs = []
    for index, shape in enumerate([(17, 23), (8, 31), (40, 5), (12, 12)]):
        pred, gt = random_pair(rng, shape)
        pairs.append((pred, gt))
        save_l(gt_dir / f"img{index}.png", gt)  # ground truth: 8-bit grey with 255 = ignore
        # predictions in three formats: grey, palette (indices, not colours), RGB via a colour map
        [save_l, save_p, save_rgb, save_p][index](pred_dir / f"img{index}.png", pred)
    result = score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE, pred_color_map=COLOURS)
    matrix, metrics = oracle(pairs, C, IGNORE)
    assert result.confusion.dtype == torch.int64
    np.testing.assert_array_equal(result.confusion.numpy(), matrix)
    assert_metrics_match(result.metrics, metrics)
    assert math.isnan(result.metrics["iou"][3])  # class 3 predicted, never true
    assert result.num_images == 4
    assert result.num_ignored == sum(int((gt == IGNORE).sum()) for _, gt in pairs)
    assert_metrics_match(result.metrics, segmentation_metrics(result.confusion))  # the checkpoint function
    assert result.metrics["num_pixels"] + result.num_ignored == sum(gt.size for _, gt in pairs)


def test_rgb_ground_truth_decoded_with_color_map_and_predictions_default_to_it(tmp_path):
    rng = np.random.default_rng(1)
    pred_dir, gt_dir = folders(tmp_path)
    pred, gt = rng.integers(0, C, (9, 14)), rng.integers(0, C, (9, 14))
    save_rgb(gt_dir / "a.png", gt)
    save_rgb(pred_dir / "a.png", pred)  # pred_color_map=None: color_map is used for predictions too
    result = score_mask_folders(pred_dir, gt_dir, C, color_map=COLOURS)
    matrix, metrics = oracle([(pred, gt)], C, None)
    np.testing.assert_array_equal(result.confusion.numpy(), matrix)
    assert_metrics_match(result.metrics, metrics)
    assert result.num_ignored == 0


def test_identical_folders_score_perfectly(tmp_path):
    rng = np.random.default_rng(2)
    pred_dir, gt_dir = folders(tmp_path)
    for index in range(3):
        gt = rng.integers(0, C, (10, 13))
        gt[0, :3] = IGNORE
        save_l(gt_dir / f"{index}.png", gt)
        save_l(pred_dir / f"{index}.png", gt)  # prediction 255 where the ground truth is 255: not read
    result = score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE)
    for key in ("miou", "mean_accuracy", "mean_dice", "pixel_accuracy", "fwiou"):
        assert result.metrics[key] == 1.0, key
    assert result.confusion.numpy().trace() == result.confusion.numpy().sum() == 3 * (10 * 13 - 3)
    assert result.num_ignored == 9


def test_same_folder_as_prediction_and_ground_truth(tmp_path):
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    save_l(gt_dir / "x.png", np.array([[0, 1], [2, 3]]))
    assert score_mask_folders(gt_dir, gt_dir, C).metrics["miou"] == 1.0


def test_stems_match_across_suffixes(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    gt = np.array([[0, 1, 2], [2, 1, 0]])
    pred = np.array([[0, 1, 1], [2, 1, 0]])
    save_l(gt_dir / "a.png", gt)
    Image.fromarray(pred.astype(np.uint8), mode="L").save(pred_dir / "a.bmp")
    result = score_mask_folders(pred_dir, gt_dir, 3)
    np.testing.assert_array_equal(result.confusion.numpy(), oracle([(pred, gt)], 3, None)[0])
    assert result.num_images == 1


def test_ignored_pixels_are_not_counted_whatever_their_prediction(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    gt = np.array([[0, 0, IGNORE, IGNORE], [1, 1, IGNORE, 1]])
    pred = np.array([[0, 0, 1, IGNORE], [1, 1, 200, 1]])  # wrong class / 255 / out of range, all on ignored pixels
    save_l(gt_dir / "m.png", gt)
    save_l(pred_dir / "m.png", pred)
    result = score_mask_folders(pred_dir, gt_dir, 2, ignore_index=IGNORE)
    assert result.confusion.tolist() == [[2, 0], [0, 3]]
    assert result.metrics["miou"] == 1.0 and result.metrics["num_pixels"] == 5
    assert result.num_ignored == 3


def test_ignore_index_inside_the_class_range_drops_that_class_row(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    gt = np.array([[0, 0, 1, 2], [2, 1, 1, 0]])
    pred = np.array([[0, 1, 1, 2], [0, 1, 2, 0]])
    save_l(gt_dir / "m.png", gt)
    save_l(pred_dir / "m.png", pred)
    result = score_mask_folders(pred_dir, gt_dir, 3, ignore_index=0)
    matrix, metrics = oracle([(pred, gt)], 3, 0)
    np.testing.assert_array_equal(result.confusion.numpy(), matrix)
    assert_metrics_match(result.metrics, metrics)
    assert math.isnan(result.metrics["iou"][0])


# -- errors, each naming the file(s) ----------------------------------------------------------

def test_ground_truth_without_prediction_lists_count_and_first_stems(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    for index in range(8):
        save_l(gt_dir / f"g{index}.png", np.zeros((2, 2)))
    save_l(pred_dir / "g0.png", np.zeros((2, 2)))
    with pytest.raises(DataError) as error:
        score_mask_folders(pred_dir, gt_dir, C)
    message = str(error.value)
    assert "7 ground-truth masks" in message and "g1, g2, g3, g4, g5 and 2 more" in message
    assert str(gt_dir) in message and str(pred_dir) in message
    assert error.value.path == str(gt_dir / "g1.png")


def test_predictions_without_ground_truth_list_count_and_stems(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((2, 2)))
    for stem in ("a", "extra1", "extra2"):
        save_l(pred_dir / f"{stem}.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"2 predictions in .* have no ground truth in .*: extra1, extra2") as error:
        score_mask_folders(pred_dir, gt_dir, C)
    assert error.value.path == str(pred_dir / "extra1.png")


def test_both_kinds_of_unmatched_stems_reported_together(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((2, 2)))
    save_l(pred_dir / "a_pred.png", np.zeros((2, 2)))
    with pytest.raises(DataError) as error:
        score_mask_folders(pred_dir, gt_dir, C)
    message = str(error.value)
    assert "have no prediction" in message and ": a;" in message
    assert "have no ground truth" in message and "a_pred" in message


def test_size_mismatch_names_both_sizes_and_both_paths(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((4, 6)))
    save_l(pred_dir / "a.png", np.zeros((3, 6)))
    with pytest.raises(DataError) as error:
        score_mask_folders(pred_dir, gt_dir, C)
    message = str(error.value)
    assert "6x3" in message and "6x4" in message
    assert str(pred_dir / "a.png") in message and str(gt_dir / "a.png") in message


def test_prediction_out_of_range_names_file_and_values(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((2, 3)))
    save_l(pred_dir / "a.png", np.array([[0, 4, 9], [9, 1, 0]]))
    with pytest.raises(DataError, match=r"3 pixels have predicted values \[4, 9\] outside 0\.\.3") as error:
        score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE)
    assert error.value.path == str(pred_dir / "a.png")
    assert str(pred_dir / "a.png") in str(error.value)


def test_ignore_index_predicted_on_a_scored_pixel_is_an_error_with_a_hint(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.array([[0, 1], [IGNORE, 2]]))
    save_l(pred_dir / "a.png", np.array([[0, IGNORE], [IGNORE, 2]]))  # second 255 is on an ignored pixel: fine
    with pytest.raises(DataError, match=r"1 pixel has predicted values \[255\].*ignore_index=255 is accepted only"):
        score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE)


def test_prediction_255_without_ignore_index_is_an_error(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.array([[0, 1]]))
    save_l(pred_dir / "a.png", np.array([[0, IGNORE]]))
    with pytest.raises(DataError, match=r"predicted values \[255\] outside 0\.\.3"):
        score_mask_folders(pred_dir, gt_dir, C)


def test_ground_truth_value_neither_class_nor_ignore_names_file(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.array([[0, 7], [IGNORE, 1]]))
    save_l(pred_dir / "a.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"label values \[7\] outside 0\.\.3 that are not ignore_index=255") as error:
        score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE)
    assert error.value.path == str(gt_dir / "a.png")


def test_ground_truth_255_without_ignore_index_is_an_error(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.array([[0, IGNORE]]))
    save_l(pred_dir / "a.png", np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"a\.png: 1 pixel has label values \[255\] .*no ignore_index is set; "
                                        r"pass --ignore-index 255 if it marks unlabelled pixels\)"):
        score_mask_folders(pred_dir, gt_dir, C)


@pytest.mark.parametrize("broken", ["pred", "gt"])
def test_unreadable_file_is_named(tmp_path, broken):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((2, 2)))
    save_l(pred_dir / "a.png", np.zeros((2, 2)))
    bad = (pred_dir if broken == "pred" else gt_dir) / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="cannot read mask") as error:
        score_mask_folders(pred_dir, gt_dir, C)
    assert error.value.path == str(bad) and str(bad) in str(error.value)


def test_rgb_prediction_with_unknown_colour_is_named(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    save_l(gt_dir / "a.png", np.zeros((2, 2)))
    rgb = np.asarray(COLOURS, dtype=np.uint8)[np.zeros((2, 2), int)]
    rgb[0, 0] = [1, 2, 3]
    Image.fromarray(rgb, mode="RGB").save(pred_dir / "a.png")
    with pytest.raises(DataError, match=r"\(1, 2, 3\)") as error:
        score_mask_folders(pred_dir, gt_dir, C, pred_color_map=COLOURS)
    assert error.value.path == str(pred_dir / "a.png")


def test_missing_or_empty_folders_and_duplicate_stems(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    with pytest.raises(DataError, match="folder not found: .*nowhere"):
        score_mask_folders(tmp_path / "nowhere", gt_dir, C)
    with pytest.raises(DataError, match="folder not found: .*nowhere"):
        score_mask_folders(pred_dir, tmp_path / "nowhere", C)
    with pytest.raises(DataError, match=r"no ground-truth masks .* found in"):
        score_mask_folders(pred_dir, gt_dir, C)
    save_l(gt_dir / "a.png", np.zeros((2, 2)))
    save_l(pred_dir / "a.png", np.zeros((2, 2)))
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(pred_dir / "a.bmp")
    with pytest.raises(DataError, match="two prediction mask files share the stem 'a'"):
        score_mask_folders(pred_dir, gt_dir, C)


def test_bad_arguments_raise_value_error(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        score_mask_folders(pred_dir, gt_dir, 0)
    with pytest.raises(ValueError, match="ignore_index"):
        score_mask_folders(pred_dir, gt_dir, C, ignore_index="255")


# -- report -----------------------------------------------------------------------------------

def test_report_writes_the_checkpoint_evaluation_files(tmp_path):
    pred_dir, gt_dir = folders(tmp_path)
    gt = np.array([[0, 1, 2, IGNORE], [2, 1, 0, 0]])
    pred = np.array([[0, 1, 1, 3], [2, 1, 0, 3]])
    save_l(gt_dir / "a.png", gt)
    save_p(pred_dir / "a.png", pred)
    result = score_mask_folders(pred_dir, gt_dir, C, ignore_index=IGNORE)
    names = ["road", "car", "sky", "tree"]
    json_path, png_path = write_mask_folder_report(result, tmp_path / "out", names)
    assert json_path == tmp_path / "out" / "metrics.json" and png_path == tmp_path / "out" / "confusion_matrix.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text())
    assert data["confusion_matrix"] == result.confusion.tolist()
    assert data["class_names"] == names and data["num_images"] == 1 and data["num_ignored_pixels"] == 1
    assert data["pred_dir"] == str(pred_dir) and data["gt_dir"] == str(gt_dir) and data["ignore_index"] == IGNORE
    assert data["metrics"]["iou"][3] is None  # NaN → null, as write_json does for checkpoints
    assert data["metrics"]["miou"] == pytest.approx(result.metrics["miou"])
    table = format_table(result.metrics, names)
    assert "road" in table and "mIoU" in table and "n/a" in table
    default = write_mask_folder_report(result, tmp_path / "out2")[0]
    assert json.loads(default.read_text())["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        write_mask_folder_report(result, tmp_path / "out3", names[:3])


def test_eval_with_a_config_remaps_stored_ground_truth_values_as_training_did(tmp_path, capsys):
    """Cityscapes-style labelIds on disk, train ids predicted: data.label_map applies to the ground truth."""
    from recipes import run_tool, tiny_recipe

    from segfocal.cli import eval as eval_command

    pred, gt = folders(tmp_path)
    stored = np.array([[7, 8, 26], [0, 7, 33]])  # road, sidewalk, car, unlabeled, road, bicycle
    save_l(gt / "a.png", stored)
    save_l(pred / "a.png", np.array([[0, 1, 1], [2, 0, 2]]))  # train ids: road 0, sidewalk 1, car 2
    config = tiny_recipe(tmp_path, data__num_classes=3, data__class_names=["road", "sidewalk", "car"],
                         data__label_map={7: 0, 8: 1, 26: 2})
    code, out, err = run_tool(capsys, eval_command, "--pred", pred, "--gt", gt, "--config", config,
                              "--output", tmp_path / "scored")
    assert code == 0, err
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    # unlabeled (0) and bicycle (33) are not in the map: ignored; of the other 4 pixels one is wrong
    assert scored["confusion_matrix"] == [[2, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert scored["num_ignored_pixels"] == 2


# -- segfocal eval --pred/--gt: where it writes, and how many classes -------------------------------

def eval_masks(capsys, *argv):
    from recipes import run_tool

    from segfocal.cli import eval as eval_command

    return run_tool(capsys, eval_command, *argv)


def snapshot(folder: Path):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("output", ["gt", "pred", "gt/report", "link-to-pred", "pred/../gt", "file", "file/report"])
def test_eval_writes_nowhere_among_the_masks_and_never_over_a_file(tmp_path, capsys, output):
    """An --output that is, or lies inside, the --gt or --pred folder (however spelled) would put
    metrics.json and confusion_matrix.png among the masks; a file there cannot be a folder: both are
    one line, exit 2, before anything is read or written."""
    pred, gt = folders(tmp_path)
    labels = np.array([[0, 1], [2, IGNORE]])
    save_l(gt / "a.png", labels)
    save_l(pred / "a.png", np.array([[0, 1], [1, 0]]))
    (tmp_path / "link-to-pred").symlink_to(pred, target_is_directory=True)
    (tmp_path / "file").write_text("a file of mine")
    before = snapshot(tmp_path)
    code, _, err = eval_masks(capsys, "--pred", pred, "--gt", gt, "--num-classes", C, "--output", tmp_path / output)
    message = err.strip()
    assert code == 2 and "\n" not in message and message.startswith(f"error: --output {tmp_path / output}")
    if output.startswith("file"):
        assert message.endswith("is not a folder; give a new or existing folder for the results")
        assert str(tmp_path / "file") in message
    else:
        assert "or inside it; choose an output folder outside it" in message
        assert f"the --{'gt' if 'gt' in output else 'pred'} folder" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("num_classes", [0, 2049, 100_000_000])
def test_eval_bounds_the_number_of_classes_in_one_line(tmp_path, capsys, num_classes):
    pred, gt = folders(tmp_path)
    save_l(gt / "a.png", np.zeros((2, 2)))
    save_l(pred / "a.png", np.zeros((2, 2)))
    code, _, err = eval_masks(capsys, "--pred", pred, "--gt", gt, "--num-classes", num_classes,
                              "--output", tmp_path / "out")
    assert code == 2
    assert err.strip().startswith(f"error: --num-classes must be 1..2048, got {num_classes}")
    assert "\n" not in err.strip() and not (tmp_path / "out").exists()
    assert ("GiB" in err) == (num_classes > 2048)  # the size of the matrix explains only a bound too high
