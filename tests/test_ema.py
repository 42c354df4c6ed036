"""train.ema: the moving average follows its formula, is what validation scores and best.pt keeps,
and resumes bit for bit."""
import pytest
import torch
from recipes import signal_after_step, tiny_recipe

from segfocal.config import ConfigError, load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.interrupt import TrainingInterrupted
from segfocal.engine.trainer import Trainer

EMA = dict(train__ema={"decay": 0.9, "warmup": 3}, train__log_images=0)


def test_the_average_follows_the_warmed_up_ema_formula_weights_and_batchnorm_statistics(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=1, **EMA)), progress=False)
    snapshots, step = [], trainer._step

    def recorded(micro_batches, group_size):
        outcome = step(micro_batches, group_size)
        snapshots.append({k: v.double().clone() for k, v in trainer.parts.bare_model.state_dict().items()
                          if v.is_floating_point()})
        return outcome

    trainer._step = recorded
    trainer.fit()
    expected = dict(snapshots[0])  # the first update copies the weights
    for updates, weights in enumerate(snapshots[1:], start=1):
        decay = min(0.9, (1 + updates) / (3 + updates))  # 0.5, 0.6, 0.667 for the 4 steps
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    averaged = trainer.parts.ema.module.state_dict()
    assert any("running_mean" in key for key in expected)  # BatchNorm statistics are averaged too
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    raw = trainer.parts.bare_model.state_dict()
    assert not all(torch.equal(raw[key], averaged[key]) for key in expected)


def test_validation_scores_the_average_and_best_pt_holds_it(tmp_path):
    trainer = Trainer(load_config(tiny_recipe(tmp_path, train__epochs=2, **EMA)), progress=False)
    logged = []
    validate = trainer.validate
    trainer.validate = lambda: logged.append(validate()) or logged[-1]
    trainer.fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    best_miou = logged[best["state"]["epoch"] - 1]["miou"]
    # the final evaluation runs best.pt's weights: they score what was logged when best.pt was written
    assert trainer.final_evaluation().metrics["miou"] == pytest.approx(best_miou, abs=1e-12)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    averaged = {key[len("module."):]: value for key, value in last["ema"].items() if key.startswith("module.")}
    assert averaged.keys() == last["model"].keys()
    if best["state"]["epoch"] == 2:
        assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert not all(torch.equal(last["model"][k], averaged[k]) for k in averaged)  # last.pt: the trained weights


def test_a_resumed_run_continues_the_average_bit_for_bit(tmp_path):
    options = dict(train__epochs=2, **EMA)
    Trainer(load_config(tiny_recipe(tmp_path / "straight", **options)), progress=False).fit()
    config = load_config(tiny_recipe(tmp_path / "stopped", **options))
    trainer = Trainer(config, progress=False)
    signal_after_step(trainer, 6)  # mid-way through the second epoch
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    Trainer(config, resume="auto", progress=False).fit()
    expected = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    resumed = load_checkpoint(tmp_path / "stopped" / "run" / "last.pt")
    for part in ("ema", "model"):
        for key, value in expected[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")
    assert int(resumed["ema"]["n_averaged"]) == 8


@pytest.mark.parametrize("override, message", [
    ("train.ema={decay: 1.0}", r"train.ema.decay must be in \[0, 1\), got 1.0"),
    ("train.ema={warmup: -1}", r"train.ema.warmup must be at least 0, got -1"),
])
def test_ema_options_are_checked_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_recipe(tmp_path), [override])
