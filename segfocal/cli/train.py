"""Train a segmentation model from a YAML config.

    segfocal train --config synthetic_unet_focal [--set key.sub=value ...] [--resume auto|PATH] [--work-dir DIR]

``--config`` is a YAML file or the name of a shipped recipe (``configs/`` of the repository).

Runs as one process, or under ``torchrun --nproc_per_node=N`` with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List

from .common import add_config_arguments, command_main, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="auto|PATH", help="continue from last.pt of the work dir (auto) or a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (logs, CI)")


def run(args: argparse.Namespace) -> None:
    """Train; exit 3 when training cannot go on, 128 + the signal's number when a signal stopped it."""
    from ..engine.distributed import shutdown
    from ..engine.interrupt import TrainingInterrupted
    from ..engine.trainer import NonFiniteLossError, Trainer

    cfg = config_from_args(args)
    try:
        Trainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"{stop}; resume with: {resume_command(args.command_line)}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print(f"interrupted; {Path(cfg.work_dir) / 'last.pt'} holds the last state saved before it, if any",
              file=sys.stderr)
        sys.exit(130)
    finally:
        shutdown()


def resume_command(command_line: List[str]) -> str:
    """``command_line`` with ``--resume auto`` in place of any ``--resume``."""
    words = list(command_line)
    while "--resume" in words:
        index = words.index("--resume")
        del words[index:index + 2]
    words = [word for word in words if not word.startswith("--resume=")]
    return shlex.join([*words, "--resume", "auto"])


main = command_main(sys.modules[__name__])
