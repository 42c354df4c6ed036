"""Learning-rate schedules against their closed forms."""
import math

import pytest
import torch

from segfocal.config import OptimConfig, ScheduleConfig
from segfocal.engine.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_poly():
    cfg = ScheduleConfig(name="poly", warmup_iters=4, power=0.9)
    assert [lr_factor(cfg, s, 14, 1.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 9, 14, 1.0) == pytest.approx((1 - 5 / 10) ** 0.9)
    assert lr_factor(cfg, 14, 14, 1.0) == 0.0


def test_cosine_with_floor():
    cfg = ScheduleConfig(name="cosine", warmup_iters=0, min_lr=0.1)
    assert lr_factor(cfg, 0, 10, 1.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 5, 10, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(cfg, 10, 10, 1.0) == pytest.approx(0.1)


def test_scheduler_state_dict_resumes_the_curve():
    model = torch.nn.Linear(2, 2)
    cfg = ScheduleConfig(name="poly", warmup_iters=2)
    optimizer = build_optimizer(OptimConfig(lr=0.5), model)
    scheduler = build_scheduler(cfg, optimizer, 10, 0.5)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    fresh_optimizer = build_optimizer(OptimConfig(lr=0.5), model)
    fresh = build_scheduler(cfg, fresh_optimizer, 10, 0.5)
    fresh.load_state_dict(saved)
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    assert fresh.get_last_lr()[0] == pytest.approx(0.5 * (1 - 4 / 8) ** 0.9)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(OptimConfig(weight_decay=0.01), model)
    decayed, plain = optimizer.param_groups
    assert [p.ndim for p in decayed["params"]] == [4] and decayed["weight_decay"] == 0.01
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
