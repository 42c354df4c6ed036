"""One optimiser step as a plain function (segfocal.engine.step.train_step), without a Trainer:
the accumulation group's weighting against a float64 hand computation, and the skipped step."""
import math

import pytest
import torch
from torch import nn

from segfocal.engine.precision import Precision
from segfocal.engine.step import StepSettings, train_step

LR = 0.1
FP32 = StepSettings(torch.device("cpu"), Precision("cpu", None))


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 1)


def squared_error(output, target):
    return ((output.squeeze(1) - target) ** 2).mean()


def micro_batches(sizes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=generator), torch.randn(n, generator=generator)) for n in sizes]


def test_a_group_of_micro_batches_is_one_sgd_step_on_the_mean_of_their_losses():
    model = linear_model()
    weight, bias = model.weight.detach().double().clone(), model.bias.detach().double().clone()
    group = micro_batches([2, 3, 1])  # sizes differ: each micro-batch's mean loss counts 1/3
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    outcome = train_step(model, iter(group), len(group), squared_error, optimizer,
                         torch.amp.GradScaler("cpu", enabled=False), FP32)

    grad_w, grad_b, losses = torch.zeros_like(weight), torch.zeros_like(bias), []
    for x, y in group:  # d/dw mean((x w^T + b - y)^2) in float64, by hand
        x, y = x.double(), y.double()
        residual = (x @ weight.T).squeeze(1) + bias - y
        losses.append(float((residual ** 2).mean()))
        grad_w += (2 * residual[:, None] * x).mean(0, keepdim=True) / len(group)
        grad_b += (2 * residual).mean().reshape(1) / len(group)
    assert outcome.applied and outcome.micro_batches == 3
    assert float(outcome.loss_sum) == pytest.approx(sum(losses), rel=1e-6)
    torch.testing.assert_close(model.weight.detach().double(), weight - LR * grad_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias.detach().double(), bias - LR * grad_b, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # the gradient is freed after the step


def test_clipping_scales_the_gradient_to_the_norm_asked_for():
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    group = micro_batches([4])
    reference = linear_model()
    squared_error(reference(group[0][0]), group[0][1]).backward()
    gradient = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert gradient.norm() > 0.01
    train_step(model, iter(group), 1, squared_error, torch.optim.SGD(model.parameters(), lr=1.0),
               torch.amp.GradScaler("cpu", enabled=False), StepSettings(torch.device("cpu"), Precision("cpu", None),
                                                                       max_norm=0.01))
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(moved.norm()) == pytest.approx(0.01, rel=1e-4)
    torch.testing.assert_close(moved / moved.norm(), gradient / gradient.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16-scaler"])
def test_a_non_finite_loss_skips_the_step_and_a_float16_scaler_lowers_its_scale(scaled):
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    settings = StepSettings(torch.device("cpu"), Precision("cpu", torch.float16 if scaled else None))
    scaler = settings.precision.grad_scaler()
    assert scaler.is_enabled() == scaled

    def nan_loss(output, target):
        return squared_error(output, target) * math.nan

    outcome = train_step(model, iter(micro_batches([2, 2])), 2, nan_loss, torch.optim.SGD(model.parameters(), lr=LR),
                         scaler, settings)
    assert not outcome.applied and math.isnan(float(outcome.loss_sum))
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    if scaled:
        assert scaler.get_scale() == 2.0 ** 15  # 2**16 halved: the scaler saw the overflow
    outcome = train_step(model, iter(micro_batches([2])), 1, squared_error, torch.optim.SGD(model.parameters(), lr=LR),
                         scaler, settings)
    assert outcome.applied and not all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
