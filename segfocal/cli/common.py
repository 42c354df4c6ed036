"""What every command shares: config arguments, the command line it was started with, user-facing errors."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..config import Config, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config``, ``--set`` and ``--work-dir``; ``required=False`` where a checkpoint brings its config."""
    help_text = "YAML config file, or the name of a recipe shipped with segfocal (e.g. synthetic_unet_focal)"
    if not required:
        help_text += "; default: the config saved in the checkpoint"
    parser.add_argument("--config", required=required, help=help_text)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--work-dir", help="run directory (overrides the config's work_dir)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mode`` and ``--flip``, shortcuts for the ``eval.mode`` and ``eval.flip`` keys."""
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default: eval.mode)")
    parser.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")


def config_from_args(args: argparse.Namespace, checkpoint: Optional[str] = None,
                     contents: Optional[Dict[str, Any]] = None) -> Config:
    """The config of ``--config`` (else the one saved in ``checkpoint``, whose ``contents`` may be
    given already read) with the command line's shortcuts, then ``--set`` (which wins), applied."""
    shortcuts = [f"eval.mode={args.mode}"] if getattr(args, "mode", None) else []
    shortcuts += ["eval.flip=true"] if getattr(args, "flip", False) else []
    overrides = shortcuts + list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    if args.config or checkpoint is None:
        return load_config(args.config, overrides)
    from ..engine.checkpoint import load_checkpoint
    from ..engine.restore import saved_config

    return saved_config(load_checkpoint(checkpoint) if contents is None else contents, checkpoint, overrides)


def checkpoint_and_config(args: argparse.Namespace) -> Tuple[Dict[str, Any], Config]:
    """``--checkpoint``'s contents, read once (a checkpoint with its optimiser state may be hundreds of
    MB), and the config of :func:`config_from_args` for it."""
    from ..engine.checkpoint import load_checkpoint

    contents = load_checkpoint(args.checkpoint)
    return contents, config_from_args(args, args.checkpoint, contents)


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-calibration``: decide on the raw logits, leaving out the checkpoint's calibration."""
    parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="ignore the calibration stored in the checkpoint (segfocal calibrate): raw argmax")


def calibration_from_args(args: argparse.Namespace, contents: Dict[str, Any], cfg: Config) -> Any:
    """The calibration the checkpoint carries, unless ``--no-calibration``; a line on stderr says it is applied."""
    from ..engine.calibrate import stored_calibration

    calibration = stored_calibration(contents, cfg.data.num_classes, args.checkpoint) if args.calibration else None
    if calibration is not None:
        print(f"note: applying the calibration stored in {args.checkpoint} (fitted for {calibration.metric} on "
              f"split '{calibration.split}'; --no-calibration leaves it out)", file=sys.stderr)
    return calibration


def add_output_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--output`` (``--out`` is accepted too: the spelling eval used to have)."""
    parser.add_argument("--output", "--out", dest="output", help=help_text)


def check_output_folder(output: Path, inputs: Mapping[str, Path], subfolders: Sequence[str] = ()) -> None:
    """Raise DataError unless ``output`` (and its ``subfolders``) can be made folders of results apart from ``inputs``.

    Each, and its parents, must be a folder where it exists (what is not is named), and ``output``
    may not be, or lie inside, any folder of ``inputs`` (what the message calls it → the folder):
    paths are compared resolved, so symlinked and relative spellings count. Cheap: call it before any work.
    """
    from ..data import DataError

    output = Path(output)
    for folder in (output, *(output / name for name in subfolders)):
        existing = next(path for path in (folder, *folder.absolute().parents) if path.exists() or path.is_symlink())
        if not existing.is_dir():
            culprit = "" if existing == output else f": {existing}"
            raise DataError(f"--output {output}{culprit} is not a folder; give a new or existing folder for the "
                            f"results")
    resolved = output.resolve()
    for what, source in inputs.items():
        if source.is_dir() and resolved.is_relative_to(source.resolve()):
            raise DataError(f"--output {output} is {what} {source} or inside it; choose an output folder outside "
                            f"it, so that nothing there is overwritten")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn errors caused by the user's config, data or checkpoint into a one-line message and exit 2;
    warnings print as one line too (``warning: ...``), without the source line Python would add."""
    from ..data import DataError
    from ..engine.checkpoint import CheckpointError

    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        yield
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {own_message(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.formatwarning = formatwarning


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a job scheduler's stop, ``kill``) raises ``SystemExit(143)`` in the block, as Ctrl-C raises
    KeyboardInterrupt, so files being written are removed on the way out (their ``finally`` blocks run) rather than
    left behind half written. Training installs its own handler, which saves ``last.pt`` first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number: int, frame: Any) -> None:
        print(f"stopped by {signal.Signals(signal_number).name}; files not finished are removed", file=sys.stderr)
        raise SystemExit(128 + signal_number)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def own_message(error: BaseException) -> str:
    """``error``'s own message: one a DataLoader worker raised comes back with the worker's traceback before it
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), which is dropped."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(name):] if last.startswith(name) else last
    return text


def _one_line_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> str:
    return f"warning: {message}\n"


def command_main(command: ModuleType) -> Callable[[Optional[Sequence[str]]], object]:
    """The ``main(argv=None)`` of a command module run on its own (``tools/<name>.py``).

    The module provides ``add_arguments(parser)`` and ``run(args)``; its docstring is the help.
    """
    def main(argv: Optional[Sequence[str]] = None) -> object:
        parser = argparse.ArgumentParser(description=command.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(parser)
        args = parser.parse_args(argv)
        args.command_line = invocation(argv)
        with exit_on_user_error(), terminate_as_exit():
            return command.run(args)

    return main


def invocation(argv: Optional[Sequence[str]]) -> List[str]:
    """The command line that started this process, as a user would type it again.

    ``argv`` (the arguments after the program) when given in-process, else ``sys.argv[1:]``; the
    program is ``python <script>.py`` for a script and its bare name for an installed command.
    """
    program = sys.argv[0] if sys.argv and sys.argv[0] else "segfocal"
    if program.endswith("__main__.py"):
        words = ["python", "-m", "segfocal"]
    elif program.endswith(".py"):
        words = ["python", program]
    else:
        words = [os.path.basename(program)]
    return words + list(sys.argv[1:] if argv is None else argv)
