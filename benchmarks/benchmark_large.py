"""Images larger than memory: training from lazily read crops, tiled prediction, class-aware sampling.

    python benchmarks/benchmark_large.py make-data --out DIR [--images 8] [--size 16384] [--crops 2048]
    python benchmarks/benchmark_large.py train --data DIR [--source both|patches|png] [--workers 2] [--rounds 3]
    python benchmarks/benchmark_large.py predict --out DIR [--size 20000]
    python benchmarks/benchmark_large.py rare-share [--rare-fraction 0.33] [--size 48] [--schemes enet inverse]

``make-data`` writes ``--images`` synthetic ``--size``-square RGB uint8 tiled TIFFs (256x256 tiles, the
synthetic set's shapes drawn tile by tile) with their masks, and the first ``--crops`` training crops of epoch 0
cut out as PNG files (the same crops, so both sources train on identical pixels). ``train`` trains the default
UNet (ResNet-18) on 256x256 crops from both sources side by side in one process, round by round (each source's
loader with ``--workers`` workers, its iterator kept across rounds), and prints images/s of training and of
the loaders alone, and the peak PSS (proportional set size: shared pages counted once) of the process and its
workers together, sampled every 0.1 s. ``predict`` writes a ``--size``-square single-channel tiled TIFF and
predicts it tile by tile with a small random-weight UNet on the CPU (``segfocal predict``'s tiled path),
reporting the peak resident set. ``rare-share`` counts the labels of one epoch's crops of the default synthetic
recipe with and without class-aware sampling (each class's share of training pixels, and the share of samples
that hold at least one of its pixels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's segfocal

TILE = 256


# -- memory ------------------------------------------------------------------------------------
def _descendants(pid: int) -> List[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child] + _descendants(child)
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """The peak PSS of this process and its descendants (DataLoader workers), sampled in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak_kib, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [os.getpid()] + _descendants(os.getpid())
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(pid) for pid in pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak_kib / 2 ** 20


# -- data --------------------------------------------------------------------------------------
def _tiles(size: int, seed: int, masks: np.ndarray, channels: int = 3):
    """The image's tiles in row-major order (the synthetic set's shapes per tile), filling ``masks`` alongside."""
    from segfocal.data.synthetic import make_sample

    rng = np.random.default_rng(seed)
    for top in range(0, size, TILE):
        for left in range(0, size, TILE):
            image, mask = make_sample(rng, TILE, 6, 255)
            masks[top:top + TILE, left:left + TILE] = mask  # masks is padded to whole tiles
            yield image if channels == 3 else np.ascontiguousarray(image[..., :1])


def write_tiled(path: Path, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """A ``size``-square tiled TIFF written tile by tile; returns its mask (uint8, in memory)."""
    import tifffile

    masks = np.zeros((-(-size // TILE) * TILE,) * 2, np.uint8)
    shape = (size, size, 3) if channels == 3 else (size, size)
    tifffile.imwrite(path, _tiles(size, seed, masks, channels), shape=shape, dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb" if channels == 3 else "minisblack", bigtiff=True)
    return masks[:size, :size]


def make_data(args: argparse.Namespace) -> None:
    import tifffile
    from PIL import Image

    from segfocal.data import build_dataset

    out = Path(args.out)
    for folder in ("large/train/images", "large/train/masks", "png/train/images", "png/train/masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index in range(args.images):
        started = time.perf_counter()
        mask = write_tiled(out / f"large/train/images/{index}.tif", args.size, index)
        tifffile.imwrite(out / f"large/train/masks/{index}.tif", mask, tile=(TILE, TILE), bigtiff=True)
        print(f"image {index}: {time.perf_counter() - started:.0f} s", flush=True)
    dataset = build_dataset(_config(out, args.crops).data, [], "train", seed=0, random_crops=True)
    dataset.validate(6, 255)
    for index in range(args.crops):
        number, top, left = dataset._draw(np.random.default_rng([0, 0, index]))
        image, mask = dataset._crop(number, top, left)
        Image.fromarray(image).save(out / f"png/train/images/{index:05d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(out / f"png/train/masks/{index:05d}.png")
    print(f"wrote {args.images} images of {args.size}x{args.size} and {args.crops} PNG crops under {out}")


def _config(out: Path, per_epoch: int, root: str = "large", patches: bool = True):
    from segfocal.config import config_from_tree

    data = {"root": str(out / root), "num_classes": 6, "num_workers": 2, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
    if patches:
        data["patches"] = {"size": [TILE, TILE], "per_epoch": per_epoch}
    return config_from_tree({"data": data})


# -- training ----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> None:
    import torch

    from segfocal.config import ModelConfig
    from segfocal.data import build_dataset, build_loader
    from segfocal.losses import FocalLoss
    from segfocal.models import build_model

    out = Path(args.data)
    augment = [{"__class_fullname__": "HorizontalFlip", "p": 0.5}]
    sources = {}
    if args.source in ("both", "patches"):
        patch_set = build_dataset(_config(out, 10 ** 6).data, augment, "train", seed=0, random_crops=True)
        patch_set.validate(6, 255)
        sources["tiled TIFF crops (data.patches)"] = patch_set
    if args.source in ("both", "png"):
        png_set = build_dataset(_config(out, 0, root="png", patches=False).data, augment, "train")
        sources["the same crops as PNG files"] = png_set
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 6).train()
    criterion = FocalLoss(weight="enet", ignore_index=255)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    streams = {name: iter(build_loader(dataset, args.batch, shuffle=True, num_workers=args.workers, seed=0,
                                       drop_last=True)) for name, dataset in sources.items()}
    trained: Dict[str, list] = {name: [] for name in streams}
    loaded: Dict[str, list] = {name: [] for name in streams}
    with PeakMemory() as memory:
        for round_index in range(args.rounds + 1):
            for name, stream in streams.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    images, masks = next(stream)
                    optimizer.zero_grad(set_to_none=True)
                    criterion(model(images), masks).backward()
                    optimizer.step()
                elapsed = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(args.steps * 4):
                    next(stream)
                if round_index:  # round 0 warms up (workers started, files opened, caches)
                    trained[name].append(args.steps * args.batch / elapsed)
                    loaded[name].append(args.steps * 4 * args.batch / (time.perf_counter() - started))
            print(f"round {round_index}: peak PSS so far {memory.gib:.2f} GiB", flush=True)
    print(f"UNet/resnet18, batch {args.batch} x {TILE}x{TILE}, {args.workers} workers per loader, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds of "
          f"{args.steps} training steps and {args.steps * 4} loader-only batches")
    print(f"{'source':<34}{'train images/s':>16}{'loader images/s':>17}")
    for name in streams:
        print(f"{name:<34}{statistics.median(trained[name]):>16.2f}{statistics.median(loaded[name]):>17.1f}")
    print(f"peak PSS of the process and its {args.workers * len(streams)} workers: {memory.gib:.2f} GiB")


# -- prediction --------------------------------------------------------------------------------
def predict(args: argparse.Namespace) -> None:
    import resource

    import torch
    import yaml

    out = Path(args.out)
    image = out / "predict_input" / "big.tif"
    image.parent.mkdir(parents=True, exist_ok=True)
    if not image.exists():
        partial = image.with_name("partial.tif")  # renamed when whole: an interrupted run leaves no half image
        write_tiled(partial, args.size, 0, channels=1)
        partial.rename(image)
    config = {"_base_": "_base_/default.yaml", "data": {"num_classes": 6, "mean": [0.45], "std": [0.22]},
              "model": {"in_channels": 1, "kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
              "eval": {"mode": "slide", "crop_size": [512, 512], "stride": [512, 512]}}
    (out / "predict.yaml").write_text(yaml.safe_dump(config))
    from segfocal.config import load_config
    from segfocal.models import build_model

    cfg = load_config(out / "predict.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.num_classes).state_dict(), out / "weights.pt")
    started = time.perf_counter()
    command = [sys.executable, "-m", "segfocal", "predict", "--checkpoint", str(out / "weights.pt"), "--config",
               str(out / "predict.yaml"), "--input", str(image), "--output", str(out / "predict_output")]
    subprocess.run(command, check=True)  # its own process: the peak is the command's alone
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(f"{args.size}x{args.size} single-channel tiled TIFF predicted in {elapsed:.0f} s by `segfocal predict`; its "
          f"peak RSS {peak:.2f} GiB; torch {torch.__version__}, {torch.get_num_threads()} threads")


# -- class-aware sampling ----------------------------------------------------------------------
def rare_share(args: argparse.Namespace) -> None:
    from segfocal.config import load_config
    from segfocal.data.splits import run_dataset

    names = ["background", "slab", "ellipse", "triangle", "line", "square"]
    print(f"{'training pixels, % / samples holding the class, %':<48}" + "".join(f"{name:>11}" for name in names))
    per_epoch = 192 * (96 // args.size) ** 2  # the pixels of the 192 training images
    runs = [("whole images (the default)", None)]
    for fraction in (0.0, args.rare_fraction):
        for scheme in (("enet",) if fraction == 0 else args.schemes):
            runs.append((f"{args.size}x{args.size} crops, rare_fraction {fraction}" + f", {scheme}" * bool(fraction),
                         {"size": [args.size] * 2, "per_epoch": per_epoch, "rare_fraction": fraction,
                          "class_weight": scheme}))
    for label, patches in runs:
        overrides = [] if patches is None else [f"data.patches={patches}"]
        cfg = load_config("synthetic_unet_focal", overrides)
        dataset = run_dataset(cfg, [], cfg.data.train_split, random_crops=True)
        dataset.validate(6, 255)
        counts, holding, samples = np.zeros(6, np.int64), np.zeros(6, np.int64), 0
        for epoch in range(args.epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            for index in range(len(dataset)):
                mask = dataset[index][1].numpy().ravel()
                sample_counts = np.bincount(mask[mask < 6], minlength=6)
                counts, holding, samples = counts + sample_counts, holding + (sample_counts > 0), samples + 1
        print(f"{label:<48}" + "".join(f"{100 * share:>11.2f}" for share in counts / counts.sum()))
        print(f"{'':<48}" + "".join(f"{100 * share:>11.1f}" for share in holding / samples), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-data")
    make.add_argument("--out", required=True)
    make.add_argument("--images", type=int, default=8)
    make.add_argument("--size", type=int, default=16384)
    make.add_argument("--crops", type=int, default=2048)
    training = commands.add_parser("train")
    training.add_argument("--data", required=True)
    training.add_argument("--source", choices=["both", "patches", "png"], default="both")
    training.add_argument("--batch", type=int, default=8)
    training.add_argument("--workers", type=int, default=2)
    training.add_argument("--steps", type=int, default=5)
    training.add_argument("--rounds", type=int, default=3)
    predicting = commands.add_parser("predict")
    predicting.add_argument("--out", required=True)
    predicting.add_argument("--size", type=int, default=20000)
    share = commands.add_parser("rare-share")
    share.add_argument("--rare-fraction", type=float, default=0.33)
    share.add_argument("--epochs", type=int, default=12)
    share.add_argument("--size", type=int, default=48, help="crop side (the synthetic images have 96)")
    share.add_argument("--schemes", nargs="+", default=["enet", "inverse"], help="class_weight schemes to compare")
    args = parser.parse_args(argv)
    {"make-data": make_data, "train": train, "predict": predict, "rare-share": rare_share}[args.command](args)


if __name__ == "__main__":
    main()
