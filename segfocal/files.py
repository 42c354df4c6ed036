"""Files replaced atomically: written beside their target, then renamed onto it; and the names a file goes by.

Readers see the old file or the new one, never half of one; a symlink at the target is replaced
itself, never written through; a failure deletes the temporary and leaves the target as it was.
A command that must not write over its inputs compares the :func:`entry_name` of each file it
would write with the :func:`names_of` each input. :func:`cache_folder` is where segfocal keeps what it
builds once (the compiled CPU kernel, class indexes).
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Set, Tuple, Union


@contextlib.contextmanager
def replaced_atomically(path: Union[str, Path], durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` when the block succeeds.

    The temporary is a hidden ``.<name>.*.tmp`` in the same folder (``os.replace`` is atomic only
    within one file system) with the mode of the file it replaces, or the one ``open()`` would give a
    new file (a private or write-protected file stays so). ``durable=True`` also flushes the
    data and the rename to disk (fsync), so a power cut cannot leave an empty file under the name.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode_for(path))  # not mkstemp's 0o600: others may read what we make
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def file_identity(path: Union[str, Path]) -> Tuple[int, int, int, int]:
    """What changes when the file at ``path`` is rewritten or replaced: its device, inode, size and
    modification time (nanoseconds)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def entry_name(path: Union[str, Path]) -> Path:
    """The absolute name of the folder entry that writing ``path`` replaces: its folder resolved
    (symlinked or relative spellings of a folder give one name), its own name kept, since
    :func:`replaced_atomically` replaces a symlink there and never follows it."""
    path = Path(path)
    return path.parent.resolve() / path.name


def names_of(path: Union[str, Path]) -> Set[Path]:
    """The absolute names by which ``path`` reaches a file: its :func:`entry_name` and, through any
    symlinks, the file itself; a write to one of them replaces what ``path`` reads."""
    return {entry_name(path), Path(path).resolve()}


def mode_for(path: Path) -> int:
    """The mode of the file at ``path``, or the one ``open()`` gives a new file: 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (POSIX); a no-op where directories cannot be opened."""
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


def cache_folder() -> Path:
    """segfocal's cache: ``$SEGFOCAL_CACHE``, else ``segfocal`` in ``$XDG_CACHE_HOME`` (default ``~/.cache``);
    absolute, since a library loaded from it must not be named by a bare file name (dlopen would search the
    system's path for it)."""
    base = os.environ.get("SEGFOCAL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segfocal"
    return Path(base).expanduser().absolute()
