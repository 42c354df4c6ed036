"""all_reduce of the device-side metric states over a real two-process gloo group on the CPU."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from segfocal.evaluation import BinnedAUROC, ConfusionMatrix

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _rank_data(rank: int):
    generator = torch.Generator().manual_seed(rank)
    target = torch.randint(0, 3, (2, 5, 6), generator=generator)
    target[0, 0] = 255
    pred = torch.randint(0, 3, (2, 5, 6), generator=generator)
    probs = torch.rand(2, 3, 5, 6, generator=generator).softmax(dim=1)
    return pred, target, probs


def _worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, target, probs = _rank_data(rank)
        confusion, auroc = ConfusionMatrix(3), BinnedAUROC(3, num_bins=50)
        confusion.update(pred, target)
        auroc.update(probs, target)
        confusion.all_reduce()
        auroc.all_reduce()
        if rank == 0:
            torch.save({"matrix": confusion.matrix, "auroc": auroc.state_dict()["counts"]}, out_file)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    out = tmp_path / "reduced.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    reduced = torch.load(out)
    confusion, auroc = ConfusionMatrix(3), BinnedAUROC(3, num_bins=50)
    for rank in range(2):  # one process seeing both ranks' data
        pred, target, probs = _rank_data(rank)
        confusion.update(pred, target)
        auroc.update(probs, target)
    assert torch.equal(reduced["matrix"], confusion.matrix)
    assert torch.equal(reduced["auroc"], auroc.state_dict()["counts"])
    assert int(reduced["matrix"].sum()) == 2 * (60 - 6)  # 6 ignored pixels per rank
