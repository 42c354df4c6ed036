"""The command-line tools on one tiny trained model: eval, predict and dataset_stats against numbers
computed independently here (mask pixels, confusion matrices, logits, class weights), and their
user-error exits.

The tools are called in-process through their ``main(argv)``: importing torch, smp and
albumentations costs ~10 s per subprocess on a shared CPU. An exception a tool fails to turn into
its exit 2 therefore fails the test with the exception itself. ``--help`` of each tool runs as a
real subprocess, for the scripts' entry points (test_train.py runs eval.py end to end too).
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segfocal.config import load_config
from segfocal.engine.trainer import Trainer

from recipes import REPO, load_tool, run_tool, tiny_recipe

NUM_CLASSES = 6
IGNORE = 255
NUM_TEST = 5  # differs from the 8 val images, so a report of the wrong split shows


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


TOOLS = {name: load_tool(name) for name in ("eval", "predict", "dataset_stats")}
TOOLS["benchmark_train"] = load_tool("benchmark_train", "benchmarks")


def call(capsys, tool, *argv):
    """Run ``tools/<tool>.py`` in-process; returns (exit code, stdout, stderr)."""
    return run_tool(capsys, TOOLS[tool], *argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    config = tiny_recipe(root, train__epochs=2, train__log_images=0, data__synthetic__num_test=NUM_TEST)
    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: fastest on one thread, and the CPU is shared
    try:
        Trainer(cfg, progress=False).fit()
        yield SimpleNamespace(root=root, config=config, cfg=cfg, data=Path(cfg.data.root),
                              best=Path(cfg.work_dir) / "best.pt")
    finally:
        torch.set_num_threads(threads)


def read_masks(data_root, split):
    paths = sorted((data_root / split / "masks").glob("*.png"))
    assert paths, f"no masks in {data_root / split / 'masks'}"
    return [np.array(Image.open(path)) for path in paths]


def labelled_pixels(data_root, split):
    return sum(int((mask != IGNORE).sum()) for mask in read_masks(data_root, split))


def class_counts(data_root, split):
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for mask in read_masks(data_root, split):
        values = mask[mask != IGNORE].astype(np.int64)
        assert values.size == 0 or values.max() < NUM_CLASSES
        counts += np.bincount(values, minlength=NUM_CLASSES)
    return counts


def evaluate_tool(capsys, trained, out, *extra, checkpoint=None):
    code, stdout, stderr = call(capsys, "eval", "--config", trained.config, "--checkpoint",
                                checkpoint or trained.best, "--out", out, *extra)
    assert code == 0, stderr
    return json.loads((Path(out) / "metrics.json").read_text()), stdout


def iou_from_confusion(matrix):
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    present = matrix.sum(axis=1) > 0
    iou = np.where(present, tp / np.where(union > 0, union, 1), np.nan)
    return iou, float(np.nanmean(iou))


def reference_confusion(trained, split, **inference):
    """The confusion matrix of ``best.pt`` on ``split``, computed here without the eval tool.

    The split goes through the model as one batch, as eval.batch_size=8 makes the tool do.
    """
    from segfocal.data import build_dataset
    from segfocal.engine.restore import restore_model
    from segfocal.evaluation import predict_logits

    cfg = trained.cfg
    dataset = build_dataset(cfg.data, cfg.augment.val, split)
    assert len(dataset) <= cfg.eval.batch_size
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])
    targets = np.stack(read_masks(trained.data, split)).astype(np.int64)
    model = restore_model(cfg, trained.best, torch.device("cpu"))
    with torch.no_grad():
        if inference:
            logits = predict_logits(model, images, NUM_CLASSES, **inference)
        else:
            logits = model(images)
    predictions = logits.argmax(dim=1).numpy()
    keep = targets != IGNORE
    pairs = targets[keep] * NUM_CLASSES + predictions[keep]
    return np.bincount(pairs, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def assert_same_predictions(matrix, expected):
    """Equal up to a handful of pixels whose top two logits tie within float rounding."""
    matrix = np.asarray(matrix)
    assert matrix.sum() == expected.sum()
    np.testing.assert_array_equal(matrix.sum(axis=1), expected.sum(axis=1))  # same ground truth
    moved = np.abs(matrix - expected).sum() // 2  # each pixel predicted differently moves one count
    assert moved <= max(2, expected.sum() // 2000), (matrix, expected)


# -- tools/eval.py ---------------------------------------------------------------------------------

def test_eval_confusion_matrix_counts_every_labelled_pixel_and_gives_the_reported_iou(capsys, trained, tmp_path):
    report, stdout = evaluate_tool(capsys, trained, tmp_path / "eval", "--split", "val")
    matrix = np.array(report["confusion_matrix"])
    metrics = report["metrics"]
    assert report["split"] == "val" and report["num_images"] == 8
    assert report["class_names"] == trained.cfg.data.class_names
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES)

    labelled = labelled_pixels(trained.data, "val")
    assert labelled < 8 * 32 * 32  # the synthetic masks do have ignored pixels to leave out
    assert matrix.sum() == labelled == metrics["num_pixels"]
    assert matrix.sum(axis=1).tolist() == metrics["support"] == class_counts(trained.data, "val").tolist()

    iou, miou = iou_from_confusion(matrix)
    assert metrics["miou"] == pytest.approx(miou, abs=1e-12)
    for reported, expected in zip(metrics["iou"], iou):
        assert (reported is None and np.isnan(expected)) or reported == pytest.approx(expected, abs=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-12)

    # the matrix is the model's: the same as predicting the split here
    np.testing.assert_array_equal(matrix, reference_confusion(trained, "val"))
    # the best checkpoint was chosen on this very split's mIoU
    best = torch.load(trained.best, map_location="cpu", weights_only=True)
    assert metrics["miou"] == pytest.approx(best["state"]["best_metric"], abs=1e-9)

    assert f"{100 * miou:.2f}" in stdout and "background" in stdout  # the printed table
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_eval_of_the_test_split(capsys, trained, tmp_path):
    images = sorted((trained.data / "test" / "images").iterdir())
    assert len(images) == NUM_TEST
    for extra, out in ((["--split", "test"], "explicit"), ([], "default")):  # data.test_split is the default
        report, stdout = evaluate_tool(capsys, trained, tmp_path / out, *extra)
        assert report["split"] == "test" and report["num_images"] == NUM_TEST
        assert np.sum(report["confusion_matrix"]) == labelled_pixels(trained.data, "test")
        assert f"{NUM_TEST} images of split 'test'" in stdout


def test_eval_slide_mode_uses_the_configured_windows(capsys, trained, tmp_path):
    report, _ = evaluate_tool(capsys, trained, tmp_path / "slide", "--split", "val", "--mode", "slide",
                              "--set", "eval.crop_size=[16,16]", "--set", "eval.stride=[8,8]")
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == labelled_pixels(trained.data, "val")
    expected = reference_confusion(trained, "val", mode="slide", crop_size=(16, 16), stride=(8, 8))
    assert_same_predictions(matrix, expected)
    _, miou = iou_from_confusion(matrix)
    assert report["metrics"]["miou"] == pytest.approx(miou, abs=1e-12)


def test_eval_flip_averages_with_the_mirrored_image(capsys, trained, tmp_path):
    report, _ = evaluate_tool(capsys, trained, tmp_path / "flip", "--split", "val", "--flip")
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == labelled_pixels(trained.data, "val")
    assert_same_predictions(matrix, reference_confusion(trained, "val", flip=True))


def test_eval_auroc_is_written_and_printed(capsys, trained, tmp_path):
    report, stdout = evaluate_tool(capsys, trained, tmp_path / "auroc", "--split", "val", "--auroc")
    auroc = report["auroc"]
    assert len(auroc) == NUM_CLASSES
    assert all(value is None or 0.0 <= value <= 1.0 for value in auroc)
    support = report["metrics"]["support"]
    for value, count in zip(auroc, support):  # defined exactly where a class has pixels (and others too)
        assert (value is None) == (count == 0)
    line = next(line for line in stdout.splitlines() if line.startswith("AUROC: "))
    for name, value in zip(report["class_names"], auroc):
        assert f"{name} {'nan' if value is None else f'{value:.4f}'}" in line
    # a trained model ranks the background's pixels better than chance
    assert auroc[0] > 0.5


def test_eval_of_a_bare_state_dict_matches_the_trainer_checkpoint(capsys, trained, tmp_path):
    bare = tmp_path / "weights.pt"
    torch.save(torch.load(trained.best, map_location="cpu", weights_only=True)["model"], bare)
    from_checkpoint, _ = evaluate_tool(capsys, trained, tmp_path / "checkpoint", "--split", "val")
    code, _, stderr = call(capsys, "eval", "--config", trained.config, "--checkpoint", bare, "--split", "val")
    assert code == 0, stderr
    from_bare = json.loads((tmp_path / "eval_val" / "metrics.json").read_text())  # default --out: beside it
    assert from_bare["metrics"] == from_checkpoint["metrics"]
    assert from_bare["confusion_matrix"] == from_checkpoint["confusion_matrix"]
    assert from_bare["checkpoint"] == str(bare)


@pytest.mark.parametrize("overrides", [
    ["model.encoder_name=resnet34"],  # more blocks: missing keys
    ["model.kwargs.decoder_channels=[16,16,8]"],  # other shapes
    # another class count (synthetic=null: the config's data are used as they are, not regenerated)
    ["data.num_classes=7", "data.class_names=[a,b,c,d,e,f,g]", "data.synthetic=null"],
], ids=["encoder", "decoder", "classes"])
def test_eval_of_a_checkpoint_that_does_not_fit_the_config_exits_2(capsys, trained, tmp_path, overrides):
    sets = [arg for override in overrides for arg in ("--set", override)]
    code, stdout, stderr = call(capsys, "eval", "--config", trained.config, "--checkpoint", trained.best,
                                "--out", tmp_path, *sets)
    assert code == 2
    message = stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert str(trained.best) in message and "does not fit" in message
    assert not (tmp_path / "metrics.json").exists()


def test_eval_with_a_missing_checkpoint_exits_2_naming_it(capsys, trained, tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    code, _, stderr = call(capsys, "eval", "--config", trained.config, "--checkpoint", missing)
    assert code == 2
    assert stderr.strip() == f"error: checkpoint not found: {missing}"


# -- tools/predict.py ------------------------------------------------------------------------------

def random_image(rng, width, height):
    """A smooth-ish RGB image (blocks of colour plus noise), so the model predicts more than one class."""
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-20, 21, size=image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def new_images(tmp_path, trained):
    """Images of sizes that are not multiples of 32 (PNG, JPEG, a grey PNG, a validation image), and a non-image."""
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(random_image(rng, 37, 53)).save(folder / "odd.png")
    Image.fromarray(random_image(rng, 64, 48)).save(folder / "wide.png")
    Image.fromarray(random_image(rng, 45, 29)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(random_image(rng, 33, 31)[..., 0]).save(folder / "grey.PNG")
    val_image = sorted((trained.data / "val" / "images").iterdir())[0]
    (folder / "scene.png").write_bytes(val_image.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_prediction(trained, rgb):
    """Argmax of the model's logits for an (H, W, 3) uint8 image, computed here."""
    from segfocal.engine.restore import restore_model

    data = trained.cfg.data
    normalised = (rgb.astype(np.float32) / 255.0 - np.float32(data.mean)) / np.float32(data.std)
    image = torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0).float()
    model = restore_model(trained.cfg, trained.best, torch.device("cpu"))
    with torch.no_grad():
        logits = model(image)  # smp's Unet takes any size; its output matches the input's
    assert logits.shape == (1, NUM_CLASSES, *rgb.shape[:2])
    return logits.argmax(dim=1)[0].numpy()


def test_predict_writes_a_mask_and_an_overlay_of_each_image_size(capsys, trained, new_images, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                                "--input", new_images, "--output", out)
    assert code == 0, stderr
    sizes = {"odd": (37, 53), "wide": (64, 48), "photo": (45, 29), "grey": (33, 31), "scene": (32, 32)}
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{stem}.png" for stem in sizes] + ["overlays"])
    assert sorted(path.name for path in (out / "overlays").iterdir()) == sorted(f"{stem}.png" for stem in sizes)
    assert f"wrote {len(sizes)} masks" in stdout
    for stem, size in sizes.items():
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "P" and mask.size == size
            values = np.array(mask)
        assert values.min() >= 0 and values.max() < NUM_CLASSES
        with Image.open(out / "overlays" / f"{stem}.png") as overlay:  # the image above a legend
            assert overlay.width >= size[0] and overlay.height > size[1] and overlay.mode == "RGB"

    for stem in ("odd", "scene"):  # equals the model's argmax, at the input's own size
        rgb = np.array(Image.open(new_images / f"{stem}.png").convert("RGB"))
        expected = expected_prediction(trained, rgb)
        predicted = np.array(Image.open(out / f"{stem}.png"))
        assert (predicted != expected).sum() <= 2, stem  # at most a float-rounding tie or two
    # on a training-like image the trained model finds more than the background
    assert len(np.unique(np.array(Image.open(out / "scene.png")))) > 1


def test_predict_on_a_single_file(capsys, trained, new_images, tmp_path):
    out = tmp_path / "single"
    code, stdout, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                                "--input", new_images / "photo.jpg", "--output", out)
    assert code == 0, stderr
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*")) == ["overlays", "overlays/photo.png", "photo.png"]
    with Image.open(out / "photo.png") as mask:
        assert mask.mode == "P" and mask.size == (45, 29)
        predicted = np.array(mask)
    rgb = np.array(Image.open(new_images / "photo.jpg").convert("RGB"))
    assert (predicted != expected_prediction(trained, rgb)).sum() <= 2
    assert "wrote 1 mask to" in stdout


def test_predict_on_a_folder_without_images_exits_2_naming_it(capsys, trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    code, _, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                           "--input", empty, "--output", tmp_path / "out")
    assert code == 2
    assert stderr.startswith("error: ") and str(empty) in stderr and stderr.strip().count("\n") == 0

    missing = tmp_path / "missing"
    code, _, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                           "--input", missing, "--output", tmp_path / "out")
    assert code == 2 and str(missing) in stderr


def _png_bytes(width, height):
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _decompression_bomb_png(width=20000, height=20000):
    """A valid PNG header of more pixels than PIL opens (2 x Image.MAX_IMAGE_PIXELS), with no pixel data."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("content", [
    lambda: b"this is not a PNG",
    lambda: _png_bytes(40, 30)[:200],  # truncated in its pixel data
    lambda: b"",
    _decompression_bomb_png,  # an image too large for PIL: DecompressionBombError, not an OSError
], ids=["garbage", "truncated", "empty", "too-large"])
def test_predict_on_a_corrupt_image_exits_2_naming_it(capsys, trained, new_images, tmp_path, content):
    bad = new_images / "zz_bad.png"  # after the good ones
    bad.write_bytes(content())
    for source in (bad, new_images):
        code, _, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                               "--input", source, "--output", tmp_path / "out")
        assert code == 2, stderr
        message = stderr.strip()
        assert message.startswith(f"error: cannot read image {bad}") and "\n" not in message


def test_predict_refuses_two_inputs_that_would_write_the_same_mask(capsys, trained, new_images, tmp_path):
    Image.fromarray(random_image(np.random.default_rng(2), 40, 40)).save(new_images / "odd.jpg")
    out = tmp_path / "out"
    code, _, stderr = call(capsys, "predict", "--config", trained.config, "--checkpoint", trained.best,
                           "--input", new_images, "--output", out)
    assert code == 2
    assert str(new_images / "odd.png") in stderr and str(new_images / "odd.jpg") in stderr
    assert not out.exists() or not any(out.iterdir())


# -- tools/dataset_stats.py ------------------------------------------------------------------------

def printed_counts(stdout, names):
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()}
    return [int(rows[name][1]) for name in names], {name: rows[name] for name in names}


def test_dataset_stats_counts_the_training_masks(capsys, trained):
    from segfocal.losses import WEIGHT_SCHEMES, weights_from_histogram

    code, stdout, stderr = call(capsys, "dataset_stats", "--config", trained.config)
    assert code == 0, stderr
    names = trained.cfg.data.class_names
    counts, rows = printed_counts(stdout, names)
    expected = class_counts(trained.data, "train")
    assert counts == expected.tolist()
    assert expected.min() > 0  # every class occurs, so every weight below is defined
    assert f"split 'train': 16 images, {expected.sum()} labelled pixels" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("class "))
    assert header.split() == ["class", "pixels", "share", *WEIGHT_SCHEMES]  # a column per scheme, names apart
    for column, scheme in enumerate(WEIGHT_SCHEMES, start=3):
        weights = weights_from_histogram(torch.from_numpy(expected), scheme, dtype=torch.float64)
        for index, name in enumerate(names):
            assert float(rows[name][2]) == pytest.approx(expected[index] / expected.sum(), abs=1e-4)
            assert float(rows[name][column]) == pytest.approx(float(weights[index]), abs=1e-4), (scheme, name)

    code, stdout, _ = call(capsys, "dataset_stats", "--config", trained.config, "--split", "val")
    assert code == 0
    assert printed_counts(stdout, names)[0] == class_counts(trained.data, "val").tolist()


@pytest.mark.parametrize("scheme", ["enet", "median"])
def test_dataset_stats_writes_weights_that_a_config_can_use(capsys, trained, tmp_path, scheme):
    from segfocal.losses import weights_from_histogram

    fragment = tmp_path / f"weights_{scheme}.yaml"  # its _base_ names tiny.yaml relative to this folder
    argv = ["--config", trained.config, "--output", fragment] + ([] if scheme == "enet" else ["--scheme", scheme])
    code, stdout, stderr = call(capsys, "dataset_stats", *argv)
    assert code == 0, stderr
    assert f"wrote {fragment}" in stdout
    weights = yaml.safe_load(fragment.read_text())["loss"]["weight"]
    expected = weights_from_histogram(torch.from_numpy(class_counts(trained.data, "train")), scheme,
                                      dtype=torch.float64).tolist()
    assert len(weights) == NUM_CLASSES and all(isinstance(w, float) for w in weights)
    assert weights == pytest.approx(expected, abs=1e-6)
    if scheme == "median":
        assert sorted(weights)[2] <= 1.0 <= sorted(weights)[3]  # median class(es) around 1, rare ones above

    cfg = load_config(fragment)  # the recipe it measured, with the weights and mean/std
    assert cfg.loss.weight == weights
    assert cfg.data.num_classes == NUM_CLASSES and cfg.work_dir == trained.cfg.work_dir  # the rest is the recipe's

    from segfocal.engine.criterion import build_criterion

    criterion = build_criterion(cfg.loss, NUM_CLASSES, IGNORE)  # the loss takes them as fixed weights
    assert criterion.weight_scheme is None
    torch.testing.assert_close(criterion.weight, torch.tensor(weights, dtype=torch.float32), rtol=0, atol=0)


def test_dataset_stats_unknown_scheme_exits_2(capsys, trained, tmp_path):
    code, _, stderr = call(capsys, "dataset_stats", "--config", trained.config, "--scheme", "sqrt",
                           "--output", tmp_path / "w.yaml")
    assert code == 2
    assert stderr.startswith("error: --scheme") and "'sqrt'" in stderr and "median" in stderr
    assert not (tmp_path / "w.yaml").exists()


# -- benchmark_train -------------------------------------------------------------------------------

def test_benchmark_train_times_every_loss_on_the_same_model(capsys):
    code, out, _ = call(capsys, "benchmark_train", "--size", "32", "32", "--batch", "2", "--classes", "4",
                        "--steps", "2", "--rounds", "1", "--layout", "nchw")
    assert code == 0
    rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()[2:]}
    assert set(rows) == {"segfocal FocalLoss (batch ENet)", "smp FocalLoss", "F.cross_entropy",
                         "F.cross_entropy (batch ENet)"}
    assert rows["segfocal FocalLoss (batch ENet)"][1] == "1.00"
    for images_per_second, _, last_loss in rows.values():
        assert float(images_per_second) > 0 and 0 < float(last_loss) < 100


# -- every tool's --help ---------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["tools/train", "tools/eval", "tools/predict", "tools/dataset_stats",
                                  "benchmarks/benchmark_loss", "benchmarks/benchmark_train", "benchmarks/loss_ablation"])
def test_help_of_every_tool(tool):
    result = run_script(f"{tool}.py", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "--help" in result.stdout


# -- the segfocal command: configs from checkpoints, scoring mask folders --------------------------

def test_eval_and_predict_without_config_use_the_one_saved_in_the_checkpoint(capsys, trained, new_images, tmp_path):
    from segfocal.cli import main as segfocal_main

    with_config, _ = evaluate_tool(capsys, trained, tmp_path / "with")
    code, _, stderr = run_tool(capsys, SimpleNamespace(main=segfocal_main), "eval", "--checkpoint", trained.best,
                               "--output", tmp_path / "without", "--set", f"data.root={trained.data}")
    assert code in (0, None), stderr
    without = json.loads((tmp_path / "without" / "metrics.json").read_text())
    assert without["confusion_matrix"] == with_config["confusion_matrix"] and without["split"] == "test"
    for folder, extra in (("by_config", ["--config", trained.config]), ("by_checkpoint", [])):
        code, _, stderr = call(capsys, "predict", "--checkpoint", trained.best, "--input", new_images,
                               "--output", tmp_path / folder, *extra)
        assert code == 0, stderr
    for mask in (tmp_path / "by_config").glob("*.png"):
        assert mask.read_bytes() == (tmp_path / "by_checkpoint" / mask.name).read_bytes()


def test_eval_scores_a_folder_of_predicted_masks_like_the_checkpoint_evaluation(capsys, trained, new_images, tmp_path):
    """Masks written by predict for the test images, scored against the test labels: the checkpoint's metrics."""
    images, labels = trained.data / "test" / "images", trained.data / "test" / "masks"
    code, _, stderr = call(capsys, "predict", "--checkpoint", trained.best, "--input", images,
                           "--output", tmp_path / "pred")
    assert code == 0, stderr
    checkpoint, _ = evaluate_tool(capsys, trained, tmp_path / "checkpoint")
    # predict's output folder as it is: the overlays are in a subfolder, out of the way
    code, stdout, stderr = call(capsys, "eval", "--pred", tmp_path / "pred", "--gt", labels, "--num-classes",
                                NUM_CLASSES, "--ignore-index", IGNORE, "--out", tmp_path / "scored")
    assert code == 0, stderr
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert scored["confusion_matrix"] == checkpoint["confusion_matrix"]
    assert scored["metrics"]["miou"] == pytest.approx(checkpoint["metrics"]["miou"], abs=1e-12)
    assert f"{NUM_TEST} mask pairs" in stdout and "class_0" in stdout
    # with the config, its class names label the table
    code, stdout, _ = call(capsys, "eval", "--pred", tmp_path / "pred", "--gt", labels, "--config",
                           trained.config, "--output", tmp_path / "named")
    assert code == 0 and "background" in stdout


@pytest.mark.parametrize("argv, message", [
    ([], "give either --checkpoint (evaluate a model) or --pred and --gt (score masks)"),
    (["--pred", "p", "--gt", "g"], "--pred needs --num-classes"),
    (["--pred", "p"], "--pred needs --gt"),
], ids=["neither", "no-classes", "no-gt"])
def test_eval_says_which_arguments_are_missing(capsys, argv, message):
    code, _, stderr = call(capsys, "eval", *argv)
    assert code == 2 and message in stderr


def test_eval_predict_and_export_read_the_checkpoint_once(capsys, trained, new_images, tmp_path, monkeypatch):
    """A checkpoint with its optimiser state may be hundreds of MB: its config and weights come from one read."""
    reads = []
    load = torch.load

    def counted(file, *args, **kwargs):
        reads.append(str(file))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    from segfocal.cli import eval as eval_command, export as export_command, predict as predict_command

    modules = {"eval": eval_command, "predict": predict_command, "export": export_command}
    commands = [("eval", "--checkpoint", trained.best, "--split", "val", "--output", tmp_path / "eval"),
                ("predict", "--checkpoint", trained.best, "--input", new_images / "photo.jpg", "--output", tmp_path / "p"),
                ("export", "--checkpoint", trained.best, "--format", "smp", "--output", tmp_path / "smp",
                 "--size", "32", "32")]
    for tool, *argv in commands:
        reads.clear()
        code, _, stderr = run_tool(capsys, modules[tool], *argv)
        assert code == 0, stderr
        assert len(reads) == 1, (tool, reads)


# -- eval: the split, and where it writes -----------------------------------------------------------


@pytest.fixture
def without_test_split(trained, tmp_path):
    """A copy of the trained run's data with train and val splits only, and its --set."""
    import shutil

    root = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(trained.data / split, root / split)
    return root, ["--set", f"data.root={root}", "--set", "data.synthetic=null"]


def test_eval_of_a_dataset_without_a_test_split_scores_val_with_a_note(capsys, trained, without_test_split, tmp_path):
    root, sets = without_test_split
    code, stdout, stderr = call(capsys, "eval", "--checkpoint", trained.best, *sets, "--output", tmp_path / "out")
    assert code == 0, stderr
    assert stderr.splitlines()[0] == (f"note: {root} has no 'test' split; evaluating split 'val' (--split chooses "
                                      f"another)")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["split"] == "val" and report["num_images"] == 8
    assert np.sum(report["confusion_matrix"]) == labelled_pixels(root, "val")
    assert "8 images of split 'val'" in stdout


@pytest.mark.parametrize("output", ["val/masks", "val/images/report", "file"])
def test_eval_of_a_checkpoint_writes_nowhere_among_the_split_files(capsys, trained, without_test_split, output):
    root, sets = without_test_split
    (root / "file").write_text("mine")
    before = {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    checkpoint = trained.best if output != "file" else root / "missing.pt"  # a file: refused before reading it
    code, _, stderr = call(capsys, "eval", "--checkpoint", checkpoint, *sets, "--split", "val",
                           "--output", root / output)
    message = stderr.strip()
    assert code == 2 and "\n" not in message and message.startswith(f"error: --output {root / output} ")
    assert ("is not a folder" if output == "file" else f"is the split's {output.split('/')[1][:-1]} folder") in message
    assert {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()} == before
