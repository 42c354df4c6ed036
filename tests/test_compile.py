"""train.compile: the model runs through torch.compile, and checkpoints stay loadable without it."""
import pytest
import torch
from recipes import tiny_recipe

from segfocal.config import load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.trainer import Trainer
from segfocal.models import build_model


def test_a_compiled_model_trains_and_its_checkpoint_loads_into_a_plain_model(tmp_path):
    config = load_config(tiny_recipe(tmp_path, train__epochs=1, train__compile=True, train__log_images=0))
    trainer = Trainer(config, progress=False)
    assert isinstance(trainer.parts.model, torch._dynamo.eval_frame.OptimizedModule)
    result = trainer.fit()
    assert 0.0 <= result.metrics["miou"] <= 1.0
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert not any(key.startswith("_orig_mod.") for key in state)
    plain = build_model(config.model, config.data.num_classes)
    plain.load_state_dict(state)  # strict: every key matches the uncompiled module
    plain.eval()
    trainer.parts.model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trainer.parts.model(images), plain(images), rtol=1e-4, atol=1e-4)
