"""Runs counted in optimiser steps (train.iters) or epochs: entries, validation, last.pt, the LR
schedule and resume follow the unit; early stopping (train.patience)."""
import json

import pytest
import torch
from recipes import signal_after_step, tiny_recipe

from segfocal.config import ConfigError, load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.interrupt import TrainingInterrupted
from segfocal.engine.trainer import Trainer

# 16 images in batches of 4: 4 steps an epoch. 10 steps end part-way through the third epoch.
# FPN's decoder has dropout, so a resume that lost the random stream would not match.
STEPS = dict(train__iters=10, train__val_every=3, train__save_every=3, train__log_images=0, train__log_every=100,
             model__arch="FPN", model__kwargs={"encoder_depth": 3, "decoder_dropout": 0.5,
                                               "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32,
                                               "upsampling": 1})


def entries(work_dir):
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def record_saves(trainer):
    """(step, epoch, batch) of each write of last.pt."""
    saved, write = [], trainer._save

    def save(name):
        if name == "last.pt":
            saved.append((trainer.state.step, trainer.state.epoch, trainer.state.batch))
        write(name)

    trainer._save = save
    return saved


def record_learning_rates(trainer):
    """The learning rate each optimiser step used."""
    rates, step = [], trainer._step

    def recorded(micro_batches, group_size):
        rates.append(trainer.parts.optimizer.param_groups[0]["lr"])
        return step(micro_batches, group_size)

    trainer._step = recorded
    return rates


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run of 10 steps never stopped: its trainer, last.pt writes, learning rates and log."""
    root = tmp_path_factory.mktemp("straight")
    trainer = Trainer(load_config(tiny_recipe(root, **STEPS)), progress=False)
    saves, rates = record_saves(trainer), record_learning_rates(trainer)
    trainer.fit()
    return trainer, saves, rates, entries(root / "run"), load_checkpoint(root / "run" / "last.pt")


def test_counting_steps_validates_and_saves_every_n_steps_and_stops_mid_epoch(straight):
    trainer, saves, _, log, last = straight
    assert [(entry["step"], entry["epoch"]) for entry in log] == [(3, 0), (6, 1), (9, 2), (10, 2)]
    assert all("val" in entry for entry in log)  # an entry at each validation, every 3 steps and at the end
    assert saves == [(3, 0, 3), (6, 1, 2), (9, 2, 1), (10, 2, 2)]  # mid-epoch positions: epoch done, batches of the next
    assert (last["state"]["step"], last["state"]["epoch"], last["state"]["batch"]) == (10, 2, 2)
    assert trainer.timeline.total_steps == 10


def test_the_learning_rate_schedule_spans_train_iters(straight, tmp_path):
    _, _, rates, _, _ = straight
    cfg = load_config(tiny_recipe(tmp_path, **STEPS))
    warmup, power, base = cfg.schedule.warmup_iters, cfg.schedule.power, cfg.optim.lr
    expected = [base * (step + 1) / warmup if step < warmup else base * (1 - (step - warmup) / (10 - warmup)) ** power
                for step in range(10)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_run_counted_in_steps_resumes_exactly_after_a_stop_and_after_a_kill(straight, tmp_path, monkeypatch):
    _, _, _, straight_log, straight_last = straight
    config = load_config(tiny_recipe(tmp_path, **STEPS))
    trainer = Trainer(config, progress=False)
    signal_after_step(trainer, 5)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 5

    original = Trainer._step

    def killed_at_step_8(self, micro_batches, group_size):  # after last.pt of step 6 (mid-epoch), before the next
        if self.state.step == 7:
            raise KeyboardInterrupt("killed")
        return original(self, micro_batches, group_size)

    monkeypatch.setattr(Trainer, "_step", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, resume="auto", progress=False).fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 6
    monkeypatch.setattr(Trainer, "_step", original)
    Trainer(config, resume="auto", progress=False).fit()

    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    for key, value in straight_last["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    log = entries(tmp_path / "run")
    assert [entry["step"] for entry in log] == [3, 6, 9, 10]  # the kill's half-done interval was logged once
    for mine, theirs in zip(log, straight_log):
        assert mine["val"]["miou"] == theirs["val"]["miou"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)


def test_patience_stops_after_that_many_validations_without_a_better_metric(tmp_path, capsys, monkeypatch):
    scores = iter([0.5, 0.6, 0.55, 0.6, 0.9, 0.9])  # best at epoch 2, then two validations that do not beat it
    monkeypatch.setattr("segfocal.engine.trainer.metric_value", lambda *args: next(scores))
    config = load_config(tiny_recipe(tmp_path, train__epochs=6, train__patience=2, train__log_images=0))
    Trainer(config, progress=False).fit()
    last = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert (last["epoch"], last["stopped_early"], last["best_epoch"], last["validations_since_best"]) == (4, True, 2, 2)
    assert last["best_metric"] == 0.6 and load_checkpoint(tmp_path / "run" / "best.pt")["state"]["epoch"] == 2
    assert [entry["epoch"] for entry in entries(tmp_path / "run")] == [1, 2, 3, 4]
    assert "early stop: no better miou in 2 validations (train.patience) since epoch 2" in capsys.readouterr().out
    Trainer(config, resume="auto", progress=False).fit()  # an early-stopped run resumed trains no further
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == last["step"]


@pytest.mark.parametrize("override, message", [
    ("train.iters=0", "train.iters must be at least 1"),
    ("train.patience=-1", "train.patience must be at least 0, got -1"),
])
def test_schedule_options_are_checked_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_recipe(tmp_path), [override])


@pytest.mark.parametrize("unit, steps_per_epoch, total, expected", [
    ("epoch", 1, 1, "training for 1 epoch of 1 step (1 step); validation every epoch, last.pt every 2 epochs"),
    ("epoch", 4, 12, "training for 3 epochs of 4 steps (12 steps); validation every epoch, last.pt every 2 epochs"),
    ("step", 1, 1, "training for 1 step (train.iters; 1.0 epochs of 1 step); validation every step, last.pt every "
                   "2 steps"),
])
def test_the_console_line_counts_in_the_right_number(unit, steps_per_epoch, total, expected):
    """One epoch of one step is '1 epoch of 1 step', not '1 epochs of 1 steps'."""
    from segfocal.engine.timeline import Timeline

    assert Timeline(unit, steps_per_epoch, total, val_every=1, save_every=2).describe() == expected
