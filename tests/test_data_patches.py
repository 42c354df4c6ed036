"""data.patches: crops of large images (300x300 in 64x64 tiles here, the code 16k x 16k images run), each a pure
function of (seed, epoch, index); class-aware crops from a cached, checksummed class index; a grid of tiles that
scores every pixel once; every data option; and a run stopped mid-epoch resumes to the very weights of one never
stopped."""
import io
import signal
import threading
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from segfocal.config import ConfigError, load_config
from segfocal.data import DataError, build_loader
from segfocal.data.class_index import cached_class_index
from segfocal.data.splits import run_dataset
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.interrupt import TrainingInterrupted
from segfocal.engine.trainer import Trainer
from segfocal.losses import weights_from_histogram

from large_data import large_recipe, mosaic, write_array
from recipes import signal_after_step

pytest.importorskip("zarr")
pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def dataset(config, split="train", random_crops=True, augment=()):
    data = run_dataset(load_config(config), list(augment), split, random_crops=random_crops)
    data.validate(6, 255)
    return data


def sources(seeds=(1, 2)):
    return [mosaic(seed) for seed in seeds]


def crop_at(dataset_, index):
    """(image, top, left) of crop ``index`` of the current epoch, as the dataset draws it."""
    return dataset_._draw(np.random.default_rng([dataset_.seed, dataset_.epoch, index]))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    return large_recipe(root, data__mean=MEAN, data__std=STD,
                        data__patches={"size": [64, 64], "per_epoch": 16, "index_dir": str(root / "index")})


def test_a_crop_is_the_normalised_window_of_its_image_and_a_pure_function_of_seed_epoch_and_index(config):
    crops, truth = dataset(config), sources()
    for index in (0, 5, 15):
        image, mask = crops[index]
        number, top, left = crop_at(crops, index)
        window = truth[number][0][top:top + 64, left:left + 64].astype(np.float64) / 255
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), (window - MEAN) / STD, atol=1e-5)
        np.testing.assert_array_equal(mask.numpy(), truth[number][1][top:top + 64, left:left + 64])
        again = dataset(config)[index]  # another dataset object, another process: the same crop
        assert torch.equal(again[0], image) and torch.equal(again[1], mask)
    first = [crop_at(crops, index) for index in range(16)]
    crops.set_epoch(1)
    assert [crop_at(crops, index) for index in range(16)] != first


def test_workers_and_ranks_draw_the_stream_one_process_draws(config):
    """Two DataLoader workers give the batches of none; two DDP ranks split the indices, each reproducibly."""
    crops = dataset(config, augment=[{"__class_fullname__": "HorizontalFlip", "p": 0.5}])
    batches = {workers: [torch.cat([b[0].flatten(), b[1].flatten().float()]) for b in
                         build_loader(crops, 4, shuffle=True, num_workers=workers, seed=3, drop_last=True)]
               for workers in (0, 2)}
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2])) and len(batches[0]) == 4
    ranks = [list(DistributedSampler(crops, num_replicas=2, rank=rank, shuffle=True, seed=0)) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 16
    assert ranks[0] == list(DistributedSampler(crops, num_replicas=2, rank=0, shuffle=True, seed=0))


def test_the_val_grid_scores_every_pixel_once(config):
    tiles, truth = dataset(config, "val", random_crops=False), sources((3,))[0][1]
    assert len(tiles) == 25  # 300 = 4 tiles of 64 + one aligned to the border, each way
    counts = np.zeros(256, np.int64)
    for index in range(len(tiles)):
        counts += np.bincount(tiles[index][1].numpy().ravel(), minlength=256)
    np.testing.assert_array_equal(counts[:255], np.bincount(truth.ravel(), minlength=256)[:255])


def test_an_image_smaller_than_a_crop_is_padded_with_ignored_pixels(tmp_path):
    image, mask = mosaic(4, size=40)
    for split in ("train", "val"):
        write_array(tmp_path / "data" / split / "images" / "0.npy", image)
        write_array(tmp_path / "data" / split / "masks" / "0.npy", mask)
    config = large_recipe(tmp_path, data__root=str(tmp_path / "data"))
    for random_crops in (True, False):
        crop = dataset(config, random_crops=random_crops)[0][1].numpy()
        np.testing.assert_array_equal(crop[:40, :40], mask)
        assert (crop[40:] == 255).all() and (crop[:, 40:] == 255).all()


def test_sixteen_bit_bands_label_map_and_scale_reach_the_crop(tmp_path):
    """4-band uint16 .npy images, Zarr masks with stored values 10..15 mapped to train ids, scale and mean/std."""
    rng = np.random.default_rng(0)
    bands = rng.integers(0, 4096, (300, 300, 4), dtype=np.uint16)
    stored = mosaic(5)[1].astype(np.uint8) + 10
    stored[stored == 265 % 256] = 0  # the synthetic ignored pixels: stored 0, not in the label map
    for split in ("train", "val"):
        write_array(tmp_path / "data" / split / "images" / "0.npy", bands)
        write_array(tmp_path / "data" / split / "masks" / "0.zarr", stored)
    mean, std = [100.0, 200.0, 300.0, 400.0], [10.0, 20.0, 30.0, 40.0]
    config = large_recipe(tmp_path, data__root=str(tmp_path / "data"), data__mean=mean, data__std=std,
                          data__scale=0.5, data__label_map={10 + c: c for c in range(6)}, model__in_channels=4)
    crops = dataset(config)
    image, mask = crops[3]
    _, top, left = crop_at(crops, 3)
    window = bands[top:top + 64, left:left + 64].astype(np.float64) * 0.5
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), (window - mean) / np.array(std), rtol=1e-5)
    expected = stored[top:top + 64, left:left + 64].astype(np.int64) - 10
    expected[stored[top:top + 64, left:left + 64] == 0] = 255
    np.testing.assert_array_equal(mask.numpy(), expected)


# -- class-aware crops and their index --------------------------------------------------------------

def test_the_class_index_counts_each_class_and_holds_only_its_pixels(config):
    crops, truth = dataset(config, random_crops=True), sources()
    crops.patches.rare_fraction = 0.5
    crops.validate(6, 255)
    index = crops.class_index
    for number, (_, mask) in enumerate(truth):
        np.testing.assert_array_equal(index.counts[number], np.bincount(mask.ravel(), minlength=256)[:6])
        for cls in range(6):
            positions = index.positions_of(number, cls)
            assert len(positions) == min(index.counts[number, cls], crops.patches.index_points)
            assert (mask.ravel()[positions] == cls).all()
    totals = np.bincount(np.concatenate([mask.ravel() for _, mask in truth]), minlength=256)[:6]
    weights = weights_from_histogram(torch.from_numpy(totals), "enet", dtype=torch.float64).numpy()
    np.testing.assert_allclose(crops.class_probabilities, weights / weights.sum(), rtol=1e-12)


def test_class_aware_crops_find_the_rarest_class_and_raise_its_share(config):
    """With the inverse-frequency scheme the rarest class is drawn most, and the crops drawn for it hold it."""
    shares, holding = {}, {}
    for fraction in (0.0, 1.0):
        crops = dataset(config)
        crops.patches.rare_fraction, crops.patches.per_epoch = fraction, 200
        crops.scheme = type(crops.scheme)("inverse")
        crops.validate(6, 255)
        counts, holding[fraction] = np.zeros((200, 6), np.int64), 0
        for index in range(200):
            mask = crops[index][1].numpy().ravel()
            counts[index] = np.bincount(mask[mask < 6], minlength=6)
        shares[fraction] = counts.sum(0) / counts.sum()
        holding[fraction] = (counts[:, 5] > 0).mean()  # class 5, the squares, is the rarest
    # a crop centred on a square holds it: at least the squares' probability (0.67 here) of crops do, give or
    # take the spread of 200 draws (0.03)
    assert np.argmin(shares[0.0]) == 5 and crops.class_probabilities[5] > 0.6
    assert holding[1.0] > crops.class_probabilities[5] - 0.1 and holding[1.0] > 2 * holding[0.0], holding
    assert shares[1.0][5] > 3 * shares[0.0][5], shares


def test_the_index_is_cached_rebuilt_when_a_mask_changes_or_the_file_is_corrupt_and_safe_to_build_twice(
        tmp_path, monkeypatch):
    config = large_recipe(tmp_path, data__patches={"size": [64, 64], "per_epoch": 16, "rare_fraction": 0.5,
                                                   "index_dir": str(tmp_path / "index")})
    built = dataset(config).class_index
    [cached] = list((tmp_path / "index").glob("class_index-*.npz"))
    assert not list((tmp_path / "large").rglob("*.npz"))  # nothing written beside the data
    calls = []
    import segfocal.data.patches as patches

    original = patches.build_class_index
    monkeypatch.setattr(patches, "build_class_index", lambda *a: calls.append(1) or original(*a))
    assert np.array_equal(dataset(config).class_index.positions, built.positions) and calls == []

    cached.write_bytes(cached.read_bytes()[:-100])  # torn
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = dataset(config).class_index
    assert len(calls) == 1 and np.array_equal(rebuilt.counts, built.counts)

    mask_path = tmp_path / "large" / "train" / "masks" / "0.tif"
    changed = mosaic(1)[1]
    changed[:50] = 5
    write_array(mask_path, changed)
    assert dataset(config).class_index.counts[0, 5] == np.bincount(changed.ravel(), minlength=6)[5]
    assert len(calls) == 2

    identity = {"test": "two at once"}
    threads = [threading.Thread(target=cached_class_index, args=(tmp_path / "index", identity, [mask_path],
                                                                 lambda: built)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cached_class_index(tmp_path / "index", identity, [mask_path], lambda: pytest.fail("rebuilt")).counts.sum()
    assert not list((tmp_path / "index").glob(".*tmp"))



def test_an_ignore_index_inside_the_class_range_is_neither_counted_nor_drawn(tmp_path):
    # stored 0 (and 255, unlisted) become the ignore label 0, a train id inside the class range
    config = large_recipe(tmp_path, data__ignore_index=0, data__label_map={1: 1, 2: 2, 3: 3, 4: 4, 5: 5}, data__patches={
        "size": [64, 64], "per_epoch": 16, "rare_fraction": 0.5, "index_dir": str(tmp_path / "index")})
    crops = run_dataset(load_config(config), [], "train", random_crops=True)
    crops.validate(6, 0)
    assert crops.class_index.counts[:, 0].sum() == 0 and crops.class_probabilities[0] == 0
    assert all(len(crops.class_index.positions_of(number, 0)) == 0 for number in range(len(sources())))
    truth = np.concatenate([mask.ravel() for _, mask in sources()])
    np.testing.assert_array_equal(crops.class_index.counts.sum(0)[1:], np.bincount(truth, minlength=6)[1:6])


def test_a_cached_index_whose_array_header_claims_a_vast_array_is_rebuilt(tmp_path):
    config = large_recipe(tmp_path, data__patches={"size": [64, 64], "per_epoch": 16, "rare_fraction": 0.5,
                                                   "index_dir": str(tmp_path / "index")})
    built = dataset(config).class_index
    [cached] = list((tmp_path / "index").glob("class_index-*.npz"))
    with np.load(cached) as stored:
        arrays = dict(stored)
    with zipfile.ZipFile(cached, "w") as archive:  # positions.npy's header edited to claim 10**13 values
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array)
            payload = buffer.getvalue()
            if key == "positions":
                payload = payload.replace(f"({len(array)},)".encode(), b"(10000000000000,)", 1)
            archive.writestr(f"{key}.npy", payload)
    with pytest.warns(UserWarning, match="unreadable .*rebuilding it"):
        rebuilt = dataset(config).class_index
    np.testing.assert_array_equal(rebuilt.counts, built.counts)


def test_an_index_folder_it_cannot_write_fails_before_the_masks_are_scanned(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the class index .*a-file/index/class_index-.*\.npz: .*"
                                        r"set data.patches.index_dir to a folder you can write"):
        cached_class_index(tmp_path / "a-file" / "index", {"test": "unwritable"}, [],
                           lambda: pytest.fail("the masks were scanned before the folder was tried"))

# -- bad input ----------------------------------------------------------------------------------------

def test_a_mask_whose_shape_differs_from_its_image_names_both(tmp_path):
    image, mask = mosaic(1)
    for split in ("train", "val"):
        write_array(tmp_path / "data" / split / "images" / "0.tif", image)
        write_array(tmp_path / "data" / split / "masks" / "0.tif", mask[:299])
    with pytest.raises(DataError) as error:
        dataset(large_recipe(tmp_path, data__root=str(tmp_path / "data")))
    assert "masks/0.tif: mask size 300x299 differs from the size 300x300 of its image" in str(error.value)


@pytest.mark.parametrize("key,value,message", [
    ("size", [64], "data.patches.size must be [height, width]"),
    ("per_epoch", 0, "data.patches.per_epoch must be at least 1"),
    ("rare_fraction", 1.5, "data.patches.rare_fraction must be in [0, 1]"),
    ("class_weight", "often", "data.patches.class_weight must be one of"),
    ("crop", 3, "unknown key 'data.patches.crop'"),
])
def test_bad_patch_options_are_refused_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(large_recipe(tmp_path, data__patches={"size": [64, 64], key: value}))


# -- resume -------------------------------------------------------------------------------------------

OPTIONS = dict(train__epochs=2, train__log_images=0, train__val_every=2,
               data__patches={"size": [64, 64], "per_epoch": 16, "rare_fraction": 0.5})


def test_a_run_stopped_mid_epoch_resumes_to_the_weights_of_one_never_stopped(tmp_path):
    straight = load_config(large_recipe(tmp_path / "straight", **OPTIONS))
    Trainer(straight, progress=False).fit()
    expected = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")["model"]

    config = load_config(large_recipe(tmp_path / "stopped", **OPTIONS))
    trainer = Trainer(config, progress=False)
    signal_after_step(trainer, 6, signal.SIGINT)  # the second of epoch 2's four steps
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert load_checkpoint(tmp_path / "stopped" / "run" / "last.pt")["state"]["batch"] == 2
    Trainer(config, resume="auto", progress=False).fit()
    resumed = load_checkpoint(tmp_path / "stopped" / "run" / "last.pt")["model"]
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
