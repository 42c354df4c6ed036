"""Checkpoints written atomically, so a crash or a kill never leaves a corrupt file.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the target (:func:`segfocal.files.replaced_atomically`): readers see the old file or the new
one, never half of one.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from ..files import replaced_atomically

PathLike = Union[str, Path]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or lacks what is needed; the message names the file."""


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` atomically and durably (temp file + fsync + rename).

    A failed write (full disk, read-only folder) raises :class:`CheckpointError` naming the file
    and leaves the previous one unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path, durable=True) as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write (full disk) as RuntimeError
        raise CheckpointError(f"cannot write checkpoint {path} (is the disk full or read-only?): {_reason(error)}; "
                              f"the previous {path.name}, if any, is unchanged") from None


def remove_stale_temporaries(directory: PathLike, names: Iterable[str]) -> List[Path]:
    """Delete the temporaries (``.<name>.*.tmp``, :func:`segfocal.files.replaced_atomically`'s) of the
    files ``names`` in ``directory`` that a process killed while writing them left behind.

    Call only while no other process writes those files (a run, under its work dir's lock).
    """
    stale = sorted(path for name in names for path in Path(directory).glob(f".{glob.escape(name)}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(error).split('. ')[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def model_state_from(checkpoint: Dict[str, Any], source: PathLike = "checkpoint") -> Dict[str, Any]:
    """The model's state dict from a trainer checkpoint, or the dict itself if it is a bare state dict.

    Raises :class:`CheckpointError` naming ``source`` unless it maps names to tensors.
    """
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source} holds no model weights: expected a state dict (name -> tensor) or a "
                              f"trainer checkpoint with one under 'model'")
    wrong = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if wrong is not None:
        raise CheckpointError(f"{source} is not a model state dict: entry {wrong!r} holds a "
                              f"{type(state[wrong]).__name__}, not a tensor")
    return {str(key).removeprefix("module."): value for key, value in state.items()}


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


def _reason(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none (torch's EOFError)."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__
