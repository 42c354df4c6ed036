"""Score a folder of predicted masks, from any codebase, against a folder of ground-truth masks.

The metrics are the ones a checkpoint evaluation reports: the same :class:`ConfusionMatrix`
accumulation and the same :func:`segmentation_metrics`, so the numbers are comparable with
``segfocal eval --checkpoint``. Files are matched by stem (``a.png`` scores against ``a.bmp``);
every problem with the files raises :class:`~segfocal.data.DataError` naming the file(s).

Rules:

* Pixels whose ground truth is ``ignore_index`` are not scored, and their prediction is not read:
  a prediction may hold any value there (some codebases copy the void region into their output).
* Every scored pixel must be predicted as a class ``0..num_classes-1``. Any other prediction,
  ``ignore_index`` (e.g. 255) included, raises naming the file and the values: a prediction that
  abstains cannot be written into a ``[C, C]`` confusion matrix without either dropping the pixel
  (which would inflate the scores) or inventing a class for it. Map such pixels to a class first.
* Ground-truth values must be classes or ``ignore_index`` (:func:`~segfocal.data.check_mask_values`).

Masks are read one pair at a time with :func:`~segfocal.data.read_mask` (8/16-bit grey, palette
PNGs as their indices, RGB through a colour map); large ones (Zarr, ``.npy``, TIFFs above 2048 x 2048,
as ``segfocal predict`` writes them tile by tile) block by block through :mod:`segfocal.data.regions`;
nothing is kept but the ``[C, C]`` counts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import class_names as default_names
from ..data.errors import DataError
from ..data.folder import index_folder, listed
from ..data.masks import check_mask_values, read_mask
from ..data.patches import LARGE_IMAGE_SUFFIXES as MASK_SUFFIXES  # .npy and Zarr masks too
from ..data.regions import MaskRegion, blocks, read_in_blocks
from ..text import counted
from .confusion import ConfusionMatrix
from .counts import check_positive_int
from .metrics import segmentation_metrics
from .report import plot_confusion_matrix, write_json

PathLike = Union[str, "os.PathLike[str]"]
ColorMap = Optional[Sequence[Sequence[int]]]
_SHOWN_VALUES = 10


@dataclass
class MaskFolderResult:
    """What :func:`score_mask_folders` returns; ``metrics`` and ``confusion`` are exactly what a
    checkpoint evaluation's :class:`~segfocal.engine.evaluate.EvalResult` holds."""

    metrics: Dict[str, Any]  # segmentation_metrics(confusion)
    confusion: torch.Tensor  # int64 [C, C] on the CPU, rows true, columns predicted
    num_images: int  # mask pairs scored
    num_ignored: int  # pixels whose ground truth was ignore_index (not scored)
    pred_dir: Path
    gt_dir: Path
    ignore_index: Optional[int] = None


def score_mask_folders(
    pred_dir: PathLike,
    gt_dir: PathLike,
    num_classes: int,
    ignore_index: Optional[int] = None,
    color_map: ColorMap = None,
    pred_color_map: ColorMap = None,
    gt_remap: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> MaskFolderResult:
    """Segmentation metrics of the masks in ``pred_dir`` against those of the same stem in ``gt_dir``.

    ``num_classes``: classes ``0..num_classes-1``. ``ignore_index``: the ground-truth label of
    pixels left out of the scores (``None``: every pixel is scored). ``color_map`` (``color_map[i]``
    is the [r, g, b] of class ``i``) decodes RGB ground-truth masks; ``pred_color_map`` decodes RGB
    predictions and defaults to ``color_map``. Grey and palette masks need no colour map.
    ``gt_remap`` turns stored ground-truth values into train ids (a :class:`~segfocal.data.LabelRemap`
    of ``data.label_map``/``data.reduce_zero_label``, as training applied it); predictions are train ids.

    Raises :class:`~segfocal.data.DataError` (naming the files) for a missing folder, no ground
    truth, ground-truth masks without a prediction or predictions without a ground truth (the count
    and the first stems), two files of one stem in a folder, an unreadable mask, a size mismatch
    (both sizes, both paths), a prediction outside ``0..num_classes-1`` on a scored pixel and a
    ground-truth value that is neither a class nor ``ignore_index``. ``ValueError`` for a bad
    ``num_classes``/``ignore_index``.
    """

    check_positive_int("num_classes", num_classes)
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if pred_color_map is None:
        pred_color_map = color_map
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gts = index_folder(gt_dir, MASK_SUFFIXES, "ground-truth mask")
    preds = index_folder(pred_dir, MASK_SUFFIXES, "prediction mask")
    if not gts:
        raise DataError(f"no ground-truth masks ({', '.join(MASK_SUFFIXES)}) found in {gt_dir}", gt_dir)
    _check_pairing(gts, preds, gt_dir, pred_dir)

    # With no ignore_index, -1 can never reach the matrix: ground truth is checked to be 0..C-1.
    confusion = ConfusionMatrix(num_classes, ignore_index=-1 if ignore_index is None else ignore_index,
                                device="cpu")
    for stem, gt_path in gts.items():
        pred_path = preds[stem]
        for pred, gt, box in _blocks(pred_path, gt_path, pred_color_map, color_map):
            gt = (gt if gt_remap is None else gt_remap(gt)).astype(np.int64, copy=False)
            pred = pred.astype(np.int64, copy=False)
            try:
                _check_ground_truth(gt, gt_path, num_classes, ignore_index)
                _check_prediction(pred, gt, pred_path, gt_path, num_classes, ignore_index)
            except DataError as error:
                if box is None:
                    raise
                y0, y1, x0, x1 = box  # the count is this block's: the rest of the file is not read
                raise DataError(f"{error} (in the block of rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1}: a large "
                                f"mask is checked block by block)", error.path) from None
            confusion.update(torch.from_numpy(pred), torch.from_numpy(gt))

    if int(confusion.num_invalid) != 0:  # the checks above exclude it; a bug if it ever happens
        raise RuntimeError(f"{int(confusion.num_invalid)} pixels were excluded as invalid after the checks")
    matrix = confusion.matrix.cpu()
    return MaskFolderResult(
        metrics=segmentation_metrics(matrix), confusion=matrix, num_images=len(gts),
        num_ignored=int(confusion.num_ignored) if ignore_index is not None else 0,
        pred_dir=pred_dir, gt_dir=gt_dir, ignore_index=ignore_index,
    )


def write_mask_folder_report(result: MaskFolderResult, out: PathLike,
                             class_names: Optional[Sequence[str]] = None) -> Tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/confusion_matrix.png`` as a checkpoint evaluation does.

    ``metrics.json`` holds ``{"metrics": ..., "pred_dir", "gt_dir", "ignore_index", "num_images",
    "num_ignored_pixels", "class_names", "confusion_matrix"}`` (:func:`write_json`; NaN → null);
    the PNG is :func:`plot_confusion_matrix` with each row normalised. ``class_names`` defaults to
    :func:`~segfocal.evaluation.report.class_names`. Returns the two paths. Print the table with
    ``format_table(result.metrics, class_names)``.
    """
    num_classes = result.confusion.shape[0]
    names = default_names(class_names, num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"pred_dir": str(result.pred_dir), "gt_dir": str(result.gt_dir), "ignore_index": result.ignore_index,
             "num_images": result.num_images, "num_ignored_pixels": result.num_ignored, "class_names": names,
             "confusion_matrix": result.confusion.tolist()}
    json_path = write_json(result.metrics, out / "metrics.json", extra=extra)
    png_path = plot_confusion_matrix(result.confusion, names, out / "confusion_matrix.png")
    return json_path, png_path


def _blocks(pred_path: Path, gt_path: Path, pred_color_map: ColorMap,
            gt_color_map: ColorMap) -> Iterator[Tuple[np.ndarray, np.ndarray, Optional[Tuple[int, int, int, int]]]]:
    """(prediction, stored ground truth, box) of one pair, of one size: whole (box None), or block by block
    when either file is large (:func:`~segfocal.data.regions.read_in_blocks`: Zarr, ``.npy``, a TIFF of more
    than 2048 x 2048), each block's (y0, y1, x0, x1)."""
    if read_in_blocks(pred_path) or read_in_blocks(gt_path):
        pred, gt = MaskRegion(pred_path, pred_color_map), MaskRegion(gt_path, gt_color_map)
        pairs = ((pred.read(*box), gt.read(*box), box) for box in blocks(gt)) if pred.shape == gt.shape else None
        shapes = pred.shape, gt.shape
    else:
        pred_mask, gt_mask = read_mask(pred_path, pred_color_map), read_mask(gt_path, gt_color_map)
        pairs, shapes = [(pred_mask, gt_mask, None)], (pred_mask.shape, gt_mask.shape)
    if shapes[0] != shapes[1]:
        raise DataError(
            f"{pred_path}: prediction size {shapes[0][1]}x{shapes[0][0]} (WxH) differs from the size "
            f"{shapes[1][1]}x{shapes[1][0]} of its ground truth {gt_path}", pred_path)
    yield from pairs


# -- checks -------------------------------------------------------------------------------------

def _check_pairing(gts: Dict[str, Path], preds: Dict[str, Path], gt_dir: Path, pred_dir: Path) -> None:
    """One DataError listing both kinds of unmatched stems, so a naming scheme that differs shows at once."""

    no_pred = [stem for stem in gts if stem not in preds]
    no_gt = [stem for stem in preds if stem not in gts]
    problems = []
    if no_pred:
        problems.append(f"{len(no_pred)} ground-truth masks in {gt_dir} have no prediction in {pred_dir}: "
                        f"{listed(no_pred)}")
    if no_gt:
        problems.append(f"{len(no_gt)} predictions in {pred_dir} have no ground truth in {gt_dir}: {listed(no_gt)}")
    if problems:
        first = gts[no_pred[0]] if no_pred else preds[no_gt[0]]
        raise DataError("; ".join(problems) + " (files are matched by name without the suffix)", first)


def _check_ground_truth(gt: np.ndarray, path: Path, num_classes: int, ignore_index: Optional[int]) -> None:

    if ignore_index is not None:
        check_mask_values(gt, path, num_classes, ignore_index)
        return
    bad = (gt < 0) | (gt >= num_classes)
    if bad.any():
        values = np.unique(gt[bad])
        hint = f"; pass --ignore-index {int(values[0])} if it marks unlabelled pixels" if len(values) == 1 else ""
        _raise_values(path, gt[bad], "label values", f"outside 0..{num_classes - 1} (no ignore_index is set{hint})")


def _check_prediction(pred: np.ndarray, gt: np.ndarray, pred_path: Path, gt_path: Path, num_classes: int,
                      ignore_index: Optional[int]) -> None:
    if pred.size == 0 or (int(pred.min()) >= 0 and int(pred.max()) < num_classes):
        return
    bad = (pred < 0) | (pred >= num_classes)
    if ignore_index is not None:
        bad &= gt != ignore_index  # the prediction of an unscored pixel is not read
    if not bad.any():
        return
    hint = ""
    if ignore_index is not None and bool((pred[bad] == ignore_index).any()):
        hint = (f"; a prediction must give every scored pixel a class: ignore_index={ignore_index} is accepted "
                f"only where the ground truth ({gt_path}) is ignore_index")
    _raise_values(pred_path, pred[bad], "predicted values",
                  f"outside 0..{num_classes - 1} on pixels scored against {gt_path}{hint}")


def _raise_values(path: Path, values: np.ndarray, what: str, where: str) -> None:

    unique = np.unique(values)
    shown = ", ".join(str(v) for v in unique[:_SHOWN_VALUES].tolist()) + (" ..." if len(unique) > _SHOWN_VALUES else "")
    raise DataError(f"{path}: {counted(values.size, 'pixel', 'has/have')} {what} [{shown}] {where}", path)
