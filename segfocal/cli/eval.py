"""Evaluate a checkpoint, or masks predicted by any model: mIoU, per-class IoU/accuracy/Dice, pixel
accuracy, confusion matrix.

    segfocal eval --checkpoint CKPT [--config CFG] [--split test] [--auroc] [--mode whole|slide] [--flip]
                  [--no-calibration] [--output DIR]
    segfocal eval --pred DIR --gt DIR (--num-classes N [--ignore-index I] | --config CFG) [--output DIR]

Prints a per-class table and writes ``metrics.json`` and ``confusion_matrix.png`` to ``--output``
(default: ``eval_<split>/`` beside the checkpoint, or ``eval_masks/`` beside ``--pred``). The
checkpoint may be one the trainer wrote (its saved config is used unless ``--config`` is given)
or a bare model state dict (``--config`` needed); a dataset without a test split is scored on its
val split, with a note. A checkpoint calibrated by ``segfocal calibrate`` is scored twice, raw and
with its calibration (``metrics.json`` holds both, the latter under ``"calibrated"``), unless
``--no-calibration``. With ``--pred``/``--gt``, two folders of masks are matched by file stem and
scored with the same metrics (at most :data:`MAX_CLASSES` classes); pixels whose ground truth is the
ignore index are not scored.

Nothing is written among the masks: an ``--output`` that is, or lies inside, ``--pred``, ``--gt`` or
the split's image or mask folder is refused, as is one that is a file, before the checkpoint is read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, class_names
from ..evaluation import format_table, plot_confusion_matrix, write_json
from ..text import counted
from .common import (add_calibration_argument, add_config_arguments, add_inference_arguments, add_output_argument,
                     calibration_from_args, check_output_folder, checkpoint_and_config, command_main,
                     config_from_args)

#: The most classes ``--pred``/``--gt`` scoring takes. Memory and time bound it, not the code (an int64 cell index
#: would allow 3e9 classes): the C x C confusion matrix goes into metrics.json and its plot, which at 2048 classes
#: took 16 s and 1.6 GB (38 MB of JSON), at 4096 45 s and 2.8 GB, on a 2-core VM.
MAX_CLASSES = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", help="trainer checkpoint (last.pt/best.pt) or state-dict file")
    parser.add_argument("--split", help="dataset split (default: data.test_split; data.val_split if the dataset "
                                        "has no test split)")
    add_inference_arguments(parser)
    add_calibration_argument(parser)
    parser.add_argument("--auroc", action="store_true", help="also per-class one-vs-rest AUROC of the softmax scores")
    parser.add_argument("--pred", help="a folder of predicted masks to score instead of a checkpoint")
    parser.add_argument("--gt", help="the folder of ground-truth masks for --pred")
    parser.add_argument("--num-classes", type=int, help="with --pred and no --config: the number of classes")
    parser.add_argument("--ignore-index", type=int, help="with --pred and no --config: the label not scored")
    add_output_argument(parser, "output directory")


def run(args: argparse.Namespace) -> dict:
    if (args.checkpoint is None) == (args.pred is None):
        raise ConfigError("give either --checkpoint (evaluate a model) or --pred and --gt (score masks)")
    return score_masks(args) if args.pred else evaluate_checkpoint(args)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    from ..data import build_loader
    from ..data.splits import run_dataset
    from ..engine.distributed import resolve_device
    from ..engine.evaluate import evaluate
    from ..engine.precision import inference_precision
    from ..engine.restore import restore_model

    if args.output:
        check_output_folder(Path(args.output), {})  # before the checkpoint is read
    contents, cfg = checkpoint_and_config(args)
    data = cfg.data
    split = args.split or default_split(cfg)
    device = resolve_device(cfg.device)
    dataset = run_dataset(cfg, cfg.augment.val, split)
    out = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent / f"eval_{split}"
    check_output_folder(out, {"the split's image folder": dataset.image_folder,
                              "the split's mask folder": dataset.mask_folder})
    dataset.validate(data.num_classes, data.ignore_index)
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=data.num_workers, seed=cfg.seed,
                          drop_last=False)
    calibration = calibration_from_args(args, contents, cfg)
    model = restore_model(cfg, args.checkpoint, device, contents)
    result = evaluate(model, loader, cfg.eval, data.num_classes, data.ignore_index, device,
                      inference_precision(cfg.train.amp, device), metrics=("auroc",) if args.auroc else (),
                      bias=None if calibration is None else calibration.tensor())
    names = class_names(data.class_names, data.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"checkpoint": str(args.checkpoint), "split": split, "num_images": len(dataset.samples),  # not tiles
             "class_names": names, "confusion_matrix": result.confusion.tolist()}
    if result.auroc is not None:
        extra["auroc"] = result.auroc
    if result.calibrated is not None:
        extra["calibrated"] = {"metrics": result.calibrated.metrics,
                               "confusion_matrix": result.calibrated.confusion.tolist(),
                               "calibration": calibration.to_dict()}
    write_json(result.metrics, out / "metrics.json", extra=extra)
    plot_confusion_matrix(result.confusion, names, out / "confusion_matrix.png")
    print(f"{counted(len(dataset.samples), 'image')} of split '{split}', checkpoint {args.checkpoint}")
    print(("raw decision (argmax of the logits):\n" if result.calibrated else "") + format_table(result.metrics, names))
    if result.calibrated is not None:
        print(f"\ncalibrated decision (fitted for {calibration.metric} on split '{calibration.split}'):")
        print(format_table(result.calibrated.metrics, names))
    if result.auroc is not None:
        print("AUROC: " + ", ".join(f"{name} {value:.4f}" for name, value in zip(names, result.auroc)))
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return {"metrics": result.metrics, "out": out}


def default_split(cfg) -> str:
    """``data.test_split``, or ``data.val_split`` with a note on stderr when the dataset has no test split."""
    from ..data.splits import has_split

    data = cfg.data
    if has_split(cfg, data.test_split) or not has_split(cfg, data.val_split):
        return data.test_split  # a missing val split too: the error names the test split's folder
    print(f"note: {data.root} has no '{data.test_split}' split; evaluating split '{data.val_split}' "
          f"(--split chooses another)", file=sys.stderr)
    return data.val_split


def score_masks(args: argparse.Namespace) -> dict:
    """``--pred``/``--gt``: the classes, ignore index, names and colour map from ``--config`` or the flags."""
    from ..data import LabelRemap
    from ..evaluation import score_mask_folders, write_mask_folder_report

    if args.gt is None:
        raise ConfigError("--pred needs --gt, the folder of ground-truth masks")
    if args.config:
        data = config_from_args(args).data
        num_classes, ignore_index, names, color_map = data.num_classes, data.ignore_index, data.class_names, data.color_map
        gt_remap = LabelRemap(data.label_map, data.reduce_zero_label, data.ignore_index)  # as training read them
    elif args.num_classes is None:
        raise ConfigError("--pred needs --num-classes (or a --config that gives data.num_classes)")
    else:
        num_classes, ignore_index, names, color_map, gt_remap = args.num_classes, args.ignore_index, None, None, None
    if not 1 <= num_classes <= MAX_CLASSES:
        source = "data.num_classes" if args.config else "--num-classes"
        size = "" if num_classes < 1 else (f": the confusion matrix holds C x C int64 counts, "
                                           f"{8 * num_classes ** 2 / 2 ** 30:.3g} GiB for {num_classes} classes "
                                           f"({8 * MAX_CLASSES ** 2 // 2 ** 20} MiB at most)")
        raise ConfigError(f"{source} must be 1..{MAX_CLASSES}, got {num_classes}{size}")
    out = Path(args.output) if args.output else Path(args.pred).resolve().parent / "eval_masks"
    check_output_folder(out, {"the --pred folder": Path(args.pred), "the --gt folder": Path(args.gt)})
    result = score_mask_folders(args.pred, args.gt, num_classes, ignore_index=ignore_index, color_map=color_map,
                                gt_remap=gt_remap)
    names = class_names(names, num_classes)
    json_path, png_path = write_mask_folder_report(result, out, names)
    print(f"{counted(result.num_images, 'mask pair')}: predictions {result.pred_dir} against ground truth "
          f"{result.gt_dir}")
    print(format_table(result.metrics, names))
    print(f"wrote {json_path} and {png_path}")
    return {"metrics": result.metrics, "out": out}


main = command_main(sys.modules[__name__])
