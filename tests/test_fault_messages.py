"""Faults a user meets end in one line naming the path or key, exit code 2, and untouched checkpoints:
a work dir that cannot be written, a full disk, a resume with another optimizer, malformed
checkpoints and encoder weights that are not a state dict."""
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from recipes import REPO, load_tool, tiny_recipe

TRAIN = load_tool("train")
EVAL = load_tool("eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work dir after one epoch of the tiny recipe, and the recipe."""
    root = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(root, train__epochs=1, train__log_images=0)
    assert subprocess.run([sys.executable, "tools/train.py", "--config", str(recipe), "--no-progress"],
                          cwd=REPO, capture_output=True, timeout=300).returncode == 0
    return root / "run", recipe


def fails_in_one_line(capsys, tool, *argv):
    """Run ``tool`` in-process; assert exit 2 and a one-line error; return that line."""
    with pytest.raises(SystemExit) as exited:
        tool.main([str(arg) for arg in argv])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(work_dir):
    return {name: (work_dir / name).read_bytes() for name in ("last.pt", "best.pt")}


def copy_run(trained, tmp_path):
    work_dir = tmp_path / "run"
    shutil.copytree(trained[0], work_dir)
    return work_dir


def test_a_work_dir_that_cannot_be_created_names_it(capsys, trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", blocker / "run", "--no-progress")
    assert f"work_dir {blocker / 'run'} cannot be written" in line and "Not a directory" in line


def test_resuming_with_another_optimizer_names_the_key_and_keeps_the_checkpoints(capsys, trained, tmp_path):
    work_dir = copy_run(trained, tmp_path)
    before = snapshot(work_dir)
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", work_dir, "--resume", "auto",
                             "--set", "optim.name=sgd", "--set", "train.epochs=2", "--no-progress")
    assert f"cannot resume from {work_dir / 'last.pt'}: it was trained with optim.name='adamw'" in line
    assert "optim.name='sgd'" in line
    assert snapshot(work_dir) == before


def test_resuming_with_other_loss_terms_names_them(capsys, trained, tmp_path):
    """A single focal loss has no state to mismatch: without the check, a term list would resume silently."""
    work_dir = copy_run(trained, tmp_path)
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", work_dir, "--resume", "auto",
                             "--set", "loss.terms=[{name: focal}, {name: dice}]", "--set", "train.epochs=2",
                             "--no-progress")
    assert "it was trained with loss.terms.name=[] and this config has loss.terms.name=['focal', 'dice']" in line


@pytest.mark.parametrize("content, expected", [
    ({"model": "str"}, "holds no model weights"),
    ({"model": {"conv.weight": "str"}}, "entry 'conv.weight' holds a str, not a tensor"),
    ([1, 2], "holds a list, expected a dict"),
], ids=["model-is-a-string", "entry-not-a-tensor", "not-a-dict"])
def test_malformed_checkpoints_are_named_by_resume_and_eval(capsys, trained, tmp_path, content, expected):
    checkpoint = tmp_path / "bad.pt"
    torch.save(content, checkpoint)
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", tmp_path / "run",
                             "--resume", checkpoint, "--no-progress")
    assert str(checkpoint) in line and expected in line
    line = fails_in_one_line(capsys, EVAL, "--config", trained[1], "--checkpoint", checkpoint, "--out", tmp_path / "e")
    assert str(checkpoint) in line and expected in line


class Payload:
    """An object pickled into a file: loading it would need (and run) code."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_with_code_is_refused_as_encoder_weights_and_as_a_checkpoint(capsys, trained, tmp_path):
    pickled = tmp_path / "weights.pt"
    with open(pickled, "wb") as handle:
        pickle.dump({"conv1.weight": Payload()}, handle)
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", tmp_path / "run", "--no-progress",
                             "--set", f"model.encoder_weights={pickled}")
    assert f"model.encoder_weights: cannot read {pickled} as a state dict of tensors" in line
    line = fails_in_one_line(capsys, EVAL, "--config", trained[1], "--checkpoint", pickled, "--out", tmp_path / "e")
    assert f"cannot read checkpoint {pickled}" in line
    assert "code ran" not in capsys.readouterr().out


def limit_file_size():
    """In the child: writes past 2 MiB fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_a_full_disk_during_training_stops_in_one_line_and_keeps_the_checkpoints(trained, tmp_path):
    work_dir = copy_run(trained, tmp_path)
    before = snapshot(work_dir)
    assert len(before["last.pt"]) > 2 << 20  # so the next checkpoint cannot be written under the limit
    result = subprocess.run([sys.executable, "tools/train.py", "--config", str(trained[1]), "--work-dir",
                             str(work_dir), "--resume", "auto", "--set", "train.epochs=2", "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write checkpoint {work_dir}/") and "is unchanged" in line, line
    assert "Traceback" not in result.stderr
    assert snapshot(work_dir) == before
    assert not list(work_dir.glob(".*.tmp"))


def test_a_placeholder_typo_in_a_folder_pattern_is_named_at_load(capsys, trained, tmp_path):
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", tmp_path / "run", "--no-progress",
                             "--set", 'data.mask_dir="{splt}/masks"')
    assert ("data.mask_dir must use no placeholder but {split} (the split's name), not {splt}, got '{splt}/masks'"
            in line)
    assert not (tmp_path / "run").exists()
    # unquoted, YAML reads a brace as a mapping: one line that says to quote it
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--set", "data.mask_dir={split}/masks")
    assert "invalid YAML value (" in line and "at line 1, column 8); quote a string" in line


def test_a_crop_larger_than_the_images_fails_at_start_naming_the_smallest_image(capsys, trained, tmp_path):
    crop = '[{__class_fullname__: RandomCrop, height: 48, width: 48, p: 1.0}]'  # the images are 32x32
    line = fails_in_one_line(capsys, TRAIN, "--config", trained[1], "--work-dir", tmp_path / "run", "--no-progress",
                             "--set", f"augment.train={crop}")
    assert "the augmentation pipeline of split 'train' fails on " in line and "(32x32, its smallest image)" in line
    assert not (tmp_path / "run" / "last.pt").exists()


class _BadSample(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        from segfocal.data import DataError

        raise DataError(f"masks/{index}.tif: 7 pixels have label values [9] outside 0..5", f"masks/{index}.tif")


def test_a_data_error_raised_in_a_loader_worker_is_printed_as_its_own_line(capsys):
    from segfocal.cli.common import exit_on_user_error

    with pytest.raises(SystemExit) as exited, exit_on_user_error():
        next(iter(torch.utils.data.DataLoader(_BadSample(), num_workers=1)))
    # torch re-raises it as "Caught DataError in DataLoader worker process 0. Original Traceback (...)"
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: masks/0.tif: 7 pixels have label values [9] outside 0..5\n"


def test_sigterm_stops_a_command_with_143_and_leaves_no_half_written_file(tmp_path, capsys):
    import os

    from segfocal.cli.common import terminate_as_exit
    from segfocal.files import replaced_atomically

    with pytest.raises(SystemExit) as exited, terminate_as_exit():
        with replaced_atomically(tmp_path / "mask.tif") as handle:
            handle.write(b"half a mask")
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler stops a predict
    assert exited.value.code == 143 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == "stopped by SIGTERM; files not finished are removed\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
