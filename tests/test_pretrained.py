"""Named encoder weights (`imagenet`, ...) go to smp, which reads them from the Hugging Face cache or
downloads them; offline and not cached, one clear line. Nothing is fetched unless asked for."""
import os
import subprocess
import sys

from recipes import REPO, tiny_recipe

RESNET18_IMAGENET = ("smp-hub/resnet18.imagenet", "3f2325ff978283d47aa6a1d6878ca20565622683")

# builds the tiny recipe's model in a fresh interpreter, where HF_HUB_OFFLINE/HF_HUB_CACHE take effect
BUILD = """
import sys, torch
from segfocal.config import load_config
from segfocal.models import build_model
cfg = load_config(sys.argv[1], sys.argv[3:])
model = build_model(cfg.model, 6, pretrained=sys.argv[2] == "pretrained")
torch.save(model.encoder.state_dict(), cfg.work_dir + ".encoder.pt")
"""


def offline(cache):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))


def fake_hub_cache(cache):
    """The Hugging Face cache as smp's download of resnet18/imagenet leaves it, with seeded weights."""
    import segmentation_models_pytorch as smp
    import torch
    from safetensors.torch import save_file

    repo, revision = RESNET18_IMAGENET
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    torch.manual_seed(7)
    weights = {k: v.contiguous() for k, v in smp.encoders.get_encoder("resnet18", weights=None).state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    return weights


def test_imagenet_weights_offline_and_not_cached_stop_training_in_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path)
    result = subprocess.run([sys.executable, "tools/train.py", "--config", str(recipe), "--no-progress",
                             "--set", "model.encoder_weights=imagenet"], cwd=REPO, env=offline(tmp_path / "hub"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: model.encoder_weights='imagenet': smp could not fetch the imagenet weights "
                               "of encoder resnet18")
    assert f"not in the Hugging Face cache ({tmp_path / 'hub'})" in lines[0]
    assert "set model.encoder_weights to a local state-dict file" in lines[0]


def test_imagenet_weights_in_the_cache_are_loaded_offline_by_smp(tmp_path):
    import torch

    expected = fake_hub_cache(tmp_path / "hub")
    recipe = tiny_recipe(tmp_path)
    subprocess.run([sys.executable, "-c", BUILD, str(recipe), "pretrained", "model.encoder_weights=imagenet"],
                   cwd=REPO, env=offline(tmp_path / "hub"), check=True, capture_output=True, timeout=300)
    loaded = torch.load(f"{tmp_path / 'run'}.encoder.pt")
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_a_model_rebuilt_for_a_checkpoint_fetches_nothing(tmp_path):
    """pretrained=False (inference from a checkpoint) ignores the named weights: no hub, no error offline."""
    recipe = tiny_recipe(tmp_path)
    result = subprocess.run([sys.executable, "-c", BUILD, str(recipe), "random", "model.encoder_weights=imagenet"],
                            cwd=REPO, env=offline(tmp_path / "hub"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "hub").exists()
