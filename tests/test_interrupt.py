"""Ctrl-C and SIGTERM: the current step finishes, last.pt holds the position, and the resumed run
reaches the very weights of a run never stopped (dropout's random stream included)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from recipes import REPO, signal_after_step, tiny_recipe

from segfocal.config import load_config
from segfocal.engine.checkpoint import load_checkpoint, save_checkpoint
from segfocal.engine.interrupt import TrainingInterrupted
from segfocal.engine.trainer import Trainer

# FPN's decoder has dropout, so a resume that lost the random stream would not match
DROPOUT_MODEL = dict(model__arch="FPN", model__kwargs={"encoder_depth": 3, "decoder_dropout": 0.5,
                                                       "decoder_pyramid_channels": 32,
                                                       "decoder_segmentation_channels": 32, "upsampling": 1})
OPTIONS = dict(train__epochs=2, train__log_images=0, **DROPOUT_MODEL)
STOP_AT_STEP = 6  # the second of the four steps of epoch 2


def model_weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(actual, expected):
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """last.pt of the run never stopped."""
    root = tmp_path_factory.mktemp("straight")
    Trainer(load_config(tiny_recipe(root, **OPTIONS)), progress=False).fit()
    return model_weights(root / "run" / "last.pt")


def stop_mid_epoch(config, signal_number):
    """Train until the signal stops the run after step STOP_AT_STEP; returns the TrainingInterrupted."""
    trainer = Trainer(config, progress=False)
    assert len(trainer.data.train_loader) == 4
    signal_after_step(trainer, STOP_AT_STEP, signal_number)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    return stopped.value


def test_ctrl_c_mid_epoch_saves_the_position_and_the_resumed_run_matches_one_never_stopped(tmp_path, straight):
    config = load_config(tiny_recipe(tmp_path, **OPTIONS))
    handlers_before = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    stopped = stop_mid_epoch(config, signal.SIGINT)
    assert stopped.exit_code == 130
    assert (stopped.epoch, stopped.step) == (1, STOP_AT_STEP)
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers_before
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert {k: checkpoint["state"][k] for k in ("epoch", "step", "batch")} == {"epoch": 1, "step": 6, "batch": 2}
    assert "rng" in checkpoint

    Trainer(config, resume="auto", progress=False).fit()
    assert_same_weights(model_weights(tmp_path / "run" / "last.pt"), straight)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged] == [1, 2]  # the stopped epoch is logged once, when done


def test_sigterm_stops_likewise_and_without_the_saved_random_state_the_resumed_run_would_differ(tmp_path, straight):
    """SIGTERM (a scheduler's preemption) stops as Ctrl-C does; and the check above can fail: dropout
    draws differ if the resume does not restore the RNG state."""
    config = load_config(tiny_recipe(tmp_path, **OPTIONS))
    assert stop_mid_epoch(config, signal.SIGTERM).exit_code == 143
    last = tmp_path / "run" / "last.pt"
    checkpoint = load_checkpoint(last)
    del checkpoint["rng"]
    save_checkpoint(checkpoint, last)
    Trainer(config, resume="auto", progress=False).fit()
    resumed = model_weights(last)
    assert any(not torch.equal(resumed[key], straight[key]) for key in straight)


def test_a_second_signal_stops_at_once_and_keeps_the_previous_last_pt(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=2, train__log_images=0)), progress=False)
    signal_after_step(trainer, STOP_AT_STEP, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert (state["epoch"], state["batch"]) == (1, 0)  # the end of epoch 1, written before the signals
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_terminal_exits_130_with_the_resume_command_and_that_command_resumes(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, with two DataLoader workers."""
    config = tiny_recipe(tmp_path, train__epochs=40, train__log_images=0, train__accumulate=2, data__num_workers=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "tools/train.py", "--config", str(config), "--no-progress"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch is done: the loop, and its handler, are running
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-3000:]
    state = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"stopped on SIGINT at epoch {state['epoch']}, step {state['step']}; "
                           f"saved {tmp_path / 'run' / 'last.pt'}; resume with: python "), line
    command = shlex.split(line.split("resume with: ")[1])
    assert command[-2:] == ["--resume", "auto"]
    resumed = subprocess.run([sys.executable, *command[1:], "--set", f"train.epochs={state['epoch'] + 1}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {state['epoch']}, step {state['step']}" in resumed.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["epoch"] == state["epoch"] + 1
