"""Atomic file replacement: a failure keeps the old file, a symlink is replaced, not followed."""
import os
import subprocess
import sys

import pytest

from segfocal.files import replaced_atomically


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crashed"):
        with replaced_atomically(path) as handle:
            handle.write(b"half a ma")
            raise RuntimeError("crashed")
    assert path.read_bytes() == b"old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["mask.png"]
    with replaced_atomically(path, durable=True) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new"
    assert [entry.name for entry in tmp_path.iterdir()] == ["mask.png"]


def test_a_symlink_at_the_target_is_replaced_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    link = tmp_path / "out.png"
    link.symlink_to(victim)
    with replaced_atomically(link) as handle:
        handle.write(b"mask")
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"mask"


def test_new_files_get_the_mode_open_would_give_not_owner_only(tmp_path):
    umask = os.umask(0o027)
    try:
        with replaced_atomically(tmp_path / "a.bin") as handle:
            handle.write(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640



@pytest.mark.parametrize("mode", [0o600, 0o444])
def test_a_replaced_file_keeps_its_mode_private_or_write_protected(tmp_path, mode):
    path = tmp_path / "best.pt"
    path.write_bytes(b"old")
    path.chmod(mode)
    with replaced_atomically(path) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == mode

FULL_DISK = """
import resource, signal, sys, torch
from segfocal.engine.checkpoint import CheckpointError, save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_checkpoint({"model": {"w": torch.zeros(1 << 20)}}, sys.argv[1])  # 4 MiB, over the 1 MiB limit
except CheckpointError as error:
    print(error)
    sys.exit(2)
"""


def test_a_checkpoint_write_that_fills_the_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    from segfocal.engine.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"state": {"epoch": 1}}, path)
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.startswith(f"cannot write checkpoint {path} (is the disk full or read-only?)"), result.stdout
    assert path.read_bytes() == before and load_checkpoint(path)["state"]["epoch"] == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
