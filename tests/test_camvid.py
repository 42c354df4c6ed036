"""The CamVid recipe on the real data in ../shared/datasets/CamVid (skipped where it is absent)."""
import math

import pytest
from recipes import REPO

from segfocal.config import load_config
from segfocal.data import build_dataset
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.trainer import Trainer

CAMVID = REPO.parent / "shared" / "datasets" / "CamVid"
pytestmark = pytest.mark.skipif(not (CAMVID / "trainannot").is_dir(), reason=f"CamVid not found at {CAMVID}")
RECIPE = REPO / "configs" / "camvid_unet_focal.yaml"
CPU_RECIPE = REPO / "configs" / "camvid_unet_focal_cpu.yaml"  # half resolution

# train pixel shares from the dataset's README (over all pixels, Void = 0.040 included)
PUBLISHED_SHARES = [0.168, 0.233, 0.010, 0.317, 0.045, 0.097, 0.012, 0.011, 0.059, 0.006, 0.003]


def test_class_frequencies_of_the_train_split_match_the_published_shares():
    cfg = load_config(RECIPE, [f"data.root={CAMVID}"])
    counts = build_dataset(cfg.data, [], "train").class_pixel_counts(cfg.data.num_classes)
    all_pixels = 367 * 360 * 480
    assert counts.sum() < all_pixels  # Void (11) is ignored, not counted
    for share, count in zip(PUBLISHED_SHARES, counts.tolist()):
        assert count / all_pixels == pytest.approx(share, abs=0.0015)


@pytest.mark.parametrize("recipe,height,width", [(RECIPE, 360, 480), (CPU_RECIPE, 180, 240)],
                         ids=["full", "cpu_half_resolution"])
def test_a_few_iterations_of_the_recipe_train_and_evaluate(tmp_path, recipe, height, width):
    stems = {"train": ["0001TP_006690", "0001TP_006720", "0001TP_006750", "0001TP_006780"],
             "val": sorted(p.stem for p in (CAMVID / "val").iterdir())[:2]}
    for split, names in stems.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(names) + "\n")
    cfg = load_config(recipe, [
        f"data.root={CAMVID}", f"data.split_file={tmp_path}/{{split}}.txt", "data.batch_size=2",
        "data.num_workers=0", "train.epochs=1", "train.log_images=1", "eval.batch_size=2", f"work_dir={tmp_path / 'run'}",
    ])
    result = Trainer(cfg, progress=False).fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert state["epoch"] == 1 and state["step"] == 2
    assert len(result.metrics["iou"]) == 11
    assert 0.9 * 2 * height * width <= result.metrics["num_pixels"] <= 2 * height * width  # 2 val images, Void excluded
    assert not math.isnan(result.metrics["miou"])
