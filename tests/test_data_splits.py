"""data.val_fraction: a val split carved from train with the run's seed, recorded in the run directory
and seen unchanged by a resumed run and by eval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfocal.config import ConfigError, load_config
from segfocal.data.splits import RECORD, run_dataset
from segfocal.engine.trainer import Trainer

from recipes import load_tool, run_tool, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def add_images(root: Path, stems) -> None:
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        image = np.random.default_rng(len(stem)).integers(0, 256, (32, 64, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "train" / "images" / f"{stem}.png")
        mask = np.arange(64, dtype=np.uint8)[None].repeat(32, 0) % 6
        Image.fromarray(mask).save(root / "train" / "masks" / f"{stem}.png")


def config(tmp_path: Path, run: str = "run", **overrides):
    settings = dict(data__synthetic=None, data__val_fraction=0.3, train__epochs=1, train__log_images=0,
                    data__batch_size=2, work_dir=str(tmp_path / run))
    return load_config(tiny_recipe(tmp_path, **{**settings, **overrides}))


def stems(dataset) -> list:
    return [image.stem for image, _ in dataset.samples]


def test_val_is_carved_from_train_recorded_and_kept_on_resume_and_in_eval(tmp_path, capsys):
    data = tmp_path / "data"
    add_images(data, [f"img{index:02d}" for index in range(10)])
    trainer = Trainer(config(tmp_path), progress=False)
    train, val = stems(trainer.data.train_set), stems(trainer.data.val_set)
    assert len(val) == 3 and len(train) == 7 and sorted(train + val) == [f"img{index:02d}" for index in range(10)]
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record == {"val_fraction": 0.3, "seed": 0, "from_split": "train",
                      "val": [f"train/images/{stem}.png" for stem in val]}
    trainer.fit()

    add_images(data, ["img10", "img11"])  # new images are trained on; the val split stays as recorded
    resumed = Trainer(config(tmp_path), resume="auto", progress=False)
    assert stems(resumed.data.val_set) == val and stems(resumed.data.train_set) == sorted(train + ["img10", "img11"])

    code, out, err = run_tool(capsys, load_tool("eval"), "--checkpoint", tmp_path / "run" / "best.pt", "--split", "val")
    assert code == 0, err
    assert "3 images of split 'val'" in out


def test_the_split_follows_the_seed_and_a_changed_fraction_is_refused(tmp_path):
    add_images(tmp_path / "data", [f"img{index:02d}" for index in range(10)])
    first = stems(run_dataset(config(tmp_path, run="a"), [], "val"))
    again = stems(run_dataset(config(tmp_path, run="b"), [], "val"))
    reseeded = stems(run_dataset(config(tmp_path, run="c", seed=5), [], "val"))
    assert first == again and reseeded != first and len(reseeded) == 3

    run_dataset(config(tmp_path, run="a"), [], "train", record=True)
    with pytest.raises(ConfigError, match=rf"{RECORD} holds the val split drawn with data.val_fraction=0.3, seed=0, "
                                          r"but the config has data.val_fraction=0.5"):
        run_dataset(config(tmp_path, run="a", data__val_fraction=0.5), [], "val")
    with pytest.raises(ConfigError, match="data.val_fraction=0.01 of the 10 images of split 'train' leaves no val"):
        run_dataset(config(tmp_path, run="d", data__val_fraction=0.01), [], "val")
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \(0, 1\), got 1.5"):
        config(tmp_path, data__val_fraction=1.5)
