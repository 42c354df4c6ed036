"""What `pip install` of the wheel gives, outside the checkout: the `segfocal` command, the shipped
recipes, the LICENSE, one version, no upper bound on torch, and the loss without the toolkit."""
import os
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest
from recipes import REPO

import segfocal

TINY = ["--set", "data.synthetic.num_train=8", "--set", "data.synthetic.num_val=4", "--set", "data.synthetic.num_test=4",
        "--set", "data.synthetic.image_size=32", "--set", "train.epochs=1", "--set", "train.log_images=0",
        "--set", "model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from this checkout, and a folder it is installed into without dependencies."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
    (built,) = (root / "dist").glob("segfocal-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(built)],
                   check=True, capture_output=True, timeout=600)
    return built, target


def run_installed(target, cwd, *argv):
    """Run the installed `segfocal` script with the target folder first on the path (the venv supplies
    the dependencies), from ``cwd``, outside the checkout."""
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run([sys.executable, str(target / "bin" / "segfocal"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_wheel_carries_the_recipes_the_kernel_source_the_config_schema_and_the_license(wheel):
    built, _ = wheel
    names = zipfile.ZipFile(built).namelist()
    for recipe in (REPO / "configs").rglob("*.yaml"):
        assert f"segfocal/recipes/{recipe.relative_to(REPO / 'configs').as_posix()}" in names
    assert "segfocal/losses/cpu_kernel.cpp" in names and "segfocal/config/schema.json" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names)


def test_the_metadata_has_one_version_and_no_upper_bound_on_torch(wheel):
    built, _ = wheel
    with zipfile.ZipFile(built) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        fields = Parser().parsestr(archive.read(metadata).decode())
    assert fields["Version"] == segfocal.__version__
    requires = fields.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert sorted(core) == ["numpy", "torch>=2.4"]  # the loss alone needs no more
    assert not [r for r in requires if "<" in r.split(";")[0]], requires  # newer releases are never refused
    assert any(r.startswith("segmentation-models-pytorch") and 'extra == "train"' in r for r in requires)
    assert any(r.startswith("tifffile>=2024.4.24") and 'extra == "train"' in r for r in requires)  # multi-band TIFF


def test_the_installed_command_trains_a_shipped_recipe_by_name_outside_the_checkout(wheel, tmp_path):
    _, target = wheel
    located = subprocess.run([sys.executable, "-c", "import segfocal; print(segfocal.__file__)"], cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True)
    assert located.stdout.strip().startswith(str(target))  # the installed copy, not the checkout
    result = run_installed(target, tmp_path, "train", "--config", "synthetic_unet_focal", "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "synthetic_unet_focal" / "best.pt").is_file()
    assert (tmp_path / "data" / "synthetic" / "meta.json").is_file()
    stats = run_installed(target, tmp_path, "stats", "--config", "synthetic_unet_focal", *TINY[:8])
    assert stats.returncode == 0 and "split 'train': 8 images" in stats.stdout, stats.stderr[-2000:]


def test_an_unknown_recipe_name_lists_the_shipped_ones(wheel, tmp_path):
    _, target = wheel
    result = run_installed(target, tmp_path, "train", "--config", "synthetic_unet")
    assert result.returncode == 2
    recipes = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))  # every one ships in the wheel
    assert len(recipes) >= 6 and "cityscapes_unet_focal" in recipes
    assert result.stderr.strip() == ("error: config file not found: synthetic_unet (nor a shipped recipe of that "
                                     f"name: {', '.join(recipes)})")


def test_a_command_without_the_toolkit_dependencies_names_the_extra(tmp_path):
    probe = ("import sys; sys.modules['segmentation_models_pytorch'] = None; from segfocal.cli import main; "
             "main(['train', '--config', 'synthetic_unet_focal'])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().endswith("pip install 'segfocal[train]'")
    assert "Traceback" not in result.stderr
