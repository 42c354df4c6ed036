"""Training end to end on CPU: the loss falls, checkpoints evaluate, resume is exact, errors are clear."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from segfocal.config import load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.trainer import Trainer

from recipes import REPO, tiny_recipe


def run_tool(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def read_log(work_dir):
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_leaves_a_checkpoint_that_evaluates(tmp_path):
    config = tiny_recipe(tmp_path, train__epochs=4)
    result = run_tool("tools/train.py", "--config", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    work_dir = tmp_path / "run"
    log = read_log(work_dir)
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert "mIoU" in result.stdout and "background" in result.stdout  # the final per-class table
    for name in ("config.yaml", "last.pt", "best.pt"):
        assert (work_dir / name).is_file()
    with Image.open(work_dir / "curves.png") as curves:  # refreshed at each validation
        assert curves.format == "PNG" and curves.size == (800, 300)
    assert_tensorboard_has(work_dir / "tb", scalars={"train/loss", "train/lr", "class_weight/square", "val/miou",
                                                    "val_iou/line"},
                           images={"val/input", "val/label", "val/prediction"})
    best = load_checkpoint(work_dir / "best.pt")
    assert best["state"]["best_metric"] == max(entry["val"]["miou"] for entry in log)

    evaluation = run_tool("tools/eval.py", "--config", str(work_dir / "config.yaml"), "--checkpoint",
                          str(work_dir / "best.pt"), "--split", "val", "--out", str(tmp_path / "eval"))
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["miou"] == pytest.approx(best["state"]["best_metric"], abs=1e-9)  # same model, same split
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000


def assert_tensorboard_has(log_dir, scalars, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert scalars <= set(events.Tags()["scalars"])
    assert images <= set(events.Tags()["images"])
    weights = [event.value for event in events.Scalars("class_weight/square")]
    assert all(w > 1.0 for w in weights)  # ENet weights of a rare class: 1 / ln(1.10 + f) > 1


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    config = load_config(tiny_recipe(tmp_path, train__epochs=2, train__amp="bf16", train__log_images=0))
    trainer = Trainer(config, progress=False)
    assert trainer.parts.precision.autocast_dtype == torch.bfloat16 and not trainer.parts.scaler.is_enabled()
    trainer.fit()
    log = read_log(tmp_path / "run")
    assert all(entry["train_loss"] == entry["train_loss"] for entry in log)  # finite, not NaN
    assert log[-1]["train_loss"] < log[0]["train_loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where CUDA is available")
def test_fp16_without_a_gpu_is_a_config_error(tmp_path):
    from segfocal.config import ConfigError

    with pytest.raises(ConfigError, match="train.amp='fp16' needs a CUDA device"):
        Trainer(load_config(tiny_recipe(tmp_path, train__amp="fp16")), progress=False)


def test_fp16_autocast_with_a_grad_scaler_trains_through_the_step(tmp_path):
    """The fp16 branch (autocast + GradScaler: scale, unscale, clip, scaler step) that CUDA runs,
    driven on the CPU, which takes float16 autocast and a GradScaler too."""
    from segfocal.engine.precision import Precision

    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=1, train__log_images=0)), progress=False)
    trainer.parts.step_settings = replace(trainer.parts.step_settings, precision=Precision("cpu", torch.float16))
    trainer.parts.scaler = trainer.parts.precision.grad_scaler()
    assert trainer.parts.scaler.is_enabled()
    before = {name: value.clone() for name, value in trainer.parts.model.state_dict().items()}
    with trainer.parts.precision.autocast():
        assert trainer.parts.model(torch.zeros(1, 3, 32, 32)).dtype == torch.float16
    losses = [trainer.train_one_epoch(epoch) for epoch in range(3)]
    assert all(loss == loss and loss < 1e3 for loss in losses), losses
    assert trainer.state.step == 3 * len(trainer.data.train_loader)
    changed = [name for name, value in trainer.parts.model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, before[name])]
    assert changed and all(torch.isfinite(value).all() for value in trainer.parts.model.state_dict().values()
                           if value.is_floating_point())
    assert 0 < trainer.parts.scaler.get_scale() <= 2.0 ** 16  # the scaler ran: started at 2**16, lowered on overflow


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_is_bf16_where_supported_else_fp16(bf16_supported, expected, monkeypatch):
    from segfocal.engine.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    precision = resolve_precision("auto", torch.device("cuda", 0))
    assert (precision.device_type, precision.autocast_dtype, precision.uses_scaler) == (
        "cuda", expected, expected == torch.float16)
    assert resolve_precision("auto", torch.device("cpu")).autocast_dtype is None


def final_weights(work_dir):
    return load_checkpoint(work_dir / "last.pt")["model"]


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["batch-weights", "running-histogram"])
def test_resume_after_an_interruption_reaches_the_same_weights(tmp_path, monkeypatch, momentum):
    straight = load_config(tiny_recipe(tmp_path / "straight", loss__histogram_momentum=momentum))
    Trainer(straight, progress=False).fit()

    interrupted = load_config(tiny_recipe(tmp_path / "interrupted", loss__histogram_momentum=momentum))
    original = Trainer.train_one_epoch

    def crash_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, progress=False).fit()
    assert load_checkpoint(tmp_path / "interrupted" / "run" / "last.pt")["state"]["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    Trainer(interrupted, resume="auto", progress=False).fit()

    expected, resumed = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "interrupted" / "run")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    assert [e["epoch"] for e in read_log(tmp_path / "interrupted" / "run")] == [1, 2, 3]


def test_a_kill_between_logging_and_checkpointing_leaves_no_duplicate_log_entries(tmp_path, monkeypatch):
    config = load_config(tiny_recipe(tmp_path, train__log_images=0))
    original = Trainer._save

    def killed_while_saving_epoch_two(self, name):
        if name == "last.pt" and self.state.epoch == 2:
            raise KeyboardInterrupt("killed")
        original(self, name)

    monkeypatch.setattr(Trainer, "_save", killed_while_saving_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, progress=False).fit()
    assert [e["epoch"] for e in read_log(tmp_path / "run")] == [1, 2]  # epoch 2 logged, not checkpointed
    monkeypatch.setattr(Trainer, "_save", original)
    Trainer(config, resume="auto", progress=False).fit()
    assert [e["epoch"] for e in read_log(tmp_path / "run")] == [1, 2, 3]


def test_gradient_accumulation_steps_the_optimizer_once_per_group(tmp_path):
    config = load_config(tiny_recipe(tmp_path, train__epochs=2, train__accumulate=3, train__log_images=0))
    trainer = Trainer(config, progress=False)
    batches = len(trainer.data.train_loader)  # 16 images / 4 = 4 batches: groups of 3 and 1
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 2 * -(-batches // 3)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal"])
def test_each_loss_of_the_ablation_trains(tmp_path, loss):
    config = load_config(tiny_recipe(tmp_path, loss__name=loss, train__epochs=1, train__log_images=0))
    result = Trainer(config, progress=False).fit()
    assert 0.0 <= result.metrics["miou"] <= 1.0


@pytest.mark.parametrize("override, message", [
    ("loss.gamma=-1", "loss.gamma must be a finite number >= 0, got -1"),
    ("loss.enet_c=0.5", "loss.enet_c must be a finite number > 1"),  # was a traceback at the first step
])
def test_invalid_loss_option_exits_naming_the_key(tmp_path, override, message):
    result = run_tool("tools/train.py", "--config", str(tiny_recipe(tmp_path)), "--set", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_config_key_exits_with_a_suggestion(tmp_path):
    result = run_tool("tools/train.py", "--config", str(tiny_recipe(tmp_path)), "--set", "optim.learning_rate=0.1")
    assert result.returncode == 2
    assert "unknown key 'optim.learning_rate'" in result.stderr and "Traceback" not in result.stderr


def test_bad_mask_values_exit_with_the_file_named(tmp_path):
    config = tiny_recipe(tmp_path)
    Trainer(load_config(config, ["train.epochs=0"]), progress=False)  # generates the data
    import numpy as np
    from PIL import Image

    mask_path = sorted((tmp_path / "data" / "val" / "masks").iterdir())[3]
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 9
    Image.fromarray(mask).save(mask_path)
    result = run_tool("tools/train.py", "--config", str(config))
    assert result.returncode == 2
    assert mask_path.name in result.stderr and "9" in result.stderr and "Traceback" not in result.stderr


def epochs_saved_as_last_pt(trainer):
    """Record the epoch at which each last.pt is written (the writes still happen)."""
    saved = []
    write = trainer._save

    def save(name):
        if name == "last.pt":
            saved.append(trainer.state.epoch)
        write(name)

    trainer._save = save
    return saved


def test_save_every_writes_last_pt_every_n_epochs_at_the_end_and_on_a_stop(tmp_path):
    import os
    import signal

    from segfocal.engine.interrupt import TrainingInterrupted

    options = dict(train__epochs=5, train__save_every=2, train__log_images=0, train__val_every=5)
    trainer = Trainer(load_config(tiny_recipe(tmp_path / "full", **options)), progress=False)
    saved = epochs_saved_as_last_pt(trainer)
    trainer.fit()
    assert saved == [2, 4, 5]  # every 2 epochs, and the last one

    trainer = Trainer(load_config(tiny_recipe(tmp_path / "stopped", **options)), progress=False)
    saved = epochs_saved_as_last_pt(trainer)
    train_one_epoch = trainer.train_one_epoch

    def signal_at_the_end_of_the_third_epoch(epoch):
        loss = train_one_epoch(epoch)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    trainer.train_one_epoch = signal_at_the_end_of_the_third_epoch
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert saved == [2, 3]  # epoch 3 is written because of the stop


def test_best_pt_follows_one_class_iou_when_the_checkpoint_metric_names_it(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=3, train__log_images=0,
                                              train__checkpoint_metric="iou.line")), progress=False)
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    line_iou = [entry["val"]["iou"][4] for entry in log]  # class 4 is "line"
    best = load_checkpoint(tmp_path / "run" / "best.pt")["state"]
    expected = max((value, -index) for index, value in enumerate(line_iou) if value is not None)
    assert best["best_metric"] == pytest.approx(expected[0], abs=1e-12) and best["best_epoch"] == 1 - expected[1]
