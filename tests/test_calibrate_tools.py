"""The calibration where decisions are made: `segfocal calibrate` writes it into the checkpoint (the
weights untouched), `eval` scores both decisions, `Segmenter` and `predict` apply it, `export` folds it
into the model so any runtime's argmax is the calibrated decision, and `train.calibrate` fits it."""
import contextlib
import importlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.config import load_config
from segfocal.engine.checkpoint import load_checkpoint, save_checkpoint
from segfocal.engine.trainer import Trainer
from segfocal.segmenter import Segmenter

from recipes import tiny_recipe

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:calibration. class .* pixels in split")]
COMMANDS = {name: importlib.import_module(f"segfocal.cli.{name}") for name in ("calibrate", "eval", "predict", "export")}


def call(tool, *argv):
    """``segfocal <tool>`` in-process: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            COMMANDS[tool].main([str(arg) for arg in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run; its best.pt as trained (``raw``) and with a calibration by `segfocal calibrate`."""
    root = tmp_path_factory.mktemp("calibrate")
    config = tiny_recipe(root, train__epochs=2, train__log_images=0)
    cfg = load_config(config)
    Trainer(cfg, progress=False).fit()
    best = Path(cfg.work_dir) / "best.pt"
    raw = load_checkpoint(best)
    code, out, err = call("calibrate", "--checkpoint", best)
    assert code == 0, err
    images = sorted((Path(cfg.data.root) / "val" / "images").iterdir())
    return SimpleNamespace(root=root, cfg=cfg, best=best, raw=raw, out=out, images=images,
                           stored=load_checkpoint(best)["calibration"])


def test_calibrate_stores_the_fit_in_the_checkpoint_and_leaves_everything_else_as_it_was(run):
    after = load_checkpoint(run.best)
    assert set(after) == set(run.raw) | {"calibration"}
    for key, value in run.raw["model"].items():
        assert torch.equal(after["model"][key], value), key
    assert after["state"] == run.raw["state"] and after["config"] == run.raw["config"]
    stored = run.stored
    assert stored["bias"][0] == 0.0 and len(stored["bias"]) == 6 and stored["split"] == "val"
    assert stored["after"] >= stored["before"] and stored["num_images"] == len(run.images)
    assert "calibrated (2-fold cross-fitted)" in run.out and f"wrote the calibration into {run.best}" in run.out


def test_eval_scores_the_raw_and_the_calibrated_decision_as_calibrate_measured_them(run, tmp_path):
    code, out, err = call("eval", "--checkpoint", run.best, "--split", "val", "--output", tmp_path / "both")
    assert code == 0, err
    assert "applying the calibration" in err and "calibrated decision" in out
    report = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert report["metrics"]["miou"] == pytest.approx(run.stored["before"], abs=1e-9)  # the inference is calibrate's
    assert report["calibrated"]["metrics"]["miou"] == pytest.approx(run.stored["after"], abs=1e-9)
    assert report["calibrated"]["confusion_matrix"] == run.stored["confusion_after"]
    code, out, _ = call("eval", "--checkpoint", run.best, "--split", "val", "--no-calibration",
                        "--output", tmp_path / "raw")
    assert code == 0 and "calibrated" not in json.loads((tmp_path / "raw" / "metrics.json").read_text())


def test_the_segmenter_decides_on_the_calibrated_logits_and_gives_the_raw_ones(run):
    segmenter = Segmenter.from_checkpoint(run.best, device="cpu")
    plain = Segmenter.from_checkpoint(run.best, device="cpu", calibrated=False)
    assert segmenter.calibrated and not plain.calibrated
    bias = np.array(run.stored["bias"], dtype=np.float32).reshape(-1, 1, 1)
    changed = 0
    for path in run.images:
        logits = segmenter.logits(path)
        np.testing.assert_array_equal(logits, plain.logits(path))  # raw either way
        mask = segmenter.predict(path)
        np.testing.assert_array_equal(mask, (logits + bias).argmax(0))
        np.testing.assert_array_equal(segmenter.predict_proba(path).argmax(0), mask)
        np.testing.assert_array_equal(plain.predict(path), logits.argmax(0))
        changed += int((mask != logits.argmax(0)).sum())
    assert changed > 0  # the calibration moved some decisions, so the checks above could fail


def test_predict_writes_the_calibrated_masks_unless_told_not_to(run, tmp_path):
    segmenter = Segmenter.from_checkpoint(run.best, device="cpu")
    image = run.images[0]
    for flag, expected in (([], segmenter.predict(image)), (["--no-calibration"], segmenter.logits(image).argmax(0))):
        output = tmp_path / ("raw" if flag else "calibrated")
        code, _, err = call("predict", "--checkpoint", run.best, "--input", image, "--output", output, *flag)
        assert code == 0, err
        np.testing.assert_array_equal(np.array(Image.open(output / f"{image.stem}.png")), expected)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_exported_model_gives_the_calibrated_decision_pixel_for_pixel(run, tmp_path, fmt):
    if fmt == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
    segmenter = Segmenter.from_checkpoint(run.best, device="cpu")
    target = tmp_path / f"model.{fmt}"
    code, _, err = call("export", "--checkpoint", run.best, "--format", fmt, "--output", target, "--size", 32, 32)
    assert code == 0, err
    data = run.cfg.data
    for path in run.images:
        pixels = np.array(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        normalised = ((pixels - np.array(data.mean, np.float32)) / np.array(data.std, np.float32)).transpose(2, 0, 1)
        batch = torch.from_numpy(np.ascontiguousarray(normalised[None]))
        if fmt == "pt2":
            logits = torch.export.load(target).module()(batch).detach().numpy()
        else:
            session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            logits = session.run(["logits"], {"image": batch.numpy()})[0]
        np.testing.assert_array_equal(logits[0].argmax(0), segmenter.predict(path))


def test_a_calibration_of_another_class_count_or_an_unknown_metric_is_one_line(run, tmp_path):
    broken = tmp_path / "best.pt"
    save_checkpoint({**load_checkpoint(run.best), "calibration": {**run.stored, "bias": [0.0, 1.0]}}, broken)
    code, _, err = call("eval", "--checkpoint", broken, "--split", "val", "--output", tmp_path / "eval")
    assert code == 2 and "its calibration has 2 biases for a model of 6 classes" in err and "Traceback" not in err
    code, _, err = call("calibrate", "--checkpoint", run.best, "--metric", "iou.squares")
    assert code == 2 and "--metric='iou.squares': no class 'squares'" in err
    code, _, err = call("calibrate", "--checkpoint", tmp_path / "missing.pt")
    assert code == 2 and err == f"error: checkpoint not found: {tmp_path / 'missing.pt'}\n"
    bare = tmp_path / "bare.pt"
    torch.save(run.raw["model"], bare)
    code, _, err = call("calibrate", "--checkpoint", bare, "--config", run.root / "tiny.yaml")
    assert code == 2 and "bare.pt is a bare state dict" in err



@pytest.mark.parametrize("argv, message", [(["--metric", "bogus"], "--metric='bogus' is not a metric"),
                                           (["--folds", "1"], "--folds must be at least 2")])
def test_a_bad_metric_or_folds_is_refused_before_any_inference(run, monkeypatch, argv, message):
    import segfocal.engine.calibrate as engine_calibrate

    def no_inference(*args, **kwargs):
        raise AssertionError("the split was inferred before the request was checked")

    monkeypatch.setattr(engine_calibrate, "gather_pixels", no_inference)
    code, _, err = call("calibrate", "--checkpoint", run.best, *argv)
    assert code == 2 and message in err


def test_a_symlinked_checkpoint_calibrates_the_file_it_names_and_stays_a_link(run, tmp_path):
    target, link = tmp_path / "target.pt", tmp_path / "link.pt"
    save_checkpoint(run.raw, target)
    link.symlink_to(target.name)
    code, out, err = call("calibrate", "--checkpoint", link)
    assert code == 0, err
    assert link.is_symlink() and "calibration" in load_checkpoint(target)
    assert f"wrote the calibration into {link} (the file {target})" in out


def test_a_checkpoint_replaced_while_it_is_calibrated_is_not_written(run, tmp_path, monkeypatch):
    import segfocal.engine.calibrate as engine_calibrate

    path, other = tmp_path / "k.pt", tmp_path / "other.pt"
    save_checkpoint(run.raw, path)
    save_checkpoint({**run.raw, "state": {**run.raw["state"], "epoch": 99}}, other)
    gather = engine_calibrate.gather_pixels

    def replaced_meanwhile(*args, **kwargs):
        pixels = gather(*args, **kwargs)
        other.replace(path)  # another model saved under the name during the inference
        return pixels

    monkeypatch.setattr(engine_calibrate, "gather_pixels", replaced_meanwhile)
    code, _, err = call("calibrate", "--checkpoint", path)
    assert code == 2 and "k.pt was replaced while it was being calibrated" in err
    assert "calibration" not in load_checkpoint(path) and load_checkpoint(path)["state"]["epoch"] == 99

def test_calibrate_in_a_run_directory_removes_a_killed_calibrate_s_temporary(run):
    stale = run.best.parent / f".{run.best.name}.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")  # what a kill -9 during the rewrite leaves
    other = run.best.parent / ".notes.txt.abc.tmp"
    other.write_bytes(b"not the checkpoint's")
    code, _, err = call("calibrate", "--checkpoint", run.best)
    assert code == 0, err
    assert not stale.exists() and other.exists()
    assert load_checkpoint(run.best)["calibration"] == run.stored  # the same fit again


def test_calibrate_holds_the_run_directory_so_a_training_run_cannot_write_it_meanwhile(run):
    from segfocal.engine.work_dir_lock import WorkDirLock

    holder = WorkDirLock(run.best.parent).acquire()  # as a training run in that folder does
    try:
        code, _, err = call("calibrate", "--checkpoint", run.best)
    finally:
        holder.release()
    assert code == 2 and "is in use by another run" in err


def test_train_calibrate_fits_best_pt_after_training_for_the_checkpoint_metric(tmp_path, capsys):
    cfg = load_config(tiny_recipe(tmp_path, train__epochs=1, train__log_images=0, train__calibrate=True,
                                  train__checkpoint_metric="mean_accuracy"))
    Trainer(cfg, progress=False).fit()
    stored = load_checkpoint(Path(cfg.work_dir) / "best.pt")["calibration"]
    assert stored["metric"] == "mean_accuracy" and stored["split"] == "val" and stored["after"] >= stored["before"]
    assert "Calibration for mean_accuracy on split 'val'" in capsys.readouterr().out


def test_calibrate_on_a_patches_split_counts_the_tiles_it_inferred(tmp_path):
    from large_data import large_recipe

    pytest.importorskip("zarr")  # TIFFs read by region
    cfg = load_config(large_recipe(tmp_path, train__epochs=1, train__log_images=0))
    Trainer(cfg, progress=False).fit()
    code, out, err = call("calibrate", "--checkpoint", Path(cfg.work_dir) / "best.pt")
    assert code == 0, err
    assert "logits of 25 tiles in" in out  # the val image, 300x300, in 64x64 tiles
