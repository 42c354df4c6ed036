"""sync_histogram under torch.distributed (2 gloo processes on the CPU) equals one process on the
concatenated batch: the same class weights, the global loss as the average of the ranks' losses,
and the global gradient as DistributedDataParallel's average of the ranks' gradients."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segfocal.losses import FocalLoss, focal_loss

WORLD_SIZE = 2
CASES = [
    dict(weight="enet"),
    dict(weight="median", normalize="weights", poly_epsilon=0.5),
    dict(weight="inverse", alpha=0.25, implementation="reference"),
    dict(weight=None, gamma=0.5),
]


def global_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=generator, dtype=torch.float64) * 2
    target = torch.randint(0, 5, (4, 6, 7), generator=generator)
    target[0, :3] = 255  # the ranks see different numbers of valid pixels
    target[1][target[1] == 4] = 255  # and rank 0 has no pixel of class 4
    return logits, target


def worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        logits, target = global_batch()
        shard = slice(2 * rank, 2 * rank + 2)
        out = []
        for options in CASES:
            x = logits[shard].clone().requires_grad_(True)
            loss = focal_loss(x, target[shard], sync_histogram=True, **options)
            (grad,) = torch.autograd.grad(loss, x)
            module = FocalLoss(sync_histogram=True, **options)
            module(logits[shard], target[shard])
            out.append((loss.detach(), grad, module.last_class_weights))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("unused", [None])  # one spawn for all cases, a few seconds
def test_synced_histogram_matches_the_global_batch(tmp_path, unused):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=WORLD_SIZE, join=True)
    logits, target = global_batch()
    for case_index, options in enumerate(CASES):
        x = logits.clone().requires_grad_(True)
        expected = focal_loss(x, target, **options)
        (expected_grad,) = torch.autograd.grad(expected, x)
        module = FocalLoss(**options)
        module(logits, target)
        losses = [results[rank][case_index][0] for rank in range(WORLD_SIZE)]
        torch.testing.assert_close(sum(losses) / WORLD_SIZE, expected.detach(), rtol=1e-12, atol=0)
        for rank in range(WORLD_SIZE):
            _, grad, weights = results[rank][case_index]
            shard = slice(2 * rank, 2 * rank + 2)
            torch.testing.assert_close(grad / WORLD_SIZE, expected_grad[shard], rtol=1e-10, atol=1e-15)
            if options["weight"] is not None:
                torch.testing.assert_close(weights, module.last_class_weights, rtol=1e-12, atol=0)


def test_without_a_process_group_sync_is_a_no_op():
    logits, target = global_batch()
    assert torch.equal(focal_loss(logits, target, sync_histogram=True), focal_loss(logits, target))
