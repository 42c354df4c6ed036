"""End-to-end training throughput (images/s) of a segmentation model with each loss, side by side.

    python benchmarks/benchmark_train.py [--arch Unet] [--encoder resnet18] [--batch 8] [--size 352 480]
                                    [--classes 12] [--amp auto|bf16|fp16|fp32] [--layout channels_last|nchw]
                                    [--steps 10] [--rounds 5] [--device cpu|cuda] [--compile]

One model per loss, all with the same initial weights. A round runs ``--steps`` optimizer steps
(autocast forward, loss, backward, AdamW step; a GradScaler under fp16) for every loss in turn,
on one random batch held on the device: data loading is left out, and a drift in machine load
hits every loss alike. After one warm-up round, prints the median images/s of each loss over the
rounds and its ratio to segfocal's. ``--compile`` runs every model under ``torch.compile`` (the
warm-up round then includes Inductor's compilation).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's segfocal

from segfocal.config import ModelConfig  # noqa: E402
from segfocal.engine.precision import resolve_precision  # noqa: E402
from segfocal.losses import CrossEntropy, FocalLoss  # noqa: E402
from segfocal.models import build_model  # noqa: E402

IGNORE = 255


def losses() -> Dict[str, Callable]:
    """name -> criterion(logits, target); the focal losses with gamma = 2."""
    from segmentation_models_pytorch.losses import FocalLoss as SmpFocal

    return {
        "segfocal FocalLoss (batch ENet)": FocalLoss(weight="enet", ignore_index=IGNORE),
        "smp FocalLoss": SmpFocal("multiclass", gamma=2.0, ignore_index=IGNORE),
        "F.cross_entropy": lambda x, t: F.cross_entropy(x.float(), t, ignore_index=IGNORE),
        "F.cross_entropy (batch ENet)": CrossEntropy("enet", IGNORE, enet_c=1.10, effective_beta=0.9999,
                                                     sync_histogram=False),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[352, 480], metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per loss and round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (as train.compile does)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    precision = resolve_precision(args.amp, device)
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=args.arch, encoder_name=args.encoder), args.classes)
    model = model.to(device, memory_format=memory_format).train()
    images = torch.randn(args.batch, 3, *args.size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, args.classes, (args.batch, *args.size), device=device)
    target[torch.rand(target.shape, device=device) < 0.05] = IGNORE

    runs = {}
    for name, criterion in losses().items():
        replica = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(replica.parameters(), lr=1e-3)
        runs[name] = (torch.compile(replica) if args.compile else replica, criterion, optimizer,
                      precision.grad_scaler())
    rates: Dict[str, list] = {name: [] for name in runs}
    last_loss: Dict[str, float] = {}
    for round_index in range(args.rounds + 1):
        for name, (replica, criterion, optimizer, scaler) in runs.items():
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss = criterion(replica(images), target)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            _synchronize(device)
            if round_index > 0:  # round 0 warms up (allocator, kernels, autotuning)
                rates[name].append(args.steps * args.batch / (time.perf_counter() - started))
            last_loss[name] = loss.item()

    print(f"{args.arch}/{args.encoder}, batch {args.batch} x {args.size[0]}x{args.size[1]}, {args.classes} classes, "
          f"amp {precision.autocast_dtype or 'off'}, {args.layout}{', torch.compile' if args.compile else ''}, "
          f"on {_device_name(device)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"median of {args.rounds} rounds of {args.steps} steps")
    reference = statistics.median(rates["segfocal FocalLoss (batch ENet)"])
    print(f"{'loss':<34}{'images/s':>10}{'vs segfocal':>13}{'last loss':>11}")
    for name, values in sorted(rates.items(), key=lambda item: -statistics.median(item[1])):
        median = statistics.median(values)
        print(f"{name:<34}{median:>10.2f}{median / reference:>13.2f}{last_loss[name]:>11.4f}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


if __name__ == "__main__":
    main()
