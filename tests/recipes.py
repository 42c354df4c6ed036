"""Test helpers: a tiny synthetic-data recipe that trains in seconds on the CPU, the tools as modules,
and a stop signal sent at a chosen optimiser step."""
import importlib.util
import os
import signal
from pathlib import Path

import yaml

from segfocal.files import replaced_atomically

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path: Path, **overrides) -> Path:
    """A config file for a 32x32 synthetic set and a 3-level UNet; returns its path."""
    data_root = tmp_path / "data"
    recipe = {
        "_base_": str(REPO / "configs" / "_base_" / "default.yaml"),
        "work_dir": str(tmp_path / "run"),
        "data": {
            "root": str(data_root),
            "num_classes": 6,
            "class_names": ["background", "slab", "ellipse", "triangle", "line", "square"],
            "batch_size": 4,
            "num_workers": 0,
            "synthetic": {"num_train": 16, "num_val": 8, "num_test": 8, "image_size": 32, "seed": 0},
        },
        "augment": {"train": [{"__class_fullname__": "HorizontalFlip", "p": 0.5}]},
        "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        "schedule": {"warmup_iters": 2},
        "train": {"epochs": 3, "log_every": 2, "log_images": 2},
        "eval": {"batch_size": 8},
    }
    for dotted, value in overrides.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    with replaced_atomically(path) as handle:  # DDP tests' ranks each write it: none may read half a file
        handle.write(yaml.safe_dump(recipe).encode())
    return path


def load_tool(name: str, folder: str = "tools"):
    """``<folder>/<name>.py`` (``tools/`` or ``benchmarks/``) as a module, to call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(f"segfocal_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(capsys, tool, *argv):
    """Call a tool module's ``main`` in-process with ``argv``; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        tool.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def signal_after_step(trainer, step, signal_number=signal.SIGINT, times=1):
    """Send ``signal_number`` to this process ``times`` times once ``trainer`` has done optimiser step ``step``."""
    original = trainer._step

    def stepped(micro_batches, group_size):
        outcome = original(micro_batches, group_size)
        if trainer.state.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signal_number)
        return outcome

    trainer._step = stepped
