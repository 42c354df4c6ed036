"""Shared command-line plumbing of the tools: config arguments and user-facing errors."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

from .config import Config, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--work-dir", help="run directory (overrides the config's work_dir)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mode`` and ``--flip``, shortcuts for the ``eval.mode`` and ``eval.flip`` keys."""
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default: eval.mode)")
    parser.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` with the command line's shortcuts, then ``--set`` (which wins), applied."""
    shortcuts = [f"eval.mode={args.mode}"] if getattr(args, "mode", None) else []
    shortcuts += ["eval.flip=true"] if getattr(args, "flip", False) else []
    overrides = shortcuts + list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    return load_config(args.config, overrides)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn errors caused by the user's config, data or checkpoint into a one-line message and exit 2."""
    from .data import DataError
    from .engine.checkpoint import CheckpointError

    try:
        yield
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
