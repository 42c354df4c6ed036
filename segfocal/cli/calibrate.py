"""Fit a per-class decision calibration on a labelled split and store it in the checkpoint.

    segfocal calibrate --checkpoint CKPT [--config CFG] [--split val] [--metric miou] [--folds 2]
                       [--mode whole|slide] [--flip]

A bias per class, added to the logits before the argmax, is fitted on the split's images to
maximise ``--metric`` (``miou``, ``mean_accuracy``, ``mean_dice``, ``pixel_accuracy``, ``fwiou``, or
one class's ``iou.<class>``/``accuracy.<class>``/``dice.<class>``), with the same inference as
``segfocal eval`` (``eval.mode``, ``--mode``, ``--flip``). It prints the biases and the per-class IoU
of the raw decision, of the calibrated one on the pixels it was fitted on, and cross-fitted over
``--folds`` folds of images (each fold scored with the bias fitted on the others: the figure to
expect on new images).

The calibration is written into the checkpoint itself (under ``"calibration"``), by an atomic
rewrite that leaves the weights and every other entry as they were; ``eval``, ``predict``,
``Segmenter`` and ``export`` then apply it. In a run directory (one ``segfocal train`` made) the run's
lock is held meanwhile, so a training run cannot write the file at the same time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..text import counted
from .common import add_config_arguments, add_inference_arguments, checkpoint_and_config, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint (best.pt, last.pt) to calibrate")
    parser.add_argument("--split", help="the labelled split to fit on (default: data.val_split)")
    parser.add_argument("--metric", default="miou", help="the metric the biases maximise (default: miou)")
    parser.add_argument("--folds", type=int, default=2, help="folds of images for the cross-fitted estimate "
                                                             "(default: 2)")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    from ..config import ConfigError, class_names
    from ..data import build_loader
    from ..data.splits import run_dataset
    from ..engine.calibrate import check_storable, gather_pixels, store_calibration
    from ..engine.checkpoint import CheckpointError, load_checkpoint, remove_stale_temporaries
    from ..evaluation.calibration import calibrate, check_request
    from ..files import file_identity
    from ..engine.distributed import resolve_device
    from ..engine.precision import inference_precision
    from ..engine.restore import restore_model
    from ..engine.work_dir_lock import LOCK_NAME, WorkDirLock
    from ..evaluation.report import format_calibration

    path = Path(args.checkpoint)
    target = path.resolve()  # through a symlink, the file it names is calibrated (the link is kept)
    lock = WorkDirLock(target.parent)
    in_run_directory = (target.parent / LOCK_NAME).exists()
    if in_run_directory:  # no training run may write the checkpoint meanwhile
        lock.acquire()
    try:
        if in_run_directory:  # under the lock, a temporary of the checkpoint is a killed writer's
            remove_stale_temporaries(target.parent, [target.name])
        read_as = file_identity(target) if target.is_file() else None  # a missing file is named by the read
        contents, cfg = checkpoint_and_config(args)
        check_storable(path, contents)
        data = cfg.data
        if args.split is not None and not args.split.strip():
            raise ConfigError(f"--split {args.split!r} names no split; give one (default: data.val_split)")
        split = args.split or data.val_split
        names = class_names(data.class_names, data.num_classes)
        try:
            check_request(args.metric, args.folds, names)  # before the inference, which may take long
        except ValueError as error:
            raise ConfigError(str(error)) from None
        dataset = run_dataset(cfg, cfg.augment.val, split)
        dataset.validate(data.num_classes, data.ignore_index)
        # one image at a time: the split's logits, not a batch's activations, are what calibrating holds
        loader = build_loader(dataset, 1, shuffle=False, num_workers=data.num_workers, seed=cfg.seed, drop_last=False)
        device = resolve_device(cfg.device)
        model = restore_model(cfg, path, device, contents)
        del contents  # its optimiser state is not held through the inference (peak memory): read again to write
        started = time.perf_counter()
        pixels = gather_pixels(model, loader, cfg, device, inference_precision(cfg.train.amp, device),
                               progress=sys.stderr.isatty())
        inferred = time.perf_counter()
        try:
            calibration = calibrate(pixels, args.metric, names, split, args.folds)
        except ValueError as error:  # a split without pixels
            raise ConfigError(str(error)) from None
        fitted = time.perf_counter()
        if file_identity(target) != read_as:
            raise CheckpointError(f"{path} was replaced while it was being calibrated: the calibration, fitted to "
                                  f"the weights read before, is not written; calibrate the new file again")
        store_calibration(target, load_checkpoint(target), calibration)
    finally:
        lock.release()
    print(format_calibration(calibration, names))
    unit = "image" if cfg.data.patches is None else "tile"  # data.patches: the split's tiles are its items
    written = f"{path}" if target == path.absolute() else f"{path} (the file {target})"
    print(f"logits of {counted(len(pixels.images), unit)} in {inferred - started:.1f} s, fitted in "
          f"{fitted - inferred:.1f} s; wrote the calibration into {written}")
    return {"calibration": calibration}


main = command_main(sys.modules[__name__])
