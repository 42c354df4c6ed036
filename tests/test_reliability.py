"""Faults during training: non-finite steps, SIGKILL at any moment, and a 2-process torchrun run."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from recipes import REPO, tiny_recipe

from segfocal.config import load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.trainer import NonFiniteLossError, Trainer


def poison_loss(trainer, bad_steps):
    """Make the loss NaN on the given (0-based) micro-batches."""
    original = trainer.parts.criterion.forward
    calls = {"n": 0}

    def forward(logits, target):
        loss = original(logits, target)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_steps else loss

    trainer.parts.criterion.forward = forward


def test_a_few_non_finite_steps_are_skipped_without_touching_the_weights(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=1)), progress=False)
    before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
    poison_loss(trainer, bad_steps={0, 1})
    trainer._seed_epoch(0)
    trainer.parts.model.train()
    batch = next(iter(trainer.data.train_loader))
    for _ in range(2):  # two poisoned steps: skipped, weights unchanged, counter at 2
        assert not trainer._step(iter([batch]), 1).applied
    assert trainer.state.bad_steps == 2
    for key, value in trainer.parts.model.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, before[key]), key
    trainer.fit()  # the rest of the run trains normally
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["epoch"] == 1


def test_too_many_non_finite_steps_stop_with_a_clear_message_and_keep_the_last_checkpoint(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=3, train__max_bad_steps=2)), progress=False)
    steps_per_epoch = len(trainer.data.train_loader)
    poison_loss(trainer, bad_steps=set(range(steps_per_epoch, 10 * steps_per_epoch)))  # from the second epoch on
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*train.max_bad_steps=2.*last.pt"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["epoch"] == 1


def weights(path):
    return load_checkpoint(path)["model"]


def wait_for_new_checkpoint(path, previous_mtime, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.stat().st_mtime_ns != previous_mtime:
            return
        time.sleep(0.05)


def test_sigkill_at_random_moments_never_corrupts_last_pt_and_resume_finishes_identically(tmp_path):
    options = dict(train__epochs=6, train__log_images=0, data__synthetic__num_train=32)
    config = tiny_recipe(tmp_path / "killed", **options)
    Trainer(load_config(tiny_recipe(tmp_path / "straight", **options)), progress=False).fit()
    last = tmp_path / "killed" / "run" / "last.pt"
    rng = random.Random(0)
    command = [sys.executable, "tools/train.py", "--config", str(config), "--resume", "auto", "--no-progress"]
    epochs_at_kill = []
    for _ in range(3):  # each run is killed at a random moment after it wrote a new last.pt
        mtime = last.stat().st_mtime_ns if last.exists() else None
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_new_checkpoint(last, mtime, process)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        epochs_at_kill.append(load_checkpoint(last)["state"]["epoch"])  # never a torn file
    assert epochs_at_kill[0] < 6  # killed mid-training, so the finishing run has epochs to redo
    finish = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"at epoch {epochs_at_kill[-1]}" in finish.stdout  # it resumed where the last kill left it
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind
    expected, resumed = weights(tmp_path / "straight" / "run" / "last.pt"), weights(last)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def test_torchrun_with_two_cpu_processes_trains_calibrates_on_all_val_and_its_checkpoint_evaluates(tmp_path):
    # the 3-level encoder leaves resnet18's last stages unused: DDP must be told
    config = tiny_recipe(tmp_path, train__epochs=2, train__log_images=0, train__find_unused_parameters=True,
                         train__calibrate=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/train.py",
         "--config", str(config), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Best checkpoint") == 1  # rank 0 alone reports
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["state"]["epoch"] == 2
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # the bare model is saved
    # rank 0 fits the calibration on all 8 val images, not on its share of 4
    assert load_checkpoint(tmp_path / "run" / "best.pt")["calibration"]["num_images"] == 8
    evaluation = subprocess.run(
        [sys.executable, "tools/eval.py", "--config", str(config), "--checkpoint", str(tmp_path / "run" / "best.pt"),
         "--split", "val", "--out", str(tmp_path / "eval")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert evaluation.returncode == 0, evaluation.stderr


def hold_work_dir(work_dir):
    """Another process holding the work dir's lock, as a running training would; returns it once it holds it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from segfocal.engine.work_dir_lock import WorkDirLock; "
                               "lock = WorkDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)",
         str(work_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_in_a_held_work_dir_stops_naming_the_holder_and_deletes_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path, train__epochs=1, train__log_images=0)
    work_dir = tmp_path / "run"
    holder = hold_work_dir(work_dir)
    try:
        in_flight = work_dir / ".last.pt.abc123.tmp"  # the holder's checkpoint being written
        in_flight.write_bytes(b"partial checkpoint")
        result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config", str(recipe),
                                 "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"work dir {work_dir} is in use by another run (pid {holder.pid} on" in result.stderr
        assert "Traceback" not in result.stderr
        assert in_flight.read_bytes() == b"partial checkpoint"
        assert not (work_dir / "metrics.jsonl").exists() and not (work_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the next run needs no clean-up by hand
    trainer = Trainer(load_config(recipe), progress=False)
    assert not in_flight.exists()  # now stale, and swept under the lock
    trainer.fit()
    assert (work_dir / "last.pt").exists()


def test_weights_that_become_non_finite_stop_the_run_and_are_never_written(tmp_path):
    """max_bad_steps above the epoch's length: the step check alone would let the NaN weights through."""
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=3, train__max_bad_steps=1000,
                                              train__log_images=0)), progress=False)
    original = trainer.train_one_epoch

    def poison_after_first_epoch(epoch):
        loss = original(epoch)
        if epoch == 1:
            with torch.no_grad():
                next(trainer.parts.bare_model.parameters()).fill_(float("nan"))
        return loss

    trainer.train_one_epoch = poison_after_first_epoch
    with pytest.raises(NonFiniteLossError, match="weights became non-finite"):
        trainer.fit()
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "run" / name)
        assert state["state"]["epoch"] == 1  # written after the first epoch, not after the poisoned one
        assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def test_skipped_fp16_steps_count_across_an_epoch_and_a_resume_and_stop_after_max_bad_steps_plus_one(
        tmp_path, monkeypatch):
    """A float16 GradScaler skips a non-finite step itself; those steps count, the count crosses the epoch's
    end, and last.pt keeps it: NaN from step 1 stops at step max_bad_steps + 1 however the run was split."""
    from recipes import signal_after_step

    from segfocal.engine.interrupt import TrainingInterrupted
    from segfocal.engine.precision import Precision

    monkeypatch.setattr("segfocal.engine.parts.resolve_precision", lambda mode, device: Precision("cpu", torch.float16))
    config = load_config(tiny_recipe(tmp_path, train__epochs=3, train__max_bad_steps=5, train__log_images=0))
    trainer = Trainer(config, progress=False)
    assert trainer.parts.scaler.is_enabled() and len(trainer.data.train_loader) == 4  # 4 steps an epoch
    poison_loss(trainer, bad_steps=set(range(100)))
    signal_after_step(trainer, 3)  # stopped mid-epoch, three bad steps counted
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["bad_steps"] == 3

    resumed = Trainer(config, resume="auto", progress=False)
    poison_loss(resumed, bad_steps=set(range(100)))
    with pytest.raises(NonFiniteLossError, match=r"6 consecutive steps .*train.max_bad_steps=5"):
        resumed.fit()
    assert resumed.state.step == 5  # steps 4 (the epoch's last), 5, and the sixth bad one raised before counting
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert (saved["epoch"], saved["step"], saved["bad_steps"]) == (1, 4, 4)  # the epoch's end, counted on
