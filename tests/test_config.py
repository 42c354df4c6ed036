"""Config loading: _base_ inheritance, overrides, validation messages, the shipped recipes."""
import re
from pathlib import Path

import pytest
import torch
import yaml

from segfocal.config import Config, ConfigError, load_config, save_config

from recipes import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_merges_nested_keys(tmp_path):
    write(tmp_path / "base" / "root.yaml", {"seed": 1, "loss": {"gamma": 1.0, "weight": "median"}, "train": {"epochs": 3}})
    write(tmp_path / "base" / "mid.yaml", {"_base_": "root.yaml", "loss": {"gamma": 3.0}})
    child = write(tmp_path / "child.yaml", {"_base_": ["base/mid.yaml"], "train": {"epochs": 7}})
    cfg = load_config(child)
    assert cfg.seed == 1
    assert cfg.loss.gamma == 3.0 and cfg.loss.weight == "median"  # merged, not replaced
    assert cfg.train.epochs == 7


def test_a_config_copied_anywhere_finds_shipped_bases_and_a_local_file_wins(tmp_path):
    """The README's examples start with `_base_: _base_/default.yaml`: copied out of configs/, they still load."""
    anywhere = write(tmp_path / "cells.yaml", {"_base_": "_base_/default.yaml", "data": {"num_classes": 3}})
    cfg = load_config(anywhere)
    assert (cfg.data.num_classes, cfg.schedule.warmup_iters, cfg.train.log_image_size) == (3, 20, 512)  # default.yaml's
    on_recipe = write(tmp_path / "longer.yaml", {"_base_": "camvid_unet_focal", "train": {"epochs": 300}})
    cfg = load_config(on_recipe)
    assert (cfg.data.num_classes, cfg.train.epochs) == (11, 300)
    write(tmp_path / "_base_" / "default.yaml", {"seed": 5})  # a file beside the config is taken first
    assert load_config(anywhere).seed == 5
    with pytest.raises(ConfigError, match=r"config file not found: .*no_such_base.yaml"):
        load_config(write(tmp_path / "bad_base.yaml", {"_base_": "no_such_base.yaml"}))


def test_overrides_are_parsed_as_yaml_and_applied_last(tmp_path):
    path = write(tmp_path / "c.yaml", {"loss": {"gamma": 2.0}})
    cfg = load_config(path, ["loss.gamma=0.5", "loss.weight=null", "loss.alpha=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]", "train.amp=fp32"])
    assert cfg.loss.gamma == 0.5 and cfg.loss.weight is None and cfg.loss.alpha == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert cfg.train.amp == "fp32"


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.yaml", {"loss": {"gama": 2.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'loss.gama'; did you mean 'loss.gamma'\?") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_override_key_is_rejected(tmp_path):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match=r"train.epoch.*did you mean 'train.epochs'"):
        load_config(path, ["train.epoch=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.gamma=two", r"loss.gamma must be of type float, got 'two'"),
        ("train.epochs=2.5", r"train.epochs must be of type int"),
        ("train.channels_last=1", r"train.channels_last must be of type bool"),
        ("loss.name=dice", r"loss.name must be one of \['focal', 'cross_entropy'\], got 'dice'"),
        ("train.amp=fp8", r"train.amp must be one of"),
        ("data=3", r"data must be a mapping"),
        ("no_equals_sign", r"must have the form key.sub=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.class_names=[a, b]", r"data.class_names has 2 names for data.num_classes=6"),
        ("data.batch_size=0", r"data.batch_size must be at least 1, got 0"),
        ("train.accumulate=0", r"train.accumulate must be at least 1"),
        ("train.epochs=-1", r"train.epochs must be at least 0, got -1"),
        ("data.mean=[0.5]", r"data.mean needs one value per input channel \(model.in_channels=3\)"),
        ("eval.crop_size=[512]", r"eval.crop_size must be \[height, width\]"),
        ("eval.crop_size=[200,400]", r"eval.stride=\[341, 341\] exceeds eval.crop_size=\[200, 400\]: the sliding "
                                     r"windows would leave pixels between them unscored"),
        ("optim.lr=0", r"optim.lr must be a finite number > 0"),
    ],
)
def test_inconsistent_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "synthetic_unet_focal.yaml", [override])


def test_a_bad_value_set_on_the_command_line_is_blamed_on_its_override_not_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"optim": {"lr": 0.01}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.patches={size: [64, 64], rare_fraction: 1.5}", "optim.lr=0.02"])
    assert str(info.value) == ("--set data.patches={size: [64, 64], rare_fraction: 1.5}: "
                               "data.patches.rare_fraction must be in [0, 1], got 1.5")
    bad_file = write(tmp_path / "bad.yaml", {"data": {"batch_size": 0}})
    with pytest.raises(ConfigError) as info:  # the file's own bad value still names the file
        load_config(bad_file, ["optim.lr=0.02"])
    assert str(info.value).startswith(f"{bad_file}: data.batch_size must be at least 1")


def test_missing_file_and_bad_yaml_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic_unet_focal.yaml", ["loss.weight=[1.0, 2.0, 3.0, 1.0, 1.0, 1.0]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_a_tilde_in_a_folder_key_is_the_home_folder_as_in_a_shell(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(REPO / "configs" / "synthetic_unet_focal.yaml",
                      ["work_dir=~/runs/x", "data.root=~/data", "data.patches={size: [64, 64], index_dir: ~/index}"])
    home = tmp_path / "home"
    assert (cfg.work_dir, cfg.data.root, cfg.data.patches.index_dir) == (str(home / "runs/x"), str(home / "data"),
                                                                         str(home / "index"))


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert len(cfg.data.class_names) == cfg.data.num_classes


@pytest.mark.parametrize("override, key", [
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("schedule.power=-2", "schedule.power"),
    ("schedule.warmup_iters=-5", "schedule.warmup_iters"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("loss.gamma=-1", "loss.gamma"),
    ("loss.weight=[1.0,2.0]", "loss.weight"),
    ("loss.weight=[1.0,2.0,-1.0,1.0,1.0,1.0]", "loss.weight[2]"),
    ("loss.alpha=[0.5,0.5,0.5,0.5,0.5,.nan]", "loss.alpha[5]"),
    ("loss.alpha=1.5", "loss.alpha"),
])
def test_values_that_would_wreck_training_are_refused_at_load_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key} must be")):
        load_config(tiny_recipe(tmp_path), [override])


def test_values_at_the_edge_of_their_range_are_accepted(tmp_path):
    config = load_config(tiny_recipe(tmp_path), ["train.grad_clip=null", "schedule.power=0", "loss.gamma=0",
                                                 "loss.weight=[0.0,1.0,1.0,1.0,1.0,1.0]", "loss.alpha=1.0"])
    assert config.train.grad_clip is None and config.loss.alpha == 1.0


@pytest.mark.parametrize("metric, message", [
    ("mIoU", "train.checkpoint_metric='mIoU' is not a metric; choose one of miou, mean_accuracy"),
    ("iou", "train.checkpoint_metric='iou' is not a metric"),
    ("iou.Line", "train.checkpoint_metric='iou.Line': no class 'Line'; the classes are background, slab"),
], ids=["typo", "per-class-without-class", "unknown-class"])
def test_a_checkpoint_metric_is_checked_at_load(tmp_path, metric, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tiny_recipe(tmp_path, train__checkpoint_metric=metric))


def test_every_checkpoint_metric_the_config_accepts_is_one_validation_reports():
    from segfocal.config.schema import PER_CLASS_METRICS, SUMMARY_METRICS
    from segfocal.evaluation import segmentation_metrics

    metrics = segmentation_metrics(torch.tensor([[5, 1], [2, 3]]))
    assert all(isinstance(metrics[name], float) for name in SUMMARY_METRICS)
    assert all(len(metrics[name]) == 2 for name in PER_CLASS_METRICS)


def test_sections_merge_and_values_replace_so_a_config_can_drop_a_key_its_base_set(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"arch": "FPN", "kwargs": {"decoder_dropout": 0.3, "upsampling": 4}},
                                   "data": {"label_map": {0: 1, 7: 2}, "ignore_index": 255}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "model": {"kwargs": {"upsampling": 4}},
                                            "data": {"label_map": {7: 2}}})
    cfg = load_config(child)
    assert cfg.model.arch == "FPN"  # the section merged
    assert cfg.model.kwargs == {"upsampling": 4}  # the value replaced: decoder_dropout is gone
    assert cfg.data.label_map == {7: 2}


def test_two_bases_that_set_a_key_differently_are_an_error_naming_both_files_unless_the_config_settles_it(tmp_path):
    write(tmp_path / "short.yaml", {"_base_": "_base_/default.yaml", "train": {"epochs": 5}})
    write(tmp_path / "long.yaml", {"train": {"epochs": 50}})
    both = write(tmp_path / "both.yaml", {"_base_": ["short.yaml", "long.yaml"]})
    with pytest.raises(ConfigError, match=r"both.yaml: its _base_ files .*short.yaml and .*long.yaml set train.epochs "
                                          r"differently \(5 and 50\); set train.epochs in both.yaml"):
        load_config(both)
    write(tmp_path / "both.yaml", {"_base_": ["short.yaml", "long.yaml"], "train": {"epochs": 20}})
    assert load_config(both).train.epochs == 20
    write(tmp_path / "same.yaml", {"train": {"epochs": 5}, "data": {"num_workers": 0}})  # the same value: no conflict
    assert load_config(write(tmp_path / "agree.yaml", {"_base_": ["short.yaml", "same.yaml"]})).data.num_workers == 0


def test_a_base_sharing_the_default_does_not_undo_what_an_earlier_base_set(tmp_path):
    """Both bases read _base_/default.yaml: the second's copy of its train.log_every=10 is no setting of its own."""
    write(tmp_path / "often.yaml", {"_base_": "_base_/default.yaml", "train": {"log_every": 5}})
    write(tmp_path / "flip.yaml", {"_base_": "_base_/default.yaml", "eval": {"flip": True}})
    cfg = load_config(write(tmp_path / "both.yaml", {"_base_": ["often.yaml", "flip.yaml"]}))
    assert (cfg.train.log_every, cfg.eval.flip) == (5, True)


def test_a_yaml_alias_bomb_is_refused_in_one_line_before_it_expands(tmp_path):
    """Loading shares the aliased lists, so without the check load_config returns; writing config.yaml hangs."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]  # 9**8 = 43 million values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in levels))
    assert bomb.stat().st_size < 1024
    with pytest.raises(ConfigError, match=r"bomb.yaml: its YAML aliases expand to more than 100000 values"):
        load_config(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("model:\n  kwargs: &k {self: *k}\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: a YAML alias refers to a value that holds it"):
        load_config(loop)
    with pytest.raises(ConfigError, match=r"override model.kwargs: its YAML aliases expand"):
        load_config(tiny_recipe(tmp_path), ["model.kwargs={" + ", ".join(levels).replace(": ", ": ") + "}"])


def test_a_small_alias_is_still_welcome(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("augment:\n  train: &flip [{__class_fullname__: HorizontalFlip, p: 0.5}]\n  val: *flip\n")
    cfg = load_config(path)
    assert cfg.augment.val == cfg.augment.train == [{"__class_fullname__": "HorizontalFlip", "p": 0.5}]
