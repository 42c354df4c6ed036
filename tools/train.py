"""Train a segmentation model from a YAML config.

    python tools/train.py --config configs/synthetic_unet_focal.yaml [--set key.sub=value ...]
                          [--resume auto|PATH] [--work-dir DIR]

Runs as one process, or under ``torchrun --nproc_per_node=N`` with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segfocal.cli import add_config_arguments, config_from_args, exit_on_user_error  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="auto|PATH", help="continue from last.pt of the work dir (auto) or a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (logs, CI)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from segfocal.engine.distributed import shutdown
        from segfocal.engine.interrupt import TrainingInterrupted
        from segfocal.engine.trainer import NonFiniteLossError, Trainer

        cfg = config_from_args(args)
        try:
            Trainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(3)
        except TrainingInterrupted as stop:
            if os.environ.get("RANK", "0") == "0":
                print(f"{stop}; resume with: {resume_command(argv)}", file=sys.stderr)
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:
            print(f"interrupted; {Path(cfg.work_dir) / 'last.pt'} holds the last state saved before it, if any",
                  file=sys.stderr)
            sys.exit(130)
        finally:
            shutdown()


def resume_command(argv=None) -> str:
    """This command line with ``--resume auto`` in place of any ``--resume``."""
    args = list(sys.argv[1:] if argv is None else argv)
    while "--resume" in args:
        index = args.index("--resume")
        del args[index:index + 2]
    args = [arg for arg in args if not arg.startswith("--resume=")]
    return shlex.join(["python", sys.argv[0], *args, "--resume", "auto"])


if __name__ == "__main__":
    main()
