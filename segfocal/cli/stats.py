"""Class pixel frequencies of a dataset split, the class weights each scheme would give, the mask
values as stored and the per-channel image mean/std.

    segfocal stats --config CFG [--split train] [--output weights.yaml]

The per-scheme weights are printed; so are the mask values found in the files before
``data.label_map``/``data.reduce_zero_label`` (to write a label map from), and the images' mean/std,
one value per channel, as a ``data: {mean, std}`` line in the units of ``data.mean``/``data.std``
(stored values times ``data.scale``; fractions of 255 for 8-bit images by default). With ``--output`` both go
into a YAML config whose ``_base_`` is ``--config``, with ``loss: {weight: [...]}`` of ``--scheme`` and
``data: {mean, std}``: train with it as it is, or copy from it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..text import counted
from .common import add_config_arguments, config_from_args, command_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--split", help="dataset split (default: data.train_split)")
    parser.add_argument("--scheme", default="enet", help="scheme written as loss.weight in --output (default: enet)")
    parser.add_argument("--output", help="write a config: --config as its _base_, with the chosen scheme's "
                                         "weights and the image mean/std")


def run(args: argparse.Namespace) -> dict:
    import torch
    import yaml

    from ..config import ConfigError, class_names
    from ..data import DataError, build_dataset
    from ..losses import WEIGHT_SCHEMES, weights_from_histogram

    if args.scheme not in WEIGHT_SCHEMES:
        raise ConfigError(f"--scheme must be one of {WEIGHT_SCHEMES}, got {args.scheme!r}")
    cfg = config_from_args(args)
    data = cfg.data
    split = args.split or data.train_split
    dataset = build_dataset(data, [], split)
    counts = dataset.class_pixel_counts(data.num_classes)
    total = int(counts.sum())
    stored = dataset.stored_value_counts()
    shown = ", ".join(f"{value}: {pixels}" for value, pixels in list(stored.items())[:_SHOWN_VALUES])
    more = f" and {len(stored) - _SHOWN_VALUES} more" if len(stored) > _SHOWN_VALUES else ""
    if total == 0:
        raise DataError(f"split '{split}' of {data.root} has no labelled pixel: no mask value is a class "
                        f"0..{data.num_classes - 1} after data.label_map (as stored, value: pixels: {shown}{more}); "
                        f"there are no class frequencies or weights to give", data.root)
    names = class_names(data.class_names, data.num_classes)
    weights = {
        scheme: [round(float(w), 6) for w in weights_from_histogram(
            counts, scheme, enet_c=cfg.loss.enet_c, effective_beta=cfg.loss.effective_beta, dtype=torch.float64)]
        for scheme in WEIGHT_SCHEMES
    }
    width = max(len(scheme) for scheme in WEIGHT_SCHEMES) + 2  # a column per scheme, its name and a gap
    header = f"{'class':<16}{'pixels':>12}{'share':>9}" + "".join(f"{scheme:>{width}}" for scheme in WEIGHT_SCHEMES)
    images = counted(len(dataset.samples), 'image')  # len(dataset) counts the tiles with data.patches
    print(f"split '{split}': {images}, {counted(total, 'labelled pixel')}")
    print(header)
    for index, name in enumerate(names):
        row = f"{name:<16}{int(counts[index]):>12}{int(counts[index]) / total:>9.4f}"
        print(row + "".join(f"{weights[scheme][index]:>{width}.4f}" for scheme in WEIGHT_SCHEMES))
    print(f"mask values as stored (value: pixels), before data.label_map/reduce_zero_label: {shown}{more}")
    mean, std = dataset.image_mean_std()  # with data.patches, block by block
    print("per-channel image mean/std (stored values x data.scale, as data.mean/data.std take them):")
    print(f"data: {{mean: {_flow(mean)}, std: {_flow(std)}}}")
    if args.output:
        fragment = {"_base_": _base_reference(args.config, Path(args.output)),
                    "loss": {"weight": weights[args.scheme]},
                    "data": {"mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std]}}
        comment = (f"# {args.config} with the {args.scheme} class weights and image mean/std of split '{split}' of "
                   f"{data.root} ({images})"
                   f"{'; --set ' + ' '.join(args.overrides) if args.overrides else ''}\n")
        Path(args.output).write_text(comment + yaml.safe_dump(fragment, default_flow_style=None))
        print(f"wrote {args.output}")
    return {"counts": counts.tolist(), "weights": weights, "data": {"mean": mean, "std": std}, "stored_values": stored}


_SHOWN_VALUES = 40  # mask values printed


def _base_reference(config: str, output: Path) -> str:
    """How ``output`` names ``config`` as its ``_base_``: relative to ``output``'s folder when it is a file
    (a recipe name as it is), so the fragment is the recipe with the measured values."""
    path = Path(config)
    if not path.is_file():
        return config
    return os.path.relpath(path.resolve(), output.resolve().parent)


def _flow(values: list) -> str:
    """``values`` as a YAML flow list to 4 decimals, for a line to paste into a config."""
    return "[" + ", ".join(f"{value:.4f}" for value in values) + "]"


main = command_main(sys.modules[__name__])
