"""tools/predict.py never harms its inputs or files outside its output folder, and bounds its memory.

An ``--output`` that is, or lies inside, the ``--input`` folder (however spelled), or that would
overwrite an input file, is refused before anything is written; a symlink in the output folder is
replaced, not written through; an image above ``--max-pixels`` is predicted with sliding windows.
The model is an untrained tiny UNet (no training: these tests are about files, not accuracy),
called in-process as in test_tools.py.
"""
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from segfocal.config import load_config
from segfocal.engine.restore import restore_model
from segfocal.evaluation import predict_logits
from segfocal.models import build_model

from recipes import load_tool, run_tool, tiny_recipe

NUM_CLASSES = 6
CROP, STRIDE = (32, 32), (16, 16)
PREDICT = load_tool("predict")


def call(capsys, *argv):
    """Run tools/predict.py in-process; returns (exit code, stdout, stderr)."""
    return run_tool(capsys, PREDICT, *argv)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A config with 32x32 slide windows and the state dict of an untrained model for it."""
    root = tmp_path_factory.mktemp("predict_safety")
    config = tiny_recipe(root, eval__crop_size=list(CROP), eval__stride=list(STRIDE))
    cfg = load_config(config)
    torch.manual_seed(0)
    weights = root / "weights.pt"
    torch.save(build_model(cfg.model, NUM_CLASSES).state_dict(), weights)
    return SimpleNamespace(config=config, cfg=cfg, weights=weights)


def predict(capsys, model, source, output, *extra):
    return call(capsys, "--config", model.config, "--checkpoint", model.weights, "--input", source,
                "--output", output, *extra)


def save_image(path, width, height, seed=0):
    """A blocky random RGB image, so that predictions vary across it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    save_image(folder / "a.png", 40, 24, seed=1)
    save_image(folder / "b.png", 24, 32, seed=2)
    return folder


def snapshot(folder):
    return {path.name: path.read_bytes() if path.is_file() else "folder" for path in sorted(Path(folder).iterdir())}


def expected_mask(model, path, **inference):
    """Argmax of the model's logits for the image at ``path``, normalised here."""
    data = model.cfg.data
    rgb = np.array(Image.open(path).convert("RGB"))
    normalised = (rgb.astype(np.float32) / 255.0 - np.float32(data.mean)) / np.float32(data.std)
    image = torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0)
    network = restore_model(model.cfg, model.weights, torch.device("cpu"))
    with torch.no_grad():
        logits = predict_logits(network, image, NUM_CLASSES, **inference)
    return logits.argmax(dim=1)[0].numpy()


def assert_mask(path, expected):
    """The palette PNG at ``path`` equals ``expected`` up to a float-rounding tie or two."""
    with Image.open(path) as mask:
        assert mask.mode == "P"
        predicted = np.array(mask)
    assert predicted.shape == expected.shape
    assert (predicted != expected).sum() <= 2, path


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


# -- the output folder never overlaps the input --------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "inside", "symlink", "dotted"])
def test_an_output_that_is_or_is_inside_the_input_folder_is_refused(capsys, model, images, tmp_path, spelling):
    (tmp_path / "link").symlink_to(images, target_is_directory=True)
    output = {"same": images, "inside": images / "masks", "symlink": tmp_path / "link",
              "dotted": images / ".." / "images"}[spelling]
    before = snapshot(images)
    code, _, stderr = predict(capsys, model, images, output)
    assert code == 2
    message = stderr.strip()
    assert message.startswith("error: --output ") and "\n" not in message
    assert str(output) in message and str(images) in message
    assert snapshot(images) == before  # byte-identical, and nothing added (not even the "masks" folder)

    missing = tmp_path / "missing.pt"  # refused before the model is loaded: not a checkpoint error
    code, _, stderr = call(capsys, "--config", model.config, "--checkpoint", missing, "--input", images,
                           "--output", output)
    assert code == 2 and stderr.strip() == message


@pytest.mark.parametrize("layout", ["input-in-output", "input-links-into-output"])
def test_a_single_input_file_that_its_mask_would_overwrite_is_refused(capsys, model, images, tmp_path, layout):
    output = tmp_path / "out"
    output.mkdir()
    target = save_image(output / "scene.png", 24, 24, seed=3)
    source = target
    if layout == "input-links-into-output":  # images/scene.png -> out/scene.png
        source = images / "scene.png"
        source.symlink_to(target)
    before = target.read_bytes()
    code, _, stderr = predict(capsys, model, source, output)
    assert code == 2
    message = stderr.strip()
    assert message.startswith("error: --output ") and "\n" not in message
    assert str(output) in message and str(source) in message
    assert target.read_bytes() == before
    assert sorted(path.name for path in output.iterdir()) == ["scene.png"]  # no overlay either


def test_a_single_input_file_in_the_output_folder_under_another_name_is_predicted(capsys, model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    source = save_image(output / "photo.bmp", 24, 24, seed=4)
    before = source.read_bytes()
    code, _, stderr = predict(capsys, model, source, output)
    assert code == 0, stderr
    assert source.read_bytes() == before
    assert sorted(str(path.relative_to(output)) for path in output.rglob("*")) == [
        "overlays", "overlays/photo.png", "photo.bmp", "photo.png"]


# -- writing never follows a symlink, and leaves nothing half-written ---------------------------

def test_symlinks_in_the_output_folder_are_replaced_not_written_through(capsys, model, images, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (output / "a.png").symlink_to(victim)
    (output / "overlays").mkdir()
    (output / "overlays" / "a.png").symlink_to(tmp_path / "created.jpg")  # dangling: must not be created
    (output / "b.png").write_bytes(b"a stale mask")
    code, _, stderr = predict(capsys, model, images, output)
    assert code == 0, stderr
    assert victim.read_text() == "precious"
    assert not (tmp_path / "created.jpg").exists()
    names = ["a.png", "b.png", "overlays/a.png", "overlays/b.png"]
    assert sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file()) == names  # no temporaries
    mode = 0o666 & ~current_umask()
    for name in names:
        path = output / name
        assert path.is_file() and not path.is_symlink(), name
        assert path.stat().st_mode & 0o777 == mode, name  # as open() would make it, not mkstemp's 0o600
    for stem in ("a", "b"):
        assert_mask(output / f"{stem}.png", expected_mask(model, images / f"{stem}.png"))
        with Image.open(output / "overlays" / f"{stem}.png") as overlay, Image.open(images / f"{stem}.png") as image:
            assert overlay.format == "PNG" and overlay.width >= image.width and overlay.height > image.height


# -- --max-pixels ------------------------------------------------------------------------------

def test_an_image_above_max_pixels_is_predicted_with_sliding_windows(capsys, model, tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    large = save_image(folder / "large.png", 64, 48, seed=5)  # 3072 pixels
    small = save_image(folder / "small.png", 24, 24, seed=6)  # 576 pixels
    slide = {path: expected_mask(model, path, mode="slide", crop_size=CROP, stride=STRIDE) for path in (large, small)}
    whole = {path: expected_mask(model, path) for path in (large, small)}
    for path in (large, small):  # the two modes give visibly different masks, so the test can tell them apart
        assert (slide[path] != whole[path]).sum() > 20, path

    code, _, stderr = predict(capsys, model, folder, tmp_path / "limited", "--max-pixels", 1000)
    assert code == 0, stderr
    assert_mask(tmp_path / "limited" / "large.png", slide[large])
    assert_mask(tmp_path / "limited" / "small.png", whole[small])
    notices = [line for line in stderr.splitlines() if "--max-pixels" in line]
    assert len(notices) == 1
    assert str(large) in notices[0] and "--max-pixels 1000" in notices[0] and "slid" in notices[0]

    code, _, stderr = predict(capsys, model, folder, tmp_path / "unlimited", "--max-pixels", 0)  # 0: no limit
    assert code == 0, stderr
    assert_mask(tmp_path / "unlimited" / "large.png", whole[large])
    assert "--max-pixels" not in stderr


def test_a_negative_max_pixels_exits_2(capsys, model, images, tmp_path):
    code, _, stderr = predict(capsys, model, images, tmp_path / "out", "--max-pixels", -1)
    assert code == 2
    assert "--max-pixels" in stderr and "must be >= 0" in stderr
    assert not (tmp_path / "out").exists()


def test_an_overlays_folder_linked_to_the_input_is_refused(capsys, model, images, tmp_path):
    """A symlinked overlays/ would put overlays/<stem>.png over the input image <stem>.png."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "overlays").symlink_to(images)
    before = {path.name: path.read_bytes() for path in images.iterdir()}
    code, _, stderr = predict(capsys, model, images, output)
    assert code == 2 and "would overwrite the --input image" in stderr and "with overlays/a.png" in stderr
    assert {path.name: path.read_bytes() for path in images.iterdir()} == before


@pytest.mark.parametrize("output", ["file", "file/masks", "out/overlays"])
def test_an_output_that_is_not_a_folder_is_one_line_before_the_model_loads(capsys, model, images, tmp_path, output):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "overlays").write_text("also mine")  # predict would make overlays/ there
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    target = tmp_path / output.removesuffix("/overlays")
    code, _, stderr = call(capsys, "--config", model.config, "--checkpoint", tmp_path / "missing.pt",  # not read
                           "--input", images, "--output", target)
    message = stderr.strip()
    assert code == 2 and "\n" not in message
    culprit = {"file": "", "file/masks": f": {tmp_path / 'file'}", "out/overlays": f": {tmp_path / output}"}[output]
    assert message == (f"error: --output {target}{culprit} is not a folder; give a new or existing folder for the "
                       f"results")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
