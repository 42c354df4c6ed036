"""Predict masks for new images of any size.

    segfocal predict --checkpoint CKPT --input DIR_OR_FILE --output DIR [--config CFG]
                     [--mode whole|slide] [--flip] [--max-pixels N] [--overlay-format png|jpg] [--no-calibration]

The config saved in a trainer checkpoint is used unless ``--config`` is given (a bare state-dict
file needs it); ``--set`` overrides either. The masks are those of
:class:`segfocal.segmenter.Segmenter` for the same checkpoint: with the checkpoint's calibration
(``segfocal calibrate``) applied, unless ``--no-calibration``.

Images are read as training read them (any bit depth; ``model.in_channels`` channels, ``.npy``
too). For each image writes ``<stem>.png`` (a palette PNG whose pixel values are class indices) and
``overlays/<stem>.png`` (the prediction blended over the image, above a legend of the classes it
holds; ``--overlay-format jpg``: a smaller, lossy ``overlays/<stem>.jpg``). The masks alone fill
``--output``, so ``segfocal eval --pred`` scores that folder as it is. The colours are
``data.palette``, else :func:`segfocal.data.default_palette`; the overlay shows a grey image's one
channel as grey and an image of more channels by its first three, non-8-bit values times ``data.scale``.

Inputs are never overwritten: an ``--output`` that is the ``--input`` folder or lies inside it, or
that would put a mask or overlay over an input file, is refused before anything is written or the
model is loaded (paths are compared resolved, so symlinked spellings count), and so is an ``--output``
(or its ``overlays/``) that is a file. Each output is written
to a hidden temporary file in ``--output`` and renamed onto its name, so a symlink already there is
replaced, never followed, and no half-written file is left behind.

``--max-pixels N`` (default 4194304 = 2048x2048) bounds memory in whole-image mode: an image with
more pixels than N (read from its header) is predicted with sliding ``eval.crop_size`` windows every
``eval.stride`` pixels instead, and a line on stderr names it. ``--max-pixels 0``: no limit. (The image
must still be decodable: one whose header claims more pixels than PIL's limit is refused, see
:func:`segfocal.data.images.pixel_limit`.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Tuple

from .. import tiled
from ..text import counted
from .common import (add_calibration_argument, add_config_arguments, add_inference_arguments, calibration_from_args,
                     check_output_folder, checkpoint_and_config, command_main)

MAX_PIXELS = 2048 * 2048
OVERLAY_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 90})}  # suffix: PIL format, save options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint or state-dict file")
    parser.add_argument("--input", required=True, help="an image file or a directory of images")
    parser.add_argument("--output", required=True, help="directory for the masks and overlays (not inside --input)")
    add_inference_arguments(parser)
    add_calibration_argument(parser)
    parser.add_argument("--max-pixels", type=pixel_limit, default=MAX_PIXELS, metavar="N",
                        help=f"in whole mode, predict images of more than N pixels with sliding windows "
                             f"(eval.crop_size, eval.stride) to bound memory; 0: no limit (default: {MAX_PIXELS})")
    parser.add_argument("--overlay-format", choices=list(OVERLAY_FORMATS), default="png",
                        help="overlays/<stem>.png (lossless) or .jpg (smaller, blurred edges) (default: png)")
    tiled.add_arguments(parser)


def pixel_limit(text: str) -> int:
    """``--max-pixels``: a count >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no limit), got {value}")
    return value


def list_images(path: Path) -> list:
    from ..data import DataError
    from ..data.patches import LARGE_IMAGE_SUFFIXES as IMAGE_SUFFIXES  # Zarr folders too

    if path.is_file() or (path.suffix.lower() == ".zarr" and path.is_dir()):
        return [path]
    if not path.is_dir():
        raise DataError(f"--input: no such file or directory: {path}")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise DataError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    by_stem = {}
    for image in images:  # each writes <stem>.png: two with one stem would overwrite each other's mask
        if image.stem in by_stem:
            raise DataError(f"--input: two images share the stem '{image.stem}' and would write the same "
                            f"{image.stem}.png: {by_stem[image.stem]} and {image}")
        by_stem[image.stem] = image
    return images


OVERLAY_FOLDER = "overlays"


def output_names(image: Path, overlay_format: str) -> Tuple[str, str]:
    """The paths, relative to ``--output``, of the mask and the overlay that ``image`` gives."""
    return f"{image.stem}.png", f"{OVERLAY_FOLDER}/{image.stem}.{overlay_format}"


def check_output_outside_input(source: Path, output: Path, images: list, overlay_format: str, fmt: str) -> None:
    """Raise DataError if ``output`` (with its overlays' folder) cannot be a folder or writing there could
    overwrite an input image: with its mask, its overlay or, predicted tile by tile, its ``fmt`` mask.

    Paths are compared resolved, so a relative or symlinked spelling of the same folder (the overlays'
    folder included) is caught. An output file's own name is not resolved: a symlink there is
    replaced, never followed.
    """
    from ..data import DataError
    from ..files import entry_name, names_of

    check_output_folder(output, {"the --input folder": source}, subfolders=[OVERLAY_FOLDER])
    for image in images:
        spellings = names_of(image)
        for name in (*output_names(image, overlay_format), tiled.mask_name(image, fmt)):
            if entry_name(output / name) in spellings:
                raise DataError(f"--output {output} would overwrite the --input image {image} with {name}; "
                                f"choose another output folder")


def inference_mode(path: Path, mode: str, max_pixels: int, crop_size: list, channels: int = 3) -> str:
    """``mode``, or "slide" for a whole-mode image of more than ``max_pixels`` pixels (0: no limit).

    One forward pass over a large image needs memory in proportion to its pixels (a 4000x4000
    PNG took 6 GB); windows of ``crop_size`` bound it. The size is read from the header only.
    """
    from ..data.images import check_image

    if mode != "whole" or not max_pixels:
        return mode
    height, width = check_image(path, channels=channels)  # the header only; DataError naming the file if unfit
    if height * width <= max_pixels:
        return mode
    print(f"{path}: {width}x{height} = {height * width} pixels is more than --max-pixels {max_pixels}; "
          f"predicting it with sliding windows of eval.crop_size {list(crop_size)} instead of whole "
          f"(--max-pixels 0: no limit)", file=sys.stderr)
    return "slide"


def run(args: argparse.Namespace) -> list:
    import torch
    from PIL import Image

    from ..data import read_image, write_palette_mask
    from ..engine.distributed import resolve_device
    from ..engine.restore import restore_model
    from ..config import class_names
    from ..files import replaced_atomically
    from ..segmenter import Segmenter
    from ..visualize import display_images, overlay_masks, palette_of, with_legend

    source, output = Path(args.input), Path(args.output)
    images = list_images(source)
    # before the checkpoint is read or anything is written
    check_output_outside_input(source, output, images, args.overlay_format, args.format)
    contents, cfg = checkpoint_and_config(args)
    device = resolve_device(cfg.device)
    calibration = calibration_from_args(args, contents, cfg)
    segmenters = {cfg.eval.mode: Segmenter(restore_model(cfg, args.checkpoint, device, contents), cfg, device,
                                           calibration=calibration)}
    del contents  # the optimiser state it may hold is not needed any more
    palette, names = palette_of(cfg.data), class_names(cfg.data.class_names, cfg.data.num_classes)
    overlay_format, save_options = OVERLAY_FORMATS[args.overlay_format]
    written, overlays = [], 0
    for path in images:
        if tiled.is_tiled(path, args.max_pixels):  # read and written tile by tile, no overlay
            written.append(tiled.predict_tiled(segmenters[cfg.eval.mode], path, output, args.format, palette=palette))
            continue
        mode = inference_mode(path, cfg.eval.mode, args.max_pixels, cfg.eval.crop_size, cfg.model.in_channels)
        if mode not in segmenters:  # the same model, run in sliding windows
            segmenters[mode] = Segmenter(segmenters[cfg.eval.mode].model, cfg, device, mode=mode,
                                         calibration=calibration)
        image = read_image(path, cfg.model.in_channels)  # DataError naming the file if unreadable or oversized
        mask = torch.from_numpy(segmenters[mode].predict(image))
        shown = display_images(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0), cfg.data.scale)
        blended = overlay_masks(shown, mask.unsqueeze(0), palette, cfg.data.ignore_index)
        overlay = with_legend(blended[0].permute(1, 2, 0).numpy(), palette, names, mask.unique().tolist())
        mask_name, overlay_name = output_names(path, args.overlay_format)
        (output / OVERLAY_FOLDER).mkdir(parents=True, exist_ok=True)  # once an image was predicted, not before
        with replaced_atomically(output / mask_name) as handle:
            write_palette_mask(handle, mask.numpy(), palette)
        with replaced_atomically(output / overlay_name) as handle:
            Image.fromarray(overlay).save(handle, format=overlay_format, **save_options)
        written.append(output / mask_name)
        overlays += 1
    shown = f" and {counted(overlays, 'overlay')} to {output / OVERLAY_FOLDER}" if overlays else ""
    tiled_note = f" ({counted(len(written) - overlays, 'mask')} tile by tile, without an overlay)" \
        if overlays < len(written) else ""
    print(f"wrote {counted(len(written), 'mask')} to {output}{shown}{tiled_note}")
    return written


main = command_main(sys.modules[__name__])
