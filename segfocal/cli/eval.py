"""Evaluate a checkpoint: mIoU, per-class IoU/accuracy/Dice, pixel accuracy, confusion matrix.

    segfocal eval --config CFG --checkpoint CKPT [--split test] [--auroc] [--mode whole|slide] [--flip]
                  [--out DIR]

Prints a per-class table and writes ``metrics.json`` and ``confusion_matrix.png`` to ``--out``
(default: ``eval_<split>/`` beside the checkpoint). The checkpoint may be one the trainer wrote
or a bare model state dict.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_config_arguments, add_inference_arguments, config_from_args, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint (last.pt/best.pt) or state-dict file")
    parser.add_argument("--split", help="dataset split (default: data.test_split)")
    add_inference_arguments(parser)
    parser.add_argument("--auroc", action="store_true", help="also per-class one-vs-rest AUROC of the softmax scores")
    parser.add_argument("--out", help="output directory")


def run(args: argparse.Namespace) -> dict:
    from ..data import build_dataset, build_loader
    from ..engine.distributed import resolve_device
    from ..engine.evaluate import evaluate
    from ..engine.precision import resolve_precision
    from ..engine.restore import restore_model
    from ..evaluation import format_table, plot_confusion_matrix, write_json

    cfg = config_from_args(args)
    data = cfg.data
    split = args.split or data.test_split
    device = resolve_device(cfg.device)
    dataset = build_dataset(data, cfg.augment.val, split)
    dataset.validate(data.num_classes, data.ignore_index)
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=data.num_workers, seed=cfg.seed,
                          drop_last=False)
    model = restore_model(cfg, args.checkpoint, device)
    result = evaluate(model, loader, cfg.eval, data.num_classes, data.ignore_index, device,
                      resolve_precision(cfg.train.amp, device), with_auroc=args.auroc)
    names = data.class_names or [f"class_{index}" for index in range(data.num_classes)]
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    extra = {"checkpoint": str(args.checkpoint), "split": split, "num_images": len(dataset),
             "class_names": names, "confusion_matrix": result.confusion.tolist()}
    if result.auroc is not None:
        extra["auroc"] = result.auroc
    write_json(result.metrics, out / "metrics.json", extra=extra)
    plot_confusion_matrix(result.confusion, names, out / "confusion_matrix.png")
    print(f"{len(dataset)} images of split '{split}', checkpoint {args.checkpoint}")
    print(format_table(result.metrics, names))
    if result.auroc is not None:
        print("AUROC: " + ", ".join(f"{name} {value:.4f}" for name, value in zip(names, result.auroc)))
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return {"metrics": result.metrics, "out": out}


main = command_main(sys.modules[__name__])
