"""Export: ONNX, torch.export programs and smp folders load back with their own runtime and match the model.

The model is the tiny recipe's 3-level UNet (resnet18 encoder, output stride 8) with random
weights from a fixed seed. Each artefact runs at two batch sizes and sizes other than the traced
(2, 3, 64, 64) example. ATOL: float32 logits of order 1 differ by <= ~5e-6 between onnxruntime
and PyTorch (other convolution algorithms and summation orders); torch.export and smp reloads
run the same kernels and match exactly. 1e-4 leaves 20x headroom and still catches a wrong weight,
interpolation or fixed shape, which change logits by 1e-2 or more.
"""
import json
import sys

import pytest
import torch

from segfocal.config import load_config, to_dict
from segfocal.engine.checkpoint import CheckpointError, save_checkpoint
from segfocal.export import ExportError, export_onnx, export_pt2, export_smp, model_from_checkpoint
from segfocal.models import build_model
from recipes import tiny_recipe

ATOL = 1e-4
SHAPES = [(1, 3, 64, 64), (2, 3, 96, 128)]  # other batch sizes and sizes than the traced example


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config(tiny_recipe(tmp_path_factory.mktemp("recipe")))


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.num_classes).eval()


def images(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_matches(run, model):
    for shape in SHAPES:
        x = images(shape)
        with torch.no_grad():
            expected = model(x)
            got = torch.as_tensor(run(x))
        assert got.dtype == torch.float32 and got.shape == (shape[0], 6, *shape[2:])
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    written = export_onnx(model, path, 3, example_size=(64, 64), metadata={"class_names": "a,b"})
    return path, written


def test_onnx_has_dynamic_axes_and_matches_pytorch(model, onnx_file):
    onnxruntime = pytest.importorskip("onnxruntime")
    path, written = onnx_file
    assert written == [path] and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporaries
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_,), (output,) = session.get_inputs(), session.get_outputs()
    assert (input_.name, input_.type, input_.shape) == ("image", "tensor(float)", ["batch", 3, "height", "width"])
    assert (output.name, output.shape) == ("logits", ["batch", 6, "height", "width"])
    assert session.get_modelmeta().custom_metadata_map == {"class_names": "a,b"}
    assert_matches(lambda x: session.run(["logits"], {"image": x.numpy()})[0], model)


def test_pt2_loads_with_plain_torch_and_matches_pytorch(model, tmp_path):
    path = tmp_path / "out" / "model.pt2"  # missing folders are created
    assert export_pt2(model, path, example_size=(64, 64)) == [path]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt2"]
    program = torch.export.load(path).module()
    assert_matches(program, model)


def test_smp_folder_loads_with_from_pretrained_and_matches_pytorch(model, tmp_path):
    import segmentation_models_pytorch as smp

    written = export_smp(model, tmp_path / "smp", example_size=(64, 64))
    assert sorted(p.name for p in written) == ["README.md", "config.json", "model.safetensors"]
    assert written[-1].name == "config.json"  # published last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smp"]  # no staging folder left
    config = json.loads((tmp_path / "smp" / "config.json").read_text())
    assert config["_model_class"] == "Unet" and config["encoder_depth"] == 3 and config["encoder_weights"] is None
    loaded = smp.from_pretrained(str(tmp_path / "smp")).eval()
    assert_matches(loaded, model)


def test_model_is_put_in_eval_mode_and_a_channels_last_model_is_exported(cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(memory_format=torch.channels_last).train()
    export_smp(model, tmp_path / "smp", example_size=(64, 64))
    assert not model.training
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the caller's model is untouched


def test_a_failed_verification_raises_and_publishes_nothing(model, tmp_path, monkeypatch):
    # a config out of step with the weights: from_pretrained builds a model that computes something else
    monkeypatch.setitem(model.config, "decoder_interpolation", "bilinear")
    with pytest.raises(ExportError, match=r"smp folder .*smp: logits differ from the PyTorch model's by up to "
                                          r".* for an input of shape \(2, 3, 64, 64\); nothing was written"):
        export_smp(model, tmp_path / "smp", example_size=(64, 64))
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_extra_names_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ExportError, match=r"ONNX export needs onnx, onnxscript, onnxruntime; missing: onnx(, \w+)*\. "
                                          r"Install them with: pip install 'segfocal\[export\]'"):
        export_onnx(model, tmp_path / "model.onnx", 3)
    assert list(tmp_path.iterdir()) == []


def test_model_from_checkpoint_rebuilds_model_and_config(cfg, model, tmp_path):
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, tmp_path / "best.pt")
    restored, restored_cfg = model_from_checkpoint(tmp_path / "best.pt")
    assert restored_cfg == cfg and cfg.train.channels_last
    assert not restored.training and restored.encoder.conv1.weight.is_contiguous()
    assert_matches(restored, model)
    save_checkpoint(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare.pt holds no config"):
        model_from_checkpoint(tmp_path / "bare.pt")
    assert_matches(model_from_checkpoint(tmp_path / "bare.pt", config=cfg)[0], model)


def test_unsuitable_arguments_are_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match=r"must exceed the encoder's output stride 8 .* try \(16, 16\)"):
        export_pt2(model, tmp_path / "model.pt2", example_size=(8, 8))
    with pytest.raises(ExportError, match="is a directory"):
        export_pt2(model, tmp_path)
    with pytest.raises(ExportError, match="Conv2d is not a segmentation-models-pytorch model"):
        export_smp(torch.nn.Conv2d(3, 6, 1), tmp_path / "smp")
    assert list(tmp_path.iterdir()) == []


def test_the_export_command_writes_programs_that_compute_the_checkpoints_logits(capsys, cfg, model, tmp_path):
    """`segfocal export` on a trainer checkpoint (its config inside): pt2 and smp load back and match."""
    import segmentation_models_pytorch as smp

    from segfocal.cli import main

    checkpoint = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    for fmt, output in (("pt2", tmp_path / "model.pt2"), ("smp", tmp_path / "smp")):
        main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(output),
              "--size", "64", "64"])
        assert capsys.readouterr().out.startswith("wrote ")
    assert_matches(torch.export.load(tmp_path / "model.pt2").module(), model)
    assert_matches(smp.from_pretrained(str(tmp_path / "smp")).eval(), model)


def test_the_export_command_without_the_onnx_extra_exits_2_naming_it(capsys, cfg, model, tmp_path, monkeypatch):
    from segfocal.cli import main

    checkpoint = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(SystemExit) as exited:
        main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ONNX export needs") and error.endswith("pip install 'segfocal[export]'")
    assert not (tmp_path / "m.onnx").exists()


def test_the_onnx_file_records_the_normalisation_of_any_bit_depth(capsys, cfg, model, tmp_path):
    """A 16-bit run's data.scale travels with mean and std: without it a user would divide by 255."""
    import copy
    import json

    onnxruntime = pytest.importorskip("onnxruntime")
    from segfocal.cli import main

    sixteen_bit = copy.deepcopy(cfg)
    sixteen_bit.data.scale, sixteen_bit.data.mean, sixteen_bit.data.std = 1 / 65535, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    checkpoint = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(sixteen_bit)}, checkpoint)
    main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
          "--size", "64", "64"])
    capsys.readouterr()
    meta = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    assert json.loads(meta["scale"]) == 1 / 65535
    assert (json.loads(meta["mean"]), json.loads(meta["std"])) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


# -- an export never replaces its inputs ---------------------------------------------------------

def export_command(capsys, *argv):
    """Run `segfocal export` in-process; returns (exit code, stderr)."""
    from segfocal.cli import main

    try:
        main(["export", *map(str, argv)])
        code = 0
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err.strip()


def files_of(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("fmt, output, what", [
    ("pt2", "run/best.pt", "the --checkpoint"),
    ("onnx", "run/best.pt", "the --checkpoint"),
    ("pt2", "link/best.pt", "the --checkpoint"),          # the run directory through a symlink
    ("pt2", "run/last.pt", "a file of the checkpoint's run directory"),
    ("onnx", "run/metrics.jsonl", "a file of the checkpoint's run directory"),
    ("pt2", "recipe.yaml", "the --config file"),
    ("smp", "elsewhere", "the --config file"),             # elsewhere/config.json is the config
])
def test_an_export_that_would_replace_its_inputs_is_refused_before_the_checkpoint_is_read(
        capsys, tmp_path, fmt, output, what):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the trained weights")  # not even a checkpoint: the refusal comes first
    (run / "last.pt").write_bytes(b"the last weights")
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    (tmp_path / "recipe.yaml").write_text("data: {num_classes: 6}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}\n")
    config = tmp_path / ("elsewhere/config.json" if fmt == "smp" else "recipe.yaml")
    before = files_of(tmp_path)
    code, error = export_command(capsys, "--checkpoint", run / "best.pt", "--config", config, "--format", fmt,
                                 "--output", tmp_path / output)
    assert code == 2 and "\n" not in error
    assert error.startswith(f"error: --output {tmp_path / output} would replace ") and what in error
    assert files_of(tmp_path) == before



def test_an_existing_file_not_named_for_the_format_needs_overwrite_and_a_size_below_one_is_refused(
        capsys, cfg, model, tmp_path):
    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    notes = tmp_path / "notes.yaml"
    notes.write_text("mine")
    argv = ["--checkpoint", checkpoint, "--format", "pt2", "--size", 64, 64]
    code, error = export_command(capsys, *argv, "--output", notes)
    assert code == 2 and error == (f"error: {notes} exists and is not a .pt2 file (an earlier export): give a new "
                                   f"path, or pass --overwrite to replace it")
    assert notes.read_text() == "mine"
    earlier = tmp_path / "model.pt2"
    earlier.write_bytes(b"an earlier export")
    assert export_command(capsys, *argv, "--output", earlier)[0] == 0 and earlier.read_bytes() != b"an earlier export"
    code, error = export_command(capsys, *argv, "--output", notes, "--overwrite")
    assert code == 0 and notes.read_bytes() != b"mine", error
    for size in (["0", "0"], ["-5", "64"]):
        code, error = export_command(capsys, "--checkpoint", checkpoint, "--format", "onnx", "--output",
                                     tmp_path / "m.onnx", "--size", *size)
        assert code == 2 and error == (f"error: --size {size[0]} {size[1]}: the example input's height and width "
                                       f"must be at least 1")

def test_an_smp_folder_with_files_the_export_did_not_write_needs_overwrite(capsys, cfg, model, tmp_path):
    import segmentation_models_pytorch as smp

    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    folder = tmp_path / "smp"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("keep me")
    argv = ["--checkpoint", checkpoint, "--format", "smp", "--output", folder, "--size", 64, 64]
    code, error = export_command(capsys, *argv)
    assert code == 2 and "\n" not in error
    assert error == (f"error: {folder} holds files an smp export did not write (config.json, notes.txt); export to a "
                     f"new or empty folder, or pass --overwrite to replace config.json, model.safetensors, "
                     f"README.md there (other files are kept)")
    assert files_of(folder) == {"config.json": b'{"mine": true}', "notes.txt": b"keep me"}

    assert export_command(capsys, *argv, "--overwrite")[0] == 0
    assert sorted(files_of(folder)) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    modes = {file.name: file.stat().st_mode & 0o777 for file in folder.iterdir()}
    assert modes["model.safetensors"] == modes["README.md"] == modes["notes.txt"]  # not owner-only
    assert (folder / "notes.txt").read_text() == "keep me"
    assert_matches(smp.from_pretrained(str(folder)).eval(), model)
    # a folder holding an earlier smp export and nothing else is replaced without --overwrite
    (folder / "notes.txt").unlink()
    assert export_command(capsys, *argv)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "smp"]  # no staging folder left
