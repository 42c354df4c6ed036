"""Bounded TensorBoard logs: images downscaled to a longest side, one warning past a size."""
import json
import warnings

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segfocal.engine.run_logger import RunLogger, downscaled


def test_downscaled_averages_blocks_and_keeps_small_images():
    images = torch.randint(0, 256, (2, 3, 1024, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    small = downscaled(images, 512)
    assert small.shape == (2, 3, 512, 256) and small.dtype == torch.uint8
    blocks = images.numpy().astype(np.float64).reshape(2, 3, 512, 2, 256, 2).mean(axis=(3, 5))
    assert np.abs(small.numpy().astype(np.float64) - blocks).max() <= 0.5 + 1e-6  # the 2x2 means, rounded
    assert downscaled(torch.zeros(1, 3, 1000, 600, dtype=torch.uint8), 512).shape[-2:] == (512, 307)  # aspect kept
    assert downscaled(images, 0) is images and downscaled(images[:, :, :100, :80], 512).shape[-2:] == (100, 80)


def logged_image_sizes(tb_dir):
    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    events.Reload()
    return [(image.height, image.width) for tag in events.Tags()["images"] for image in events.Images(tag)]


def test_images_in_the_event_file_are_bounded(tmp_path):
    logger = RunLogger(tmp_path, image_size=64)
    logger.images("val/input", torch.zeros(2, 3, 300, 200, dtype=torch.uint8), step=1)
    logger.images("val/small", torch.zeros(1, 3, 40, 30, dtype=torch.uint8), step=1)
    logger.close()
    # TensorBoard tiles a batch side by side: two 64x43 images make one 64x86 strip
    assert sorted(logged_image_sizes(tmp_path / "tb")) == [(40, 30), (64, 86)]


def test_one_warning_once_the_logs_pass_the_limit(tmp_path):
    noise = torch.randint(0, 256, (2, 3, 700, 700), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    logger = RunLogger(tmp_path, image_size=0, max_mb=1)  # 2 noisy 700x700 PNGs are ~3 MB: past 1 MB
    with pytest.warns(UserWarning, match=r"TensorBoard logs in .*tb have grown to \d+ MB \(train.max_log_mb=1\)"):
        logger.images("noise", noise, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        logger.images("noise", noise, step=2)
    logger.close()


def test_resuming_drops_later_entries_and_a_line_a_crash_cut_short(tmp_path):
    logger = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        logger.record({"epoch": epoch, "step": 10 * epoch, "train_loss": 0.5})
    logger.jsonl.write('{"epoch": 4, "step": 40, "train_lo')  # killed in the middle of a write
    logger.jsonl.flush()
    logger.forget_after(20)
    logger.record({"epoch": 3, "step": 30, "train_loss": 0.25})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "step": 10, "train_loss": 0.5},
                                                    {"epoch": 2, "step": 20, "train_loss": 0.5},
                                                    {"epoch": 3, "step": 30, "train_loss": 0.25}]
