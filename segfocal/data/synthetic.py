"""A generated, strongly class-imbalanced segmentation dataset: no download, a few seconds to make.

Layout: ``root/{train,val,test}/{images,masks}/NNNN.png`` (RGB images, 8-bit grey masks) and
``root/meta.json`` (the parameters it was made with, class names, pixel counts per split).

Class 0 is a textured background (smooth noise and stripes) covering most pixels; the other
classes are shapes drawn in their own colour, jittered per object and noisy per pixel so that
neighbouring colours overlap. Their pixel shares fall steeply, as in driving scenes (road vs.
pedestrian): about 70% background, 19% slab, 6% ellipse, 2% triangle, 0.8% line, 0.3% square
(rarest/most common about 1/200); classes 6-7, when asked for, are small dots and crosses
(~0.3% each); fewer classes keep the first ones. Noisy blotches and border bands (~2% of pixels)
carry ``ignore_index``. A small UNet picks up the common classes within a few CPU minutes; the
rare ones are the ones a class-balanced loss is meant to help with.

Every image comes from its own random stream, seeded by (seed, split, index): the same
parameters always give the same bytes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import cv2
import numpy as np

from ..config import ConfigError, SyntheticConfig
from .errors import DataError

SYNTHETIC_CLASS_NAMES: Tuple[str, ...] = (
    "background", "slab", "ellipse", "triangle", "line", "square", "dot", "cross",
)
GENERATOR = "segfocal.data.synthetic"
VERSION = 1  # bump when the drawing changes, so existing datasets are regenerated
SPLITS = ("train", "val", "test")
_KINDS = ("images", "masks")
_SHOWN = 5  # how many unexpected entries an error message lists

# Base RGB colour per shape class; each object jitters it and pixel noise is added on top.
_COLOURS = {
    1: (82, 84, 98),     # slab: dark blue-grey, close to the background's dark end
    2: (176, 72, 62),    # ellipse: brick red
    3: (72, 148, 78),    # triangle: green
    4: (78, 104, 196),   # line: blue
    5: (214, 192, 64),   # square: yellow
    6: (184, 82, 182),   # dot: magenta
    7: (72, 184, 184),   # cross: cyan
}


def synthetic_class_names(num_classes: int) -> List[str]:
    """Names of the first ``num_classes`` synthetic classes."""
    return list(SYNTHETIC_CLASS_NAMES[:num_classes])


def ensure_synthetic_dataset(root: Path, cfg: SyntheticConfig, num_classes: int, ignore_index: int) -> None:
    """Generate the dataset under ``root`` unless ``root/meta.json`` records these very parameters.

    Generation happens in a temporary sibling folder that replaces ``root`` only once complete,
    under a lock file, so a crash never leaves a half dataset and concurrent callers (one per
    DDP rank) generate it once. An existing ``root`` is replaced only when it is empty or holds
    nothing but what the generator wrote for the parameters its ``meta.json`` records; otherwise
    (a user's file in it, a corrupt ``meta.json``, a symbolic link) :class:`DataError` is raised.
    """
    root = Path(root)
    params = _params(cfg, num_classes, ignore_index)
    if _stored_params(root) == params:
        return
    _check(params)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if _stored_params(root) == params:  # another process made it while we waited
            return
        _check_replaceable(root)
        staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the dataset
        try:
            _generate(staging, params)
            _replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _params(cfg: SyntheticConfig, num_classes: int, ignore_index: int) -> Dict[str, Any]:
    return {
        "generator": GENERATOR, "version": VERSION, "num_classes": int(num_classes), "ignore_index": int(ignore_index),
        "num_train": int(cfg.num_train), "num_val": int(cfg.num_val), "num_test": int(cfg.num_test),
        "image_size": int(cfg.image_size), "seed": int(cfg.seed),
    }


def _check(params: Dict[str, Any]) -> None:
    classes, ignore = params["num_classes"], params["ignore_index"]
    if not 2 <= classes <= len(SYNTHETIC_CLASS_NAMES):
        raise ConfigError(f"data.num_classes={classes}: the synthetic dataset has "
                          f"2..{len(SYNTHETIC_CLASS_NAMES)} classes")
    if not (classes <= ignore <= 255):
        raise ConfigError(f"data.ignore_index={ignore}: the synthetic masks are 8-bit, so it must be in "
                          f"{classes}..255 (outside the classes 0..{classes - 1})")
    if params["image_size"] < 32:
        raise ConfigError(f"data.synthetic.image_size={params['image_size']}: must be at least 32")
    for split in SPLITS:
        if params[f"num_{split}"] < 0:
            raise ConfigError(f"data.synthetic.num_{split}={params[f'num_{split}']}: must not be negative")


def _stored_params(root: Path) -> Any:
    """The parameters ``root/meta.json`` records; None when it is missing or unreadable."""
    try:
        return _read_params(root / "meta.json")
    except (OSError, ValueError):
        return None


def _read_params(meta: Path) -> Any:
    """The "params" entry of the ``meta.json`` at ``meta``; OSError/ValueError when unreadable or not JSON."""
    data = json.loads(meta.read_text())
    return data.get("params") if isinstance(data, dict) else None


def _sample_file(split: str, kind: str, index: int) -> str:
    """The path, relative to the root, where :func:`_generate` writes an image or mask (``kind``)."""
    return f"{split}/{kind}/{index:04d}.png"


def _layout(params: Dict[str, Any]) -> Tuple[Set[str], Set[str]]:
    """The (folders, files) :func:`_generate` writes for ``params``, as POSIX paths relative to the root."""
    folders = set(SPLITS) | {f"{split}/{kind}" for split in SPLITS for kind in _KINDS}
    files = {"meta.json"} | {_sample_file(split, kind, index)
                             for split in SPLITS for kind in _KINDS for index in range(params[f"num_{split}"])}
    return folders, files


def _check_replaceable(root: Path) -> None:
    """Raise DataError unless ``root`` is missing, empty, or holds only what the generator wrote.

    Regenerating replaces the whole folder, so anything else in it (a user's images, notes, runs)
    would be lost; what the generator wrote is known from the parameters ``meta.json`` records.
    """
    if root.is_symlink():
        raise _refusal(root, f"{root} is a symbolic link (to {os.readlink(root)}); set data.root to the folder "
                             f"it points to, or remove the link")
    if not root.exists():
        return
    if not root.is_dir():
        raise _refusal(root, f"{root} exists and is not a folder")
    if not any(root.iterdir()):
        return
    unexpected = _unexpected_entries(root, "", *_recorded_layout(root))
    if unexpected:
        more = f" and {len(unexpected) - _SHOWN} more" if len(unexpected) > _SHOWN else ""
        raise _refusal(root, f"{root} holds files the synthetic-data generator did not write: "
                             f"{', '.join(unexpected[:_SHOWN])}{more}", root / unexpected[0])


def _recorded_layout(root: Path) -> Tuple[Set[str], Set[str]]:
    """The (folders, files) the generator wrote into ``root``, by the parameters in its ``meta.json``.

    Raises DataError when ``meta.json`` is missing, corrupt or not the generator's.
    """
    meta = root / "meta.json"
    try:
        params = _read_params(meta)
    except OSError:
        params = None
    except ValueError as error:
        raise _refusal(root, f"{meta} is not valid JSON ({error})", meta) from None
    if not isinstance(params, dict) or params.get("generator") != GENERATOR:
        raise _refusal(root, f"{root} exists and is not a synthetic dataset made by segfocal (no matching meta.json)")
    try:
        return _layout(params)
    except (KeyError, TypeError) as error:
        raise _refusal(root, f"{meta} does not record the synthetic parameters ({error!r})", meta) from None


def _unexpected_entries(folder: Path, prefix: str, folders: Set[str], files: Set[str]) -> List[str]:
    """Paths under ``folder`` (``prefix`` + name) not in ``folders``/``files``, symbolic links included.

    An unexpected folder is listed once (with a trailing "/"), not its contents.
    """
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    found: List[str] = []
    for entry in entries:
        path = prefix + entry.name
        if entry.is_dir(follow_symlinks=False) and path in folders:
            found.extend(_unexpected_entries(Path(entry.path), path + "/", folders, files))
        elif not (entry.is_file(follow_symlinks=False) and path in files):
            found.append(path + ("/" if entry.is_dir() else ""))
    return found


def _refusal(root: Path, reason: str, path: Any = None) -> DataError:
    """The error for a ``root`` that regenerating the synthetic set would delete; ``path`` is the entry at fault."""
    return DataError(f"{reason}; refusing to overwrite {root} with a regenerated synthetic dataset, as that deletes "
                     f"everything in it. Point data.root elsewhere, or move what you want to keep out of {root} "
                     f"(an empty folder is filled).", path or root)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock, generation is still atomic
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(staging: Path, root: Path) -> None:
    """Move the finished ``staging`` folder to ``root``, removing an older dataset there."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)
    os.replace(staging, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _generate(folder: Path, params: Dict[str, Any]) -> None:
    """Write every split's images and masks to ``folder``, then ``meta.json`` last."""
    classes, ignore, size = params["num_classes"], params["ignore_index"], params["image_size"]
    counts: Dict[str, List[int]] = {}
    ignored: Dict[str, int] = {}
    for split_index, split in enumerate(SPLITS):
        for kind in _KINDS:
            (folder / split / kind).mkdir(parents=True)
        histogram = np.zeros(256, dtype=np.int64)
        for index in range(params[f"num_{split}"]):
            rng = np.random.default_rng([params["seed"], split_index, index])
            image, mask = make_sample(rng, size, classes, ignore)
            image_file, mask_file = (folder / _sample_file(split, kind, index) for kind in _KINDS)
            if not (cv2.imwrite(str(image_file), image[..., ::-1]) and cv2.imwrite(str(mask_file), mask)):
                raise DataError(f"cannot write the synthetic dataset to {folder / split}", folder / split)
            histogram += np.bincount(mask.ravel(), minlength=256)
        counts[split] = histogram[:classes].tolist()
        ignored[split] = int(histogram[ignore])
    meta = {"params": params, "class_names": synthetic_class_names(classes), "pixel_counts": counts,
            "ignore_pixels": ignored}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_sample(
    rng: np.random.Generator, size: int, num_classes: int, ignore_index: int
) -> Tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 [size, size, 3], mask uint8 [size, size]) pair drawn from ``rng``."""
    shade = _smooth_noise(rng, size, cells=int(rng.integers(3, 8)))
    image = _background(rng, size, shade)
    mask = np.zeros((size, size), dtype=np.uint8)
    for cls in range(1, num_classes):
        for points in _SHAPES[cls](rng, size):
            layer = np.zeros((size, size), dtype=np.uint8)
            _draw(layer, points)
            selected = layer.astype(bool)
            colour = np.asarray(_COLOURS[cls], dtype=np.float32) + rng.normal(0.0, 20.0, 3).astype(np.float32)
            image[selected] = colour + 0.35 * shade[selected, None]
            mask[selected] = cls
    _ignore_regions(rng, image, mask, ignore_index)
    image += rng.normal(0.0, 9.0, image.shape).astype(np.float32)
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-12.0, 12.0)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] * 40: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) * 40.0


def _background(rng: np.random.Generator, size: int, shade: np.ndarray) -> np.ndarray:
    """Class 0's texture: a jittered khaki-grey base, smooth shading, optional stripes."""
    base = np.asarray([122, 116, 100], dtype=np.float32) + rng.normal(0.0, 14.0, 3).astype(np.float32)
    image = base + shade[..., None] * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    if rng.random() < 0.6:
        angle, period = rng.uniform(0, np.pi), rng.uniform(5.0, 16.0)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi)
        image += (rng.uniform(6.0, 18.0) * np.sin(phase))[..., None]
    return image.astype(np.float32)


# Shape generators: each returns a list of shapes, a shape being ("poly", points) or
# ("line", (p0, p1, thickness)) in pixel coordinates.
def _slabs(rng: np.random.Generator, size: int) -> list:
    if rng.random() < 0.1:
        return []
    centre = (rng.uniform(0.2, 0.8) * size, rng.uniform(0.25, 0.75) * size)
    box = ((centre[0], centre[1]), (1.6 * size, rng.uniform(0.14, 0.32) * size), rng.uniform(-25, 25))
    return [("poly", cv2.boxPoints(box))]


def _ellipses(rng: np.random.Generator, size: int) -> list:
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(0.075, 0.16) * size
        b = a * rng.uniform(0.5, 1.0)
        centre = rng.uniform(0.1, 0.9, 2) * size
        angle = rng.uniform(0, 360)
        points = cv2.ellipse2Poly((int(centre[0]), int(centre[1])), (int(a), int(b)), int(angle), 0, 360, 10)
        shapes.append(("poly", points))
    return shapes


def _triangles(rng: np.random.Generator, size: int) -> list:
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.06, 0.1) * size
        centre = rng.uniform(0.1, 0.9, 2) * size
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        shapes.append(("poly", centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)))
    return shapes


def _lines(rng: np.random.Generator, size: int) -> list:
    shapes = []
    for _ in range(int(rng.integers(0, 3))):
        start = rng.uniform(0.05, 0.95, 2) * size
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.7) * size
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        shapes.append(("line", (start, end, int(rng.integers(1, 3)))))
    return shapes


def _squares(rng: np.random.Generator, size: int) -> list:
    shapes = []
    for _ in range(int(rng.integers(0, 3))):
        side = rng.integers(3, 7) * size / 96
        corner = rng.uniform(0.05, 0.9, 2) * size
        shapes.append(("poly", corner + np.array([[0, 0], [side, 0], [side, side], [0, side]])))
    return shapes


def _dots(rng: np.random.Generator, size: int) -> list:
    """Class 6: up to two filled discs 4-8 pixels across."""
    shapes = []
    for _ in range(int(rng.integers(0, 3))):
        centre = rng.uniform(0.05, 0.95, 2) * size
        radius = rng.uniform(2.0, 4.0) * size / 96
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        shapes.append(("poly", centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)))
    return shapes


def _crosses(rng: np.random.Generator, size: int) -> list:
    """Class 7: up to two plus signs with arms of 3-6 pixels, one pixel thick."""
    shapes = []
    for _ in range(int(rng.integers(0, 3))):
        centre = rng.uniform(0.05, 0.95, 2) * size
        arm = rng.uniform(3.0, 6.0) * size / 96
        shapes.append(("line", (centre - [arm, 0], centre + [arm, 0], 1)))
        shapes.append(("line", (centre - [0, arm], centre + [0, arm], 1)))
    return shapes


_SHAPES = (None, _slabs, _ellipses, _triangles, _lines, _squares, _dots, _crosses)


def _draw(layer: np.ndarray, shape: tuple) -> None:
    kind, data = shape
    if kind == "poly":
        cv2.fillPoly(layer, [np.round(np.asarray(data)).astype(np.int32)], 1, lineType=cv2.LINE_8)
    else:
        start, end, thickness = data
        p0 = tuple(int(round(v)) for v in start)
        p1 = tuple(int(round(v)) for v in end)
        cv2.line(layer, p0, p1, 1, thickness=thickness, lineType=cv2.LINE_8)


def _ignore_regions(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, ignore_index: int) -> None:
    """Unlabelled pixels: a few noisy blotches and, sometimes, a border band, marked ``ignore_index``."""
    size = mask.shape[0]
    layer = np.zeros_like(mask)
    for _ in range(int(rng.integers(0, 4))):
        centre = tuple(int(v) for v in rng.uniform(0, size, 2))
        axes = tuple(int(v) for v in rng.uniform(0.03, 0.07, 2) * size)
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    if rng.random() < 0.4:
        width = int(rng.integers(2, 4))
        side = int(rng.integers(0, 4))
        band = [np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]][side]
        layer[band] = 1
    selected = layer.astype(bool)
    image[selected] = rng.uniform(40, 210) + rng.normal(0.0, 30.0, (int(selected.sum()), 3)).astype(np.float32)
    mask[selected] = ignore_index
