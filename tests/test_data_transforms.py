"""build_transform: albumentations' own serialised items in, nearest-neighbour masks, ConfigError out."""
from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from hypothesis import given, settings
from hypothesis import strategies as st

from segfocal.config import ConfigError
from segfocal.data import build_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LABELS = {0, 3, 255}
ROOT = Path(__file__).resolve().parents[1]


def _sample(height=40, width=50, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[5:25, 8:30] = 3
    mask[18:35, 20:45] = 255
    mask[::7, ::5] = 3  # isolated pixels next to 0 and 255: any blending would show
    return image, mask


def _values(mask) -> set:
    return set(np.unique(np.asarray(mask)).tolist())


def test_output_is_normalised_tensor_and_mask():
    image, mask = _sample()
    out = build_transform([], MEAN, STD)(image=image, mask=mask)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 40, 50)
    expected = (image[0, 0] / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(out["image"][:, 0, 0].numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask)


@pytest.mark.parametrize("item", [
    {"__class_fullname__": "Resize", "height": 37, "width": 53, "p": 1.0},
    {"__class_fullname__": "Resize", "height": 17, "width": 23, "p": 1.0},
    {"__class_fullname__": "Affine", "rotate": [20, 40], "scale": [0.7, 1.3], "shear": [5, 10], "p": 1.0},
    {"__class_fullname__": "Rotate", "limit": [-45, 45], "p": 1.0},
    {"__class_fullname__": "RandomScale", "scale_limit": [-0.33, 0.41], "p": 1.0},
    {"__class_fullname__": "RandomResizedCrop", "size": [31, 29], "p": 1.0},
    {"__class_fullname__": "ElasticTransform", "alpha": 30, "sigma": 4, "p": 1.0},
    {"__class_fullname__": "Perspective", "scale": [0.05, 0.1], "p": 1.0},
    {"__class_fullname__": "GridDistortion", "p": 1.0},
])
def test_masks_are_resampled_nearest_neighbour(item):
    transform = build_transform([item], MEAN, STD, seed=3)
    image, mask = _sample()
    for _ in range(5):
        out = transform(image=image, mask=mask)
        assert _values(out["mask"]) <= LABELS, item
        assert out["mask"].shape == out["image"].shape[1:]


def test_control_linear_mask_interpolation_would_break_the_label_set():
    """The check above can fail: albumentations with linear mask interpolation invents labels."""
    image, mask = _sample()
    out = A.Resize(37, 53, mask_interpolation=cv2.INTER_LINEAR)(image=image, mask=mask)
    assert not _values(out["mask"]) <= LABELS


@settings(max_examples=25, deadline=None)
@given(height=st.integers(5, 60).map(lambda v: 2 * v + 1), width=st.integers(5, 60).map(lambda v: 2 * v + 1),
       angle=st.floats(-180, 180), seed=st.integers(0, 2**16))
def test_resize_then_rotate_keeps_labels(height, width, angle, seed):
    items = [{"__class_fullname__": "Resize", "height": height, "width": width, "p": 1.0},
             {"__class_fullname__": "Affine", "rotate": [angle, angle], "p": 1.0}]
    image, mask = _sample(seed=seed)
    out = build_transform(items, MEAN, STD, seed=seed)(image=image, mask=mask)
    assert out["mask"].shape == (height, width)
    assert _values(out["mask"]) <= LABELS


def test_explicit_linear_mask_interpolation_is_refused():
    with pytest.raises(ConfigError, match=r"item 1 \(Resize\): mask_interpolation=1"):
        build_transform([{"__class_fullname__": "HorizontalFlip", "p": 0.5},
                         {"__class_fullname__": "Resize", "height": 8, "width": 8, "mask_interpolation": 1}],
                        MEAN, STD)


def test_area_downscaling_of_masks_is_refused():
    with pytest.raises(ConfigError, match="area_for_downscale"):
        build_transform([{"__class_fullname__": "Resize", "height": 8, "width": 8, "p": 1,
                          "area_for_downscale": "image_mask"}], MEAN, STD)


def test_round_trip_of_to_dict_output():
    original = [
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-20, 20), scale=(0.8, 1.2), p=0.7),
        A.OneOf([A.GaussianBlur(p=1.0), A.RandomBrightnessContrast(p=1.0)], p=0.8),
        A.PadIfNeeded(min_height=48, min_width=64, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255),
        A.RandomCrop(height=48, width=64),
    ]
    serialised = A.to_dict(A.Compose(original))["transform"]["transforms"]
    items = json.loads(json.dumps(serialised))  # as a YAML/JSON config would hold them: tuples become lists
    ours = build_transform(items, MEAN, STD, ignore_index=11, seed=5)
    reference = A.Compose(original + [A.Normalize(mean=MEAN, std=STD), ToTensorV2()], seed=5)
    assert json.loads(json.dumps(A.to_dict(ours)["transform"]["transforms"][:-2])) == items
    image, mask = _sample()
    for _ in range(6):
        got, want = ours(image=image, mask=mask), reference(image=image, mask=mask)
        assert torch.equal(got["image"], want["image"])
        assert torch.equal(torch.as_tensor(got["mask"]), torch.as_tensor(want["mask"]))


def test_missing_p_takes_the_transforms_own_default_not_one_half():
    transform = build_transform([{"__class_fullname__": "RandomCrop", "height": 8, "width": 8}], MEAN, STD, seed=0)
    assert transform.transforms[0].p == 1.0
    image, mask = _sample()
    assert all(transform(image=image, mask=mask)["mask"].shape == (8, 8) for _ in range(20))


def test_padding_fills_masks_with_ignore_index_unless_configured():
    image, mask = _sample()
    mask[:] = 3
    shift = [{"__class_fullname__": "Affine", "translate_px": {"x": [10, 10], "y": [0, 0]}, "p": 1.0}]
    out = build_transform(shift, MEAN, STD, ignore_index=255)(image=image, mask=mask)["mask"]
    assert _values(out[:, :10]) == {255} and _values(out[:, 10:]) == {3}
    plain = build_transform(shift, MEAN, STD)(image=image, mask=mask)["mask"]
    assert _values(plain[:, :10]) == {0}
    explicit = [dict(shift[0], fill_mask=7)]
    configured = build_transform(explicit, MEAN, STD, ignore_index=255)(image=image, mask=mask)["mask"]
    assert _values(configured[:, :10]) == {7}


@pytest.mark.parametrize("items, pattern", [
    ({"__class_fullname__": "HorizontalFlip"}, "expected a list"),
    (["HorizontalFlip"], r"augmentation item 0: expected a dict"),
    ([{"p": 0.5}], r"item 0: missing '__class_fullname__'"),
    ([{"__class_fullname__": "HorizontalFlip", "p": 0.5}, {"__class_fullname__": "HorizontalFlp", "p": 0.5}],
     r"item 1: unknown albumentations transform 'HorizontalFlp'; did you mean HorizontalFlip"),
    ([{"__class_fullname__": "Resize", "height": -3, "width": 5, "p": 1}], r"item 0 .*Resize.*height.*greater than"),
    ([{"__class_fullname__": "Resize", "p": 1}], r"item 0 .*Field required"),
    ([{"__class_fullname__": "HorizontalFlip", "p": 0.5, "flip_axis": 1}],
     r"item 0 .*unknown argument\(s\) 'flip_axis' \(HorizontalFlip\)"),
    ([{"__class_fullname__": "OneOf", "p": 1, "transforms": [{"__class_fullname__": "Blur", "blurr_limit": 3}]}],
     r"item 0 .*'blurr_limit' \(Blur\)"),
    ([{"__class_fullname__": "OneOf", "p": 1, "transforms": [{"__class_fullname__": "Nope"}]}],
     r"item 0, transforms\[0\]: unknown"),
])
def test_invalid_items_raise_config_error_naming_the_item(items, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_transform(items, MEAN, STD)


def test_recipe_pipelines_build_and_keep_batches_rectangular():
    yaml = pytest.importorskip("yaml")
    camvid = yaml.safe_load((ROOT / "configs" / "camvid_unet_focal.yaml").read_text())
    transform = build_transform(camvid["augment"]["train"], MEAN, STD, ignore_index=11, seed=0)
    image = np.zeros((360, 480, 3), np.uint8)
    mask = np.full((360, 480), 3, np.uint8)
    for _ in range(8):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (3, 352, 480) and _values(out["mask"]) <= {3, 11}
    synthetic = yaml.safe_load((ROOT / "configs" / "synthetic_unet_focal.yaml").read_text())
    build_transform(synthetic["augment"]["train"], MEAN, STD, ignore_index=255)
