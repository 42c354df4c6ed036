"""Export a trained model to run without segfocal: ONNX, a torch.export program, or an smp folder.

    segfocal export --checkpoint CKPT --format onnx|pt2|smp --output PATH [--config CFG] [--size H W]
                    [--fixed-size] [--no-calibration]

* ``onnx`` (needs ``pip install 'segfocal[export]'``): input ``image`` float32 ``[N, C, H, W]``,
  normalised as in training, ``(x * scale - mean) / std`` for a stored value ``x`` (``scale``,
  ``mean`` and ``std`` are in the file's metadata as JSON, with the class names and ignore index); output ``logits`` ``[N, classes, H, W]``; batch, height and width dynamic
  (``--fixed-size`` fixes height and width to ``--size``, for PSPNet and UPerNet).
* ``pt2``: a ``torch.export`` program with dynamic batch and size; load it with plain torch,
  ``torch.export.load(PATH).module()``. (TorchScript is deprecated in PyTorch, so it is not offered.)
* ``smp``: a ``save_pretrained`` folder that ``segmentation_models_pytorch.from_pretrained(PATH)`` loads.

A checkpoint calibrated by ``segfocal calibrate`` is exported with its calibration folded into the
segmentation head's last convolution bias: the exported logits are the calibrated ones, so their
argmax is the calibrated decision in any runtime (ONNX metadata records the biases);
``--no-calibration`` exports the raw model.

Each artefact is loaded back with its own runtime and compared with the PyTorch model at two batch
and input sizes before it is written; if they differ, nothing is written and the command exits 2.
The config saved in a trainer checkpoint is used unless ``--config`` is given.

An export never replaces its inputs: an ``--output`` that would write over the checkpoint, the
``--config`` file or any file already in the checkpoint's folder (its run directory) is refused
before the checkpoint is read (paths compared resolved, so symlinked spellings count), and so is an
smp folder that holds files an smp export did not write, unless ``--overwrite`` (which replaces the
three files smp writes and keeps the others); an existing ``--output`` file not named for its format
(``.onnx``, ``.pt2``) is refused unless ``--overwrite``. Files are written beside their target and
renamed onto it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_calibration_argument, add_config_arguments, calibration_from_args, checkpoint_and_config, \
    command_main

FORMATS = ("onnx", "pt2", "smp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint or state-dict file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--output", "--out", dest="output", required=True,
                        help="the .onnx or .pt2 file, or the folder for smp")
    parser.add_argument("--size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"),
                        help="the example input size traced and checked (default: 256 256)")
    parser.add_argument("--fixed-size", action="store_true", help="onnx: fix height and width to --size")
    add_calibration_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing file not named for the format; smp: write into a folder "
                             "that holds other files (they are kept)")


def run(args: argparse.Namespace) -> list:
    import torch

    from ..export import ExportError, check_output, export_onnx, export_pt2, export_smp, model_from_checkpoint
    from ..models.heads import fold_logit_bias

    size = tuple(args.size)
    try:
        if min(size) < 1:
            raise ExportError(f"--size {size[0]} {size[1]}: the example input's height and width must be at least 1")
        check_inputs_spared(args)  # before the checkpoint is read
        check_output(args.format, args.output, args.overwrite)
        contents, cfg = checkpoint_and_config(args)
        model, cfg = model_from_checkpoint(args.checkpoint, config=cfg, contents=contents)
        calibration = calibration_from_args(args, contents, cfg)
        if calibration is not None:
            fold_logit_bias(model, calibration.tensor(), torch.zeros(1, cfg.model.in_channels, *size))
        if args.format == "onnx":
            data = cfg.data
            metadata = {"class_names": json.dumps(data.class_names or []), "mean": json.dumps(data.mean),
                        "std": json.dumps(data.std), "ignore_index": str(data.ignore_index),
                        # stored values times scale, then (x - mean) / std; null: the type's range (1/255 for 8-bit)
                        "scale": json.dumps(data.scale),
                        # folded into the logits already: the biases, for the record
                        "calibration": json.dumps(None if calibration is None else calibration.bias)}
            written = export_onnx(model, args.output, in_channels=cfg.model.in_channels, example_size=size,
                                  dynamic_size=not args.fixed_size, metadata=metadata, overwrite=args.overwrite)
        elif args.format == "pt2":
            written = export_pt2(model, args.output, example_size=size, in_channels=cfg.model.in_channels,
                                 overwrite=args.overwrite)
        else:
            written = export_smp(model, args.output, example_size=size, overwrite=args.overwrite)
    except (ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("wrote " + ", ".join(str(path) for path in written))
    return written


def check_inputs_spared(args: argparse.Namespace) -> None:
    """Raise ExportError if a file the export writes would replace the checkpoint, the config or a file of
    the checkpoint's folder (its run directory: ``last.pt``, ``config.yaml``, ...); a new file there is fine."""
    from ..config.loader import config_path
    from ..export import ExportError, output_files
    from ..files import entry_name, names_of

    checkpoint = Path(args.checkpoint)
    inputs = {checkpoint: f"the --checkpoint {checkpoint}"}
    if args.config:
        config = config_path(args.config)
        inputs[config] = f"the --config file {config}"
    for folder in {checkpoint.parent, checkpoint.resolve().parent}:
        for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
            if entry.is_file():
                inputs.setdefault(entry, f"{entry}, a file of the checkpoint's run directory")
    for target in output_files(args.format, args.output):
        for path, what in inputs.items():
            if entry_name(target) in names_of(path):
                raise ExportError(f"--output {args.output} would replace {what}; export to a new file name or "
                                  f"outside the run directory")


main = command_main(sys.modules[__name__])
