"""A run directory's files: its lock, ``config.yaml``, ``last.pt`` and ``best.pt``, and which
checkpoint a resume may start from.

The trainer says what a checkpoint holds; the :class:`Checkpointer` says where it goes and makes
sure it goes there whole (:func:`~segfocal.engine.checkpoint.save_checkpoint`), with finite
weights, and by one run at a time (:class:`~segfocal.engine.work_dir_lock.WorkDirLock`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import Config, ConfigError, save_config, to_dict
from ..data.splits import RECORD
from .checkpoint import load_checkpoint, remove_stale_temporaries, resume_path, save_checkpoint
from .work_dir_lock import WorkDirLock

# The files a run replaces atomically: a kill may leave their temporaries, swept when the next run starts
RUN_FILES = ("last.pt", "best.pt", "curves.png", RECORD)
# Keys a run cannot change on resume: they change the shape or kind of the saved state.
# "loss.terms.name" is the list of the terms' names (their factors may change).
RESUME_KEYS = ("model.arch", "model.encoder_name", "model.in_channels", "model.kwargs", "data.num_classes",
               "loss.name", "loss.terms.name", "optim.name", "schedule.name")


class NonFiniteLossError(RuntimeError):
    """Training cannot go on: too many consecutive non-finite steps, or non-finite weights."""


class Checkpointer:
    """The files of the run in ``work_dir``; only the main process (``is_main``) writes them."""

    def __init__(self, work_dir: Path, is_main: bool = True) -> None:
        self.work_dir, self.is_main = Path(work_dir), is_main
        self.lock = WorkDirLock(self.work_dir)

    def open(self, cfg: Config) -> None:
        """Take the work dir for this run: create it, lock it, sweep stale temporaries, write ``config.yaml``."""
        if not self.is_main:
            return
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before the sweep: another run's temporaries are not stale
            remove_stale_temporaries(self.work_dir, RUN_FILES)
            save_config(cfg, self.work_dir / "config.yaml")
        except OSError as error:
            raise ConfigError(f"work_dir {self.work_dir} cannot be written ({error.filename}: {error.strerror}); "
                              f"choose a writable one with --work-dir") from None

    def close(self) -> None:
        self.lock.release()

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def save(self, name: str, checkpoint: Dict[str, Any], step: int) -> None:
        """Write ``checkpoint`` as ``name``, never with non-finite weights (``checkpoint["model"]``):
        those raise :class:`NonFiniteLossError` on every process instead, keeping the previous file."""
        broken = next((key for key, value in checkpoint["model"].items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if broken is not None:
            raise NonFiniteLossError(
                f"the model's weights became non-finite ({broken}) by step {step}; stopping without "
                f"writing {name}. {self.path('last.pt')} keeps the last finite weights. Lower optim.lr, set "
                f"train.grad_clip, or check the data.")
        if self.is_main:
            save_checkpoint(checkpoint, self.path(name))

    def resume(self, resume: Optional[str], cfg: Config, map_location: Any) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The checkpoint ``--resume`` names (``"auto"``: ``last.pt`` if there is one) and its path, after
        checking that ``cfg`` keeps every :data:`RESUME_KEYS` value it was trained with; None to start afresh."""
        path = resume_path(self.work_dir, resume)
        if path is None:
            return None
        checkpoint = load_checkpoint(path, map_location=map_location)
        saved = checkpoint.get("config")
        if isinstance(saved, dict):  # else a bare or foreign checkpoint: load_state_dict decides
            current = to_dict(cfg)
            for key in RESUME_KEYS:
                before, now = _lookup(saved, key), _lookup(current, key)
                if before is not _MISSING and before != now:
                    raise ConfigError(f"cannot resume from {path}: it was trained with {key}={before!r} and this "
                                      f"config has {key}={now!r}; resume with the same value, or start a new work dir")
        return path, checkpoint


_MISSING = object()


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at ``dotted`` in nested dicts; through a list, the list of each item's value."""
    head, _, rest = dotted.partition(".")
    if isinstance(tree, list):
        return [_lookup(item, dotted) for item in tree]
    if not isinstance(tree, dict) or head not in tree:
        return _MISSING
    return _lookup(tree[head], rest) if rest else tree[head]
