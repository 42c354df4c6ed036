"""Where each class lies in a split's masks: the index class-aware patch sampling draws crop centres from.

Per image and class it holds the pixel count and a uniform sample of at most ``points`` pixel positions
(row * width + column), kept while the masks are scanned block by block (a bottom-k sample by random keys,
so the whole mask is never in memory). It is built once and cached as an ``.npz`` file (read with
``allow_pickle=False``: no pickle, no code) named after the split (its mask paths and the options that
change the labels); the file records the masks' sizes and modification times and a SHA-256 of its arrays,
and is rebuilt when the masks change or the file is corrupt. It is written atomically, so two runs
building it at once each leave a whole file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..files import replaced_atomically
from .errors import DataError
from .masks import class_histogram
from .regions import blocks

FORMAT = 2  # bump when the file's content changes meaning (2: an ignore_index inside the class range is not indexed)
_SEED = 20261203  # the index's own random keys: the same file whoever builds it


@dataclass
class ClassIndex:
    """``counts`` int64 [images, classes]; the positions of class ``c`` in image ``i`` are
    ``positions[starts[i, c]:starts[i, c] + lengths[i, c]]`` (int64, row * width + column)."""

    counts: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray

    def positions_of(self, image: int, cls: int) -> np.ndarray:
        start = self.starts[image, cls]
        return self.positions[start:start + self.lengths[image, cls]]

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"counts": self.counts, "starts": self.starts, "lengths": self.lengths, "positions": self.positions}


def build_class_index(masks: Sequence[Any], num_classes: int, points: int, ignore_index: int) -> ClassIndex:
    """The index of ``masks``: objects with ``shape`` (height, width), ``chunks`` and ``read(y0, y1, x0, x1)``
    giving (h, w) train ids (values outside ``0..num_classes-1`` and ``ignore_index``, which may lie inside that
    range, are not indexed)."""
    counts = np.zeros((len(masks), num_classes), dtype=np.int64)
    kept: List[List[np.ndarray]] = []
    for number, mask in enumerate(masks):
        rng = np.random.default_rng([_SEED, number])
        width = mask.shape[1]
        keys = [np.empty(0)] * num_classes
        found = [np.empty(0, dtype=np.int64)] * num_classes
        for y0, y1, x0, x1 in blocks(mask):
            labels = mask.read(y0, y1, x0, x1)
            histogram = class_histogram(labels, num_classes, ignore_index)
            counts[number] += histogram
            for cls in np.flatnonzero(histogram).tolist():
                rows, cols = np.nonzero(labels == cls)
                keys[cls] = np.concatenate([keys[cls], rng.random(len(rows))])
                found[cls] = np.concatenate([found[cls], (rows + y0).astype(np.int64) * width + cols + x0])
                if len(keys[cls]) > points:
                    smallest = np.argpartition(keys[cls], points)[:points]
                    keys[cls], found[cls] = keys[cls][smallest], found[cls][smallest]
        kept.append([np.sort(positions) for positions in found])
    lengths = np.array([[len(positions) for positions in row] for row in kept], dtype=np.int64).reshape(counts.shape)
    starts = (np.cumsum(lengths.ravel()) - lengths.ravel()).reshape(lengths.shape)
    flat_positions = [positions for row in kept for positions in row]
    positions = np.concatenate(flat_positions) if flat_positions else np.empty(0, dtype=np.int64)
    return ClassIndex(counts, starts, lengths, positions.astype(np.int64))


def cached_class_index(folder: Path, identity: Dict[str, Any], files: Sequence[Path],
                       build: Callable[[], ClassIndex]) -> ClassIndex:
    """The index cached in ``folder`` for the split ``identity`` (JSON-able: its masks and label options),
    rebuilt with ``build`` and written atomically when missing, stale (``files`` changed size or time) or corrupt."""
    name = hashlib.sha256(json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()).hexdigest()[:24]
    path = folder / f"class_index-{name}.npz"
    fingerprint = _fingerprint(files)
    cached = _load(path, fingerprint)
    if cached is not None:
        return cached
    with _writing(path):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # a folder it cannot write fails now, not after the scan
            pass
    index = build()
    with _writing(path), replaced_atomically(path) as handle:
        np.savez(handle, fingerprint=np.array(fingerprint), digest=np.array(_digest(index, fingerprint)),
                 **index.arrays())
    return index


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError in the block becomes a DataError naming the index ``path`` and the key that moves it."""
    try:
        yield
    except OSError as error:
        raise DataError(f"cannot write the class index {path}: {error}; set data.patches.index_dir to a folder "
                        f"you can write", path) from None


def _load(path: Path, fingerprint: str) -> Optional[ClassIndex]:
    """The index at ``path`` if it is whole and of these files, else None (a corrupt one with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            index = ClassIndex(*(stored[key] for key in ("counts", "starts", "lengths", "positions")))
            recorded, digest = str(stored["fingerprint"]), str(stored["digest"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, MemoryError) as error:  # Memory: a vast header
        warnings.warn(f"the class index {path} is unreadable ({type(error).__name__}: {error}); rebuilding it",
                      stacklevel=3)
        return None
    if recorded != fingerprint:
        return None  # the masks changed since: rebuild quietly
    if digest != _digest(index, fingerprint):
        warnings.warn(f"the class index {path} does not match its checksum; rebuilding it", stacklevel=3)
        return None
    return index


def _digest(index: ClassIndex, fingerprint: str) -> str:
    sha = hashlib.sha256(fingerprint.encode())
    for key, array in index.arrays().items():
        sha.update(key.encode() + str(array.shape).encode() + np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return sha.hexdigest()


def _fingerprint(files: Sequence[Path]) -> str:
    """The sizes and modification times of ``files`` (every file inside a Zarr folder), hashed."""
    sha = hashlib.sha256()
    for path in files:
        members = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for member in members:
            stat = os.stat(member)
            sha.update(f"{member}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()
