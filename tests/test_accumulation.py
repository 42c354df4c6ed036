"""Gradient accumulation is exact: each optimiser step is the gradient of the mean of its micro-batches'
losses (the epoch's last, shorter group included; with no ignored pixels, that of the group's samples
as one batch), and under DDP, where the mean spans every rank's micro-batches, gradients are
all-reduced once a step."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from recipes import tiny_recipe

from segfocal.config import load_config
from segfocal.engine.trainer import Trainer

LR = 0.5


def conv_model():
    """A model with no batch statistics or dropout, so a group's micro-batches equal one batch."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 6, 3, padding=1)


def accumulating_trainer(tmp_path, batch_size):
    # cross-entropy without class weights: the mean over the batch's pixels, the loss of one big batch
    config = load_config(tiny_recipe(tmp_path, train__accumulate=3, train__log_images=0, train__epochs=1,
                                     data__batch_size=batch_size, loss__name="cross_entropy", loss__weight=None))
    return Trainer(config, progress=False)


def use_model(trainer, model):
    trainer.parts.model = model
    trainer.parts.bare_model = getattr(model, "module", model)
    trainer.parts.ddp_model = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    trainer.parts.optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer.parts.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.parts.optimizer, lambda step: 1.0)


def epoch_batches(trainer):
    """The epoch's micro-batches, in the order train_one_epoch(0) will see them."""
    trainer._seed_epoch(0)
    batches = list(trainer.data.train_loader)
    trainer._seed_epoch(0)
    return batches


def reference_steps(groups):
    """The weights after one SGD step per group of micro-batches, on the mean of their losses (float64)."""
    model = conv_model().double()
    for group in groups:
        model.zero_grad()
        losses = [F.cross_entropy(model(images.double()), targets.long(), ignore_index=255) for images, targets in group]
        (sum(losses) / len(losses)).backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= LR * parameter.grad
    return model


def grouped(batches, size):
    return [batches[i:i + size] for i in range(0, len(batches), size)]


def assert_same_weights(model, reference):
    for (name, value), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_accumulated_steps_equal_one_big_batch_per_group_with_a_short_last_group(tmp_path):
    trainer = accumulating_trainer(tmp_path, batch_size=4)  # 16 images: 4 micro-batches, groups of 3 and 1
    use_model(trainer, conv_model())
    batches = epoch_batches(trainer)
    assert len(batches) == 4
    trainer.train_one_epoch(0)
    assert trainer.state.step == 2
    expected = reference_steps(grouped(batches, 3))
    assert_same_weights(trainer.parts.model, expected)
    # the short group weighted as a full one (loss / 3) would take a third of its step: that must differ
    first_step = reference_steps(grouped(batches, 3)[:1])
    short_as_full = first_step.weight + (expected.weight - first_step.weight) / 3
    assert not torch.allclose(trainer.parts.model.weight.double(), short_as_full, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world_size, port, root, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # 8 images per rank in batches of 2: 4 micro-batches, groups of 3 and 1
        trainer = accumulating_trainer(root, batch_size=2)
        model = torch.nn.parallel.DistributedDataParallel(conv_model())
        reductions = []

        def counting_allreduce(state, bucket):
            reductions.append(bucket.index())
            work = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True)
            return work.get_future().then(lambda future: future.value()[0])

        model.register_comm_hook(None, counting_allreduce)
        use_model(trainer, model)
        batches = epoch_batches(trainer)
        trainer.train_one_epoch(0)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, batches)
        if rank == 0:
            # a step's batch is every rank's samples of that group
            groups = [sum(parts, []) for parts in zip(*(grouped(b, 3) for b in everyone))]
            torch.save({"weights": [p.detach() for p in model.module.parameters()],
                        "reference": [p.detach() for p in reference_steps(groups).parameters()],
                        "reductions": reductions, "steps": trainer.state.step}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_under_ddp_gradients_are_reduced_once_a_step_and_equal_the_global_batch(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    Trainer(load_config(tiny_recipe(tmp_path, train__epochs=0)), progress=False)  # the data, made once
    out = tmp_path / "result.pt"
    mp.spawn(_ddp_worker, args=(2, port, tmp_path, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert result["steps"] == 2 and result["reductions"] == [0, 0]  # one bucket, all-reduced at each of 2 steps
    for value, expected in zip(result["weights"], result["reference"]):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
