"""The ``segfocal`` command: one subcommand per module (``train``, ``eval``, ``predict``, ``stats``,
``export``, ``calibrate``, ``check``, ``config-schema`` in ``config_schema.py``).

Each command module provides ``add_arguments(parser)``, ``run(args)`` and a standalone ``main``
(what ``tools/<name>.py`` calls); :func:`main` here dispatches ``segfocal <command> ...``. Only the
standard library is imported before :func:`main` runs, so that a missing dependency of the
toolkit is reported as the extra to install, not as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": "train a model from a config",
    "eval": "metrics of a checkpoint on a split",
    "predict": "masks and overlays for new images",
    "stats": "class pixel counts of a split and the weights of every scheme",
    "export": "the model as ONNX, a torch.export program or an smp folder",
    "calibrate": "fit a per-class decision calibration on a split and store it in the checkpoint",
    "config-schema": "the config's JSON Schema, for editors",
    "check": "prove the fused loss's kernels on this machine: values against float64, speed against the bound",
}
# what `pip install segfocal` leaves out and the "train" extra brings (import names)
TRAIN_EXTRA = frozenset({"segmentation_models_pytorch", "albumentations", "tensorboard", "matplotlib", "yaml",
                         "tqdm", "torchvision", "cv2", "PIL", "timm", "pydantic"})


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``segfocal COMMAND ...``; returns nothing, as the console script passes the result to ``sys.exit``."""
    try:
        from .common import exit_on_user_error, invocation, terminate_as_exit

        args = _parser().parse_args(argv)
        args.command_line = invocation(argv)
        with exit_on_user_error(), terminate_as_exit():
            args.run(args)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"error: segfocal's commands need the toolkit's dependencies ({error.name} is missing): "
              f"pip install 'segfocal[train]'", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segfocal", description="Semantic-segmentation training around a "
                                                                  "class-balanced focal loss.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        command = importlib.import_module(f".{name.replace('-', '_')}", __name__)
        subparser = subcommands.add_parser(name, help=summary, description=command.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser
