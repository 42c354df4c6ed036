"""What a run prints: plain lines off a terminal, bars on one, and one summary line per epoch in both."""
import re
import sys

from recipes import tiny_recipe

from segfocal.config import load_config
from segfocal.engine.console import Console
from segfocal.engine.timeline import Timeline
from segfocal.engine.trainer import Trainer

SUMMARY = re.compile(r"^epoch (\d)/2  train loss \d+\.\d{4}  val mIoU \d+\.\d\d  class-acc \d+\.\d\d  "
                     r"rarest \w+ IoU (\d+\.\d\d|n/a)  best miou \d+\.\d\d \(epoch \d\)  \d+\.\d s/epoch  "
                     r"ETA \dm \d\ds$")


def train(tmp_path, progress=True):
    Trainer(load_config(tiny_recipe(tmp_path, train__epochs=2, train__log_every=2, train__log_images=0)),
            progress=progress).fit()


def test_off_a_terminal_plain_step_lines_and_a_summary_per_epoch(tmp_path, capsys):
    train(tmp_path)  # pytest's captured stderr is not a terminal
    out, err = capsys.readouterr()
    lines = out.splitlines()
    steps = [line for line in lines if re.match(r"^epoch \d/2  batch \d/4  step \d/8  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d$", line)]
    assert len(steps) == 4  # 4 batches per epoch, logged every 2 steps, 2 epochs
    summaries = [SUMMARY.match(line) for line in lines if line.startswith("epoch ") and "train loss" in line]
    assert [match.group(1) for match in summaries if match] == ["1", "2"], lines
    assert "it/s" not in err and "\r" not in err  # no bar updates in a log file


def test_on_a_terminal_bars_instead_of_step_lines_and_the_same_summaries(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tmp_path)
    out, err = capsys.readouterr()
    assert "epoch 1/2:" in err and "it/s" in err  # tqdm's bar
    assert not [line for line in out.splitlines() if "  batch " in line]
    assert sum(bool(SUMMARY.match(line)) for line in out.splitlines()) == 2


def test_no_progress_gives_plain_lines_even_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tmp_path, progress=False)
    out, err = capsys.readouterr()
    assert "it/s" not in err and len([line for line in out.splitlines() if "  batch " in line]) == 4


def test_the_summary_names_the_rarest_val_class_and_computes_the_eta(capsys):
    entry = {"epoch": 3, "step": 30, "train_loss": 0.123456,
             "val": {"miou": 0.5, "mean_accuracy": 0.75, "support": [900, 0, 30, 70], "iou": [0.9, None, 0.25, 0.5]}}
    epochs = Timeline("epoch", steps_per_epoch=10, total_steps=100, val_every=1, save_every=1)
    Console(enabled=True, progress=False).report(entry, epochs, "miou", 0.6125, 2, ["bg", "absent", "thin", "mid"],
                                                 19.5)
    assert capsys.readouterr().out == ("epoch 3/10  train loss 0.1235  val mIoU 50.00  class-acc 75.00  "
                                       "rarest thin IoU 25.00  best miou 61.25 (epoch 2)  19.5 s/epoch  "
                                       "ETA 2m 16s\n")  # 7 epochs x 19.5 s = 136.5 s
    Console(enabled=False, progress=False).report(entry, epochs, "miou", 0.6, 2, ["a"] * 4, 1.0)
    assert capsys.readouterr().out == ""  # other ranks print nothing


def test_counting_steps_the_summary_counts_steps(capsys):
    entry = {"epoch": 1, "step": 30, "train_loss": 0.5,
             "val": {"miou": 0.5, "mean_accuracy": 0.75, "support": [5, 3], "iou": [0.9, 0.1]}}
    steps = Timeline("step", steps_per_epoch=16, total_steps=200, val_every=10, save_every=10)
    Console(enabled=True, progress=False).report(entry, steps, "iou.b", 0.1, 20, ["a", "b"], 0.0625)
    assert capsys.readouterr().out == ("step 30/200  train loss 0.5000  val mIoU 50.00  class-acc 75.00  "
                                       "rarest b IoU 10.00  best iou.b 10.00 (step 20)  0.062 s/step  "
                                       "ETA 0m 11s\n")  # 170 steps x 0.0625 s = 10.6 s
