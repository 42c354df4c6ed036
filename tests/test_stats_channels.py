"""`segfocal stats` image mean/std: over every pixel of a split (images of different sizes weigh by
their pixel counts), as fractions of 255, printed as a pasteable ``data:`` line, written next to
``loss.weight`` in ``--output`` and returned; checked against numpy on all pixels at once."""
import numpy as np
import pytest
import yaml
from PIL import Image

from segfocal.config import load_config
from segfocal.data.channel_stats import Moments

from recipes import load_tool, run_tool, tiny_recipe

STATS = load_tool("dataset_stats")
SIZES = [(40, 30), (7, 3), (1, 1)]  # (height, width): per-image means would weigh the 1x1 image as much as the 40x30


def write_split(root, split="train"):
    """Random images of SIZES, the large one dark and the small ones bright, with all-zero masks; returns the images."""
    rng = np.random.default_rng(0)
    images = [rng.integers(low, high, size=(h, w, 3), dtype=np.uint8)
              for (h, w), (low, high) in zip(SIZES, ((0, 100), (150, 256), (200, 256)))]
    for folder in ("images", "masks"):
        (root / split / folder).mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(root / split / "images" / f"{index}.png")
        Image.fromarray(np.zeros(image.shape[:2], np.uint8)).save(root / split / "masks" / f"{index}.png")
    return images


def expected_mean_std(root, split="train"):
    """Mean and population std of all pixels of the split's images, read with PIL, /255, float64."""
    paths = sorted((root / split / "images").glob("*.png"))
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB"), np.float64).reshape(-1, 3) / 255 for p in paths])
    return pixels.mean(axis=0), pixels.std(axis=0)


def printed_data_line(stdout):
    (line,) = [line for line in stdout.splitlines() if line.startswith("data: ")]
    return yaml.safe_load(line)["data"]


def test_stats_reports_the_pixel_mean_and_std_of_the_split(capsys, tmp_path):
    config = tiny_recipe(tmp_path, data__synthetic=None)
    images = write_split(tmp_path / "data")
    mean, std = expected_mean_std(tmp_path / "data")
    per_image_means = np.mean([image.reshape(-1, 3).mean(axis=0) / 255 for image in images], axis=0)
    assert np.abs(per_image_means - mean).min() > 0.1  # a mean of per-image means would show

    fragment = tmp_path / "fragment.yaml"
    result = STATS.main(["--config", str(config), "--output", str(fragment)])
    stdout = capsys.readouterr().out
    np.testing.assert_allclose(result["data"]["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result["data"]["std"], std, rtol=0, atol=1e-9)

    printed = printed_data_line(stdout)
    assert printed["mean"] == np.round(mean, 4).tolist() and printed["std"] == np.round(std, 4).tolist()

    written = yaml.safe_load(fragment.read_text())
    assert written["loss"]["weight"] == result["weights"]["enet"]
    np.testing.assert_allclose(written["data"]["mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(written["data"]["std"], std, rtol=0, atol=1e-6)
    recipe = tmp_path / "with_stats.yaml"
    recipe.write_text(yaml.safe_dump({"_base_": [config.name, fragment.name]}))
    cfg = load_config(recipe)
    assert cfg.data.mean == written["data"]["mean"] and cfg.data.std == written["data"]["std"]
    assert cfg.loss.weight == written["loss"]["weight"] and cfg.data.num_classes == 6


def test_stats_of_another_split_and_a_bad_image(capsys, tmp_path):
    """--split picks the images; a corrupt one is an error, or left out with data.bad_samples: skip."""
    write_split(tmp_path / "data")
    write_split(tmp_path / "data", "val")
    mean, std = expected_mean_std(tmp_path / "data", "val")
    (tmp_path / "data" / "val" / "images" / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "data" / "val" / "masks" / "bad.png")

    config = tiny_recipe(tmp_path, data__synthetic=None)
    code, _, stderr = run_tool(capsys, STATS, "--config", config, "--split", "val")
    assert code == 2 and "cannot read image" in stderr and "bad.png" in stderr

    config = tiny_recipe(tmp_path, data__synthetic=None, data__bad_samples="skip")
    with pytest.warns(UserWarning, match="skipping a bad image"):
        result = STATS.main(["--config", str(config), "--split", "val"])
    np.testing.assert_allclose(result["data"]["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result["data"]["std"], std, rtol=0, atol=1e-9)



def test_a_split_with_no_labelled_pixel_is_one_line_naming_its_stored_values(capsys, tmp_path):
    write_split(tmp_path / "data")
    for mask in (tmp_path / "data" / "train" / "masks").iterdir():
        Image.fromarray(np.full(Image.open(mask).size[::-1], 255, np.uint8)).save(mask)  # all ignored
    code, stdout, stderr = run_tool(capsys, STATS, "--config", tiny_recipe(tmp_path, data__synthetic=None))
    assert code == 2 and "\n" not in stderr.strip() and stdout == ""
    assert f"split 'train' of {tmp_path / 'data'} has no labelled pixel: no mask value is a class 0..5 after " \
           f"data.label_map (as stored, value: pixels: 255: {sum(h * w for h, w in SIZES)})" in stderr

def test_moments_do_not_cancel():
    """2e15 pixels of 254 and 255 (as two summaries), and a constant channel: a float64 sum of squares
    would lose these."""
    moments = Moments()
    moments.merge(10 ** 15, np.array([254 / 255, 17 / 255]), np.zeros(2))
    moments.merge(10 ** 15, np.array([255 / 255, 17 / 255]), np.zeros(2))
    mean, std = moments.mean_std()
    assert mean == pytest.approx([254.5 / 255, 17 / 255], rel=1e-15)
    assert std[0] == pytest.approx(0.5 / 255, rel=1e-12) and std[1] == 0.0
