"""Forward+backward time and peak extra memory of dense focal losses, side by side.

    python benchmarks/benchmark_loss.py [--preset camvid|cityscapes|ade] [--batch N] [--size H W]
                                   [--dtype fp32|bf16|fp16] [--layout nchw|channels_last]
                                   [--device cpu|cuda] [--rounds 15] [--busy N] [--only NAME ...]

Every implementation runs on the same logits and labels in one process, interleaved round by
round after a warm-up, and the median of the rounds is reported with its ratio to segfocal's
fused loss, beside the 90th and 99th percentiles (the tail: a call stalled by the scheduler).
``--busy N`` runs N competing busy processes (pure CPU spinners) while the rounds are timed.
Peak extra memory is what a forward+backward allocates beyond its inputs: on CUDA from the
caching allocator's peak, on the CPU from the peak resident size of a fresh subprocess per
implementation (Linux; the CPU allocator keeps no peak counter). On a GPU the memory
traffic lower bound (logits read once, gradient written once, labels read once) is printed
with each implementation's fraction of a measured device-to-device copy bandwidth.

Peers: the two reference implementations of the source write-up (kept in ``tests/``),
``F.cross_entropy`` with batch ENet weights (the stock floor), segmentation-models-pytorch's
FocalLoss, and kornia's and MONAI's focal losses where installed (``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segfocal.losses import class_weights, focal_loss  # noqa: E402
from tests.reference_seeds import focal_loss_my, focal_loss_zhihu  # noqa: E402  (the write-up's two)

PRESETS = {  # (batch, classes, height, width)
    "camvid": (8, 12, 360, 480),
    "cityscapes": (8, 19, 512, 1024),
    "ade": (16, 150, 512, 512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE = 255
TAIL_PERCENTILES = (90, 99)  # printed beside the median
# A competing process: pure CPU, checking now and then that the benchmark (its parent) is alive, so
# that it ends by itself even if the benchmark is killed before it can stop it.
SPINNER = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    for _ in range(10**6): pass"


def implementations(num_classes: int) -> Dict[str, Callable]:
    """name -> loss(logits, target): the mean focal loss with gamma = 2; segfocal's with batch ENet
    weights (the write-up's and the peers' losses have no on-the-fly weights: unweighted)."""
    impls = {
        "segfocal fused": lambda x, t: focal_loss(x, t, implementation="fused", validate=False),
        "segfocal reference": lambda x, t: focal_loss(x, t, implementation="reference", validate=False),
        "F.cross_entropy weighted": lambda x, t: F.cross_entropy(
            x, t, weight=class_weights(t, num_classes).to(x.dtype), ignore_index=IGNORE),
        "write-up focal_loss_my": lambda x, t: focal_loss_my(x, t),
        "write-up focal_loss_zhihu": lambda x, t: focal_loss_zhihu(x, t),
    }
    try:
        from segmentation_models_pytorch.losses import FocalLoss as SmpFocal

        smp_focal = SmpFocal("multiclass", gamma=2.0, ignore_index=IGNORE)
        impls["smp FocalLoss"] = lambda x, t: smp_focal(x, t)
    except ImportError:
        pass
    try:
        from kornia.losses import focal_loss as kornia_focal

        impls["kornia focal_loss"] = lambda x, t: kornia_focal(x, t, alpha=None, gamma=2.0, reduction="mean")
    except ImportError:
        pass
    try:
        from monai.losses import FocalLoss as MonaiFocal

        monai_focal = MonaiFocal(gamma=2.0, use_softmax=True, to_onehot_y=True)
        impls["MONAI FocalLoss"] = lambda x, t: monai_focal(x, t.unsqueeze(1))
    except ImportError:
        pass
    return impls


def make_inputs(shape, dtype, layout, device, seed=0):
    """Logits ~ N(0, 2^2) and uniform labels, every pixel labelled (the peers have no ignore label).

    Generated in place, so that no temporary larger than the inputs raises the process's peak
    memory before the measurement starts.
    """
    batch, classes, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    logits = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
    logits.normal_(0.0, 2.0, generator=generator)
    logits = logits.to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch, height, width), generator=generator)
    return logits.requires_grad_(), target.to(device)


def forward_backward(fn, logits, target):
    loss = fn(logits, target)
    loss.backward()
    logits.grad = None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(impls, logits, target, device, warmup, rounds) -> Dict[str, list]:
    """Median-ready lists of seconds, implementations interleaved within each round."""
    usable = {}
    for name, fn in impls.items():
        try:
            for _ in range(warmup):
                forward_backward(fn, logits, target)
            usable[name] = fn
        except Exception as error:  # a peer that cannot run this case is reported, not fatal
            print(f"  skipped {name}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    times = {name: [] for name in usable}
    for _ in range(rounds):
        for name, fn in usable.items():
            synchronize(device)
            start = time.perf_counter()
            forward_backward(fn, logits, target)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolated linearly between the sorted values (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[List[subprocess.Popen]]:
    """``count`` CPU spinners running for the duration of the block, stopped on leaving it, also on
    an error or Ctrl-C (and ending by themselves should this process die first)."""
    spinners: List[subprocess.Popen] = []
    try:
        for _ in range(count):
            spinners.append(subprocess.Popen([sys.executable, "-c", SPINNER, str(os.getpid())],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def cuda_peak_extra(fn, logits, target) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(fn, logits, target)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_extra(name: str, args: argparse.Namespace) -> float:
    """Peak resident bytes added by one forward+backward, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--measure-memory-of", name, "--preset", args.preset, "--dtype", args.dtype,
               "--layout", args.layout, "--device", "cpu"] + (["--batch", str(args.batch)] if args.batch else [])
    command += ["--size", *map(str, args.size)] if args.size else []
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(json.loads(output.strip().splitlines()[-1])["peak_extra_bytes"])


def measure_memory_in_this_process(name: str, args: argparse.Namespace, shape) -> None:
    """Peak resident bytes of one forward+backward beyond what the process held before it.

    Linux's peak counter (VmHWM) is reset first (``clear_refs`` 5), so the imports and the input
    generation do not mask the measurement.
    """
    logits, target = make_inputs(shape, DTYPES[args.dtype], args.layout, torch.device("cpu"))
    fn = implementations(shape[1])[name]
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    forward_backward(fn, logits, target)
    print(json.dumps({"peak_extra_bytes": _status_bytes("VmHWM") - before}))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="camvid")
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="override the preset's height and width")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N competing busy processes (CPU spinners) while the rounds are timed")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="time only these implementations (their names "
                        "as printed, e.g. 'segfocal fused' 'F.cross_entropy weighted')")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--measure-memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.busy < 0:
        parser.error(f"--busy must be 0 or more, not {args.busy}")
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, not {args.rounds}")
    batch, classes, height, width = PRESETS[args.preset]
    shape = (args.batch or batch, classes, *(args.size or (height, width)))
    if args.measure_memory_of:
        measure_memory_in_this_process(args.measure_memory_of, args, shape)
        return

    device = torch.device(args.device)
    logits, target = make_inputs(shape, DTYPES[args.dtype], args.layout, device)
    impls = implementations(classes)
    if args.only:
        unknown = sorted(set(args.only) - set(impls))
        if unknown:
            parser.error(f"--only: no implementation {', '.join(map(repr, unknown))} here; there are "
                         f"{', '.join(map(repr, impls))}")
        impls = {name: fn for name, fn in impls.items() if name in args.only}
    print(f"preset {args.preset} {tuple(shape)} {args.dtype} {args.layout} on {device_name(device)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f"; {args.busy} competing busy process{'es' if args.busy > 1 else ''}" if args.busy else ""))
    with busy_processes(args.busy):
        times = time_side_by_side(impls, logits, target, device, args.warmup, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    gradient_bytes = logits.numel() * logits.element_size()
    traffic = 2 * gradient_bytes + target.numel() * target.element_size()
    bandwidth = copy_bandwidth(device, gradient_bytes) if device.type == "cuda" else None
    reference = medians.get("segfocal fused")
    print(f"{'implementation':<28}{'median ms':>11}{'p90 ms':>9}{'p99 ms':>9}{'vs fused':>10}{'peak extra MiB':>16}"
          f"{'x gradient':>12}" + (f"{'GB/s':>9}{'of copy':>9}" if bandwidth else ""))
    for name, median in sorted(medians.items(), key=lambda item: item[1]):
        peak = None
        if not args.no_memory:
            peak = cuda_peak_extra(impls[name], logits, target) if device.type == "cuda" else cpu_peak_extra(name, args)
        tail = "".join(f"{percentile(times[name], q) * 1e3:>9.2f}" for q in TAIL_PERCENTILES)
        row = f"{name:<28}{median * 1e3:>11.2f}{tail}{median / reference if reference else float('nan'):>10.2f}"
        row += f"{peak / 2**20:>16.1f}{peak / gradient_bytes:>12.2f}" if peak is not None else f"{'-':>16}{'-':>12}"
        if bandwidth:
            row += f"{traffic / median / 1e9:>9.0f}{traffic / median / bandwidth:>9.2f}"
        print(row)
    if bandwidth:
        print(f"memory-traffic lower bound {traffic / 2**20:.1f} MiB: {traffic / bandwidth * 1e3:.3f} ms at the "
              f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


if __name__ == "__main__":
    main()
