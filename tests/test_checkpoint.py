"""Checkpoints: atomic writes that survive a failure mid-write, clear errors on bad files."""
import pytest
import torch

from segfocal.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state_from,
    remove_stale_temporaries,
    resume_path,
    save_checkpoint,
)
from segfocal.engine.checkpointer import RUN_FILES


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(5.0)}, "state": {"epoch": 3}}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(5.0)) and loaded["state"]["epoch"] == 3


def test_truncated_file_gives_an_error_naming_it(tmp_path):
    path = tmp_path / "broken.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")



def test_an_empty_file_a_folder_and_an_error_without_a_message_are_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*empty.pt: the file is empty$"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint .*runs is a folder, not a checkpoint file$"):
        load_checkpoint((tmp_path / "runs").mkdir() or tmp_path / "runs")
    (tmp_path / "cut.pt").write_bytes(b"PK")

    def message_less(*args, **kwargs):
        raise EOFError()  # as torch raises for some truncated files

    monkeypatch.setattr(torch, "load", message_less)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut.pt: EOFError$"):
        load_checkpoint(tmp_path / "cut.pt")

def test_model_state_from_strips_ddp_prefix_and_accepts_bare_state_dicts():
    assert list(model_state_from({"model": {"module.conv.weight": torch.ones(1)}})) == ["conv.weight"]
    assert list(model_state_from({"conv.weight": torch.ones(1)})) == ["conv.weight"]


def test_resume_path(tmp_path):
    assert resume_path(tmp_path, None) is None
    assert resume_path(tmp_path, "auto") is None  # nothing to resume yet: start fresh
    save_checkpoint({}, tmp_path / "last.pt")
    assert resume_path(tmp_path, "auto") == tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        resume_path(tmp_path, str(tmp_path / "nope.pt"))


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    save_checkpoint({"state": {"epoch": 1}}, tmp_path / "last.pt")
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".curves.png.x_9.tmp").write_bytes(b"half a plot")
    (tmp_path / "notes.tmp").write_text("not ours")
    (tmp_path / ".notes.txt.abc.tmp").write_text("not a run file's")
    removed = remove_stale_temporaries(tmp_path, RUN_FILES)
    assert [p.name for p in removed] == [".curves.png.x_9.tmp", ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.abc.tmp", "last.pt", "notes.tmp"]
