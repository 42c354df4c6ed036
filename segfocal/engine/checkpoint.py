"""Checkpoints written atomically, so a crash or a kill never leaves a corrupt file.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows): readers see the old file or the
new one, never half of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, Path]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or lacks what is needed; the message names the file."""


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_stale_temporaries(directory: PathLike) -> list:
    """Delete temporary files that a run killed in the middle of :func:`save_checkpoint` left behind.

    Call only while no other process writes checkpoints to ``directory`` (at the start of a run).
    """
    stale = sorted(Path(directory).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def model_state_from(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The model's state dict from a trainer checkpoint, or the dict itself if it is a bare state dict."""
    state = checkpoint.get("model", checkpoint)
    return {key.removeprefix("module."): value for key, value in state.items()}


def resume_path(work_dir: PathLike, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: ``None``, ``"auto"`` (``last.pt`` if present) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(work_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {path}")
    return path


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
