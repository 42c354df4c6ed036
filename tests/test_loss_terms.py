"""``loss.terms``: validated at load naming the item's key, the combined criterion equals its terms'
weighted sum, a single ``loss.name`` is unchanged, and a run with terms trains and checkpoints."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from segfocal.config import ConfigError, LossTermConfig, config_from_tree, load_config
from segfocal.engine.checkpoint import load_checkpoint
from segfocal.engine.criterion import WeightedSum, build_criterion
from segfocal.engine.trainer import Trainer
from segfocal.losses import WEIGHT_SCHEMES, FocalLoss, class_weights, dice_loss, focal_loss

from recipes import REPO, tiny_recipe

NUM_CLASSES, IGNORE = 6, 255


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2, NUM_CLASSES, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, NUM_CLASSES, (2, 5, 6), generator=g)
    target[0, :2] = IGNORE
    return logits, target


def test_terms_load_as_dataclasses_with_defaults(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path, loss__terms=[{"name": "focal"}, {"name": "dice", "weight": 0.5,
                                                                              "batch": True}]))
    focal, dice = cfg.loss.terms
    assert isinstance(focal, LossTermConfig) and focal.name == "focal" and focal.weight == 1.0
    assert focal.class_weight == "auto" and focal.gamma == 2.0
    assert dice.weight == 0.5 and dice.batch is True and dice.smooth_nr == 1e-5
    assert load_config(tiny_recipe(tmp_path)).loss.terms == []  # absent: the single loss.name


@pytest.mark.parametrize("terms, message", [
    ("[{name: focal}, {name: dise}]",
     r"loss.terms\[1\].name must be one of \['focal', 'cross_entropy', 'dice'\], got 'dise'"),
    ("[{weight: 1.0}]", r"loss.terms\[0\].name must be one of .*, but it is missing"),
    ("[{name: dice, smooth: 1.0}]", r"unknown key 'loss.terms\[0\].smooth'; did you mean 'loss.terms\[0\].smooth_nr'"),
    ("[{name: focal, gamma: two}]", r"loss.terms\[0\].gamma must be of type float, got 'two'"),
    ("[{name: focal}, {name: dice, gamma: 3}]",
     r"loss.terms\[1\].gamma=3.0 applies to focal terms only, and this term is dice"),
    ("[{name: cross_entropy, smooth_dr: 1.0}]",
     r"loss.terms\[0\].smooth_dr=1.0 applies to dice terms only, and this term is cross_entropy"),
    ("[{name: dice, weight: -1}]", r"loss.terms\[0\].weight must be a finite number >= 0, got -1"),
    ("[{name: dice, smooth_dr: 0}]", r"loss.terms\[0\].smooth_dr must be a finite number > 0, got 0"),
    ("[{name: dice, smooth_nr: .nan}]", r"loss.terms\[0\].smooth_nr must be a finite number >= 0, got nan"),
    ("[{name: focal}, {name: dice, class_weight: enett}]",
     rf"loss.terms\[1\].class_weight must be one of {', '.join(WEIGHT_SCHEMES)}, auto, a list or null, "
     r"got 'enett'"),
    ("[{name: dice, class_weight: [1.0, 2.0]}]",
     r"loss.terms\[0\].class_weight must be one finite value >= 0 per class \(data.num_classes=6\)"),
    ("[{name: focal, alpha: 1.5}]", r"loss.terms\[0\].alpha must be in \[0, 1\]"),
    ("[{name: focal, normalize: voxels}]", r"loss.terms\[0\].normalize must be one of \['pixels', 'weights'\]"),
    ("[{name: focal, histogram_momentum: 1.0}]", r"loss.terms\[0\].histogram_momentum must be in \[0, 1\)"),
    ("[{name: focal, weight: 0}, {name: dice, weight: 0}]", r"loss.terms: every term has weight 0"),
    ("{name: focal}", r"loss.terms must be a list"),
])
def test_bad_terms_are_config_errors_naming_the_item(tmp_path, terms, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_recipe(tmp_path), [f"loss.terms={terms}"])


def test_an_unknown_loss_weight_scheme_is_refused_at_load(tmp_path):
    assert WEIGHT_SCHEMES[:4] == ("enet", "inverse", "median", "effective")
    with pytest.raises(ConfigError, match=rf"loss.weight must be one of {', '.join(WEIGHT_SCHEMES)}, a list or "
                                          r"null, got 'enett'"):
        load_config(tiny_recipe(tmp_path), ["loss.weight=enett"])


def test_the_shipped_defaults_and_the_readme_name_every_weight_scheme():
    """The schemes are one list, WEIGHT_SCHEMES: the config takes exactly it (the tests around load each and
    refuse others); the prose that lists them is checked against it, so a new scheme is not left out."""
    defaults = (REPO / "configs" / "_base_" / "default.yaml").read_text()
    comment = re.search(r"^  weight: enet +# .*\(([^)]*)\)", defaults, re.MULTILINE)
    assert comment is not None and comment.group(1).split(" | ") == list(WEIGHT_SCHEMES)
    readme_row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `weight` |"))
    assert sorted(re.findall(r'"(\w+)"', readme_row)) == sorted(WEIGHT_SCHEMES)


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
@pytest.mark.parametrize("terms", [False, True])
def test_every_weight_scheme_is_usable_from_the_config(tmp_path, scheme, terms):
    """A scheme added to segfocal.losses.class_weights is a config choice with no second list to edit."""
    override = f"loss.terms=[{{name: cross_entropy, class_weight: {scheme}}}]" if terms else f"loss.weight={scheme}"
    cfg = load_config(tiny_recipe(tmp_path), [override])
    criterion = build_criterion(cfg.loss, cfg.data.num_classes, cfg.data.ignore_index)
    logits, target = torch.randn(2, cfg.data.num_classes, 5, 5), torch.randint(0, cfg.data.num_classes, (2, 5, 5))
    assert torch.isfinite(criterion(logits, target))
    expected = class_weights(target, cfg.data.num_classes, scheme, ignore_index=cfg.data.ignore_index)
    torch.testing.assert_close(criterion.last_class_weights, expected)


def test_focal_dice_and_cross_entropy_terms_equal_their_weighted_sum(tmp_path):
    terms = [
        {"name": "focal", "weight": 0.7, "gamma": 1.5, "poly_epsilon": 0.5},
        {"name": "dice", "weight": 2.0, "smooth_nr": 0.5, "smooth_dr": 0.25, "batch": True},
        {"name": "cross_entropy", "weight": 0.3, "class_weight": None},
    ]
    cfg = load_config(tiny_recipe(tmp_path, loss__terms=terms))
    criterion = build_criterion(cfg.loss, NUM_CLASSES, IGNORE)
    logits, target = _batch()
    logits.requires_grad_(True)
    combined = criterion(logits, target)
    separate = (0.7 * focal_loss(logits, target, gamma=1.5, poly_epsilon=0.5, weight="enet", ignore_index=IGNORE)
                + 2.0 * dice_loss(logits, target, smooth_nr=0.5, smooth_dr=0.25, batch=True, ignore_index=IGNORE)
                + 0.3 * F.cross_entropy(logits, target, ignore_index=IGNORE))
    torch.testing.assert_close(combined, separate, rtol=1e-12, atol=0)
    (grad_combined,) = torch.autograd.grad(combined, logits)
    (grad_separate,) = torch.autograd.grad(separate, logits)
    torch.testing.assert_close(grad_combined, grad_separate, rtol=1e-10, atol=1e-14)
    # the focal term's ENet weights are the ones the trainer logs
    torch.testing.assert_close(criterion.last_class_weights,
                               class_weights(target, NUM_CLASSES, "enet", ignore_index=IGNORE, dtype=torch.float64))


def test_class_weights_logged_are_the_first_weighted_terms(tmp_path):
    terms = [{"name": "dice"}, {"name": "dice", "class_weight": "inverse"}, {"name": "focal", "class_weight": "median"}]
    criterion = build_criterion(load_config(tiny_recipe(tmp_path, loss__terms=terms)).loss, NUM_CLASSES, IGNORE)
    assert criterion.last_class_weights is None  # nothing computed yet
    logits, target = _batch(1)
    criterion(logits, target)
    expected = class_weights(target, NUM_CLASSES, "inverse", ignore_index=IGNORE, dtype=torch.float64)
    torch.testing.assert_close(criterion.last_class_weights, expected, rtol=0, atol=0)


def test_without_terms_the_single_loss_and_its_state_dict_are_unchanged(tmp_path):
    cfg = load_config(tiny_recipe(tmp_path), ["loss.histogram_momentum=0.9"])
    criterion = build_criterion(cfg.loss, NUM_CLASSES, IGNORE)
    assert type(criterion) is FocalLoss
    assert sorted(criterion.state_dict()) == ["histogram_updates", "running_histogram"]  # as saved in checkpoints


def test_term_buffers_round_trip_through_the_state_dict(tmp_path):
    terms = [{"name": "focal", "histogram_momentum": 0.8}, {"name": "dice", "class_weight": [0.0, 1, 1, 1, 1, 1]}]
    cfg = load_config(tiny_recipe(tmp_path, loss__terms=terms))
    trained = build_criterion(cfg.loss, NUM_CLASSES, IGNORE)
    for seed in range(3):
        trained(*_batch(seed))
    state = trained.state_dict()
    assert sorted(state) == ["terms.0.histogram_updates", "terms.0.running_histogram", "terms.1.weight"]
    fresh = build_criterion(cfg.loss, NUM_CLASSES, IGNORE)
    fresh.load_state_dict(state)
    logits, target = _batch(7)
    torch.testing.assert_close(fresh(logits, target), trained(logits, target), rtol=0, atol=0)


def test_a_run_with_focal_and_dice_terms_trains_and_its_checkpoint_restores_the_criterion(tmp_path):
    """The criterion a run trained with, restored from last.pt with its running histogram, gives the trained
    criterion's loss and gradient exactly, and that gradient is the terms' gradients weighted by the config."""
    import copy

    terms = [{"name": "focal", "weight": 0.5, "histogram_momentum": 0.9}, {"name": "dice", "weight": 2.0}]
    cfg = load_config(tiny_recipe(tmp_path, loss__terms=terms, train__epochs=1, train__log_images=0))
    trainer = Trainer(cfg, progress=False)
    assert isinstance(trainer.parts.criterion, WeightedSum)
    trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert config_from_tree(checkpoint["config"]).loss.terms == cfg.loss.terms  # the saved config reloads
    assert int(checkpoint["criterion"]["terms.0.histogram_updates"]) == len(trainer.data.train_loader)
    restored = build_criterion(cfg.loss, cfg.data.num_classes, cfg.data.ignore_index)
    restored.load_state_dict(checkpoint["criterion"])
    assert trainer.parts.criterion.last_class_weights is not None  # logged as class_weight, as for one focal loss

    logits, target = _batch(3)

    def loss_and_gradient(criterion):
        """Loss and gradient of a copy of ``criterion`` (a call moves its running histogram on)."""
        x = logits.clone().requires_grad_(True)
        loss = copy.deepcopy(criterion)(x, target)
        return loss, torch.autograd.grad(loss, x)[0]

    loss, gradient = loss_and_gradient(restored)
    trained_loss, trained_gradient = loss_and_gradient(trainer.parts.criterion)
    torch.testing.assert_close(loss, trained_loss, rtol=0, atol=0)
    torch.testing.assert_close(gradient, trained_gradient, rtol=0, atol=0)
    (_, focal_gradient), (_, dice_gradient) = (loss_and_gradient(term) for term in restored.terms)
    torch.testing.assert_close(gradient, 0.5 * focal_gradient + 2.0 * dice_gradient, rtol=1e-12, atol=1e-15)
    fresh = build_criterion(cfg.loss, cfg.data.num_classes, cfg.data.ignore_index)  # no running histogram
    assert (loss_and_gradient(fresh)[1] - gradient).abs().max() > 1e-6  # so the restored state mattered
