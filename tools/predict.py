"""Predict masks for new images of any size.

    python tools/predict.py --config CFG --checkpoint CKPT --input DIR_OR_FILE --output DIR
                            [--mode whole|slide] [--flip]

For each image writes ``<stem>.png`` (a palette PNG whose pixel values are class indices) and
``<stem>_overlay.jpg`` (the prediction blended over the image).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segfocal.cli import add_config_arguments, add_inference_arguments, config_from_args, exit_on_user_error  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint or state-dict file")
    parser.add_argument("--input", required=True, help="an image file or a directory of images")
    parser.add_argument("--output", required=True, help="directory for the masks and overlays")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        run(args)


def list_images(path: Path) -> list:
    from segfocal.data import DataError

    if path.is_file():
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


def run(args: argparse.Namespace) -> list:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from segfocal.data import build_transform, default_palette, read_image, write_palette_mask
    from segfocal.engine.distributed import resolve_device
    from segfocal.engine.precision import resolve_precision
    from segfocal.engine.restore import restore_model
    from segfocal.evaluation import predict_logits
    from segfocal.visualize import overlay_masks

    cfg = config_from_args(args)
    data, ev = cfg.data, cfg.eval
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.train.amp, device)
    model = restore_model(cfg, args.checkpoint, device)
    transform = build_transform(cfg.augment.val, data.mean, data.std)
    palette = default_palette(data.num_classes)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in list_images(Path(args.input)):
        rgb = read_image(path)  # DataError naming the file for any unreadable or oversized image
        image = transform(image=rgb)["image"].unsqueeze(0).to(device)
        with torch.no_grad(), precision.autocast():
            logits = predict_logits(model, image, data.num_classes, mode=ev.mode, crop_size=tuple(ev.crop_size),
                                    stride=tuple(ev.stride), flip=ev.flip)
        if logits.shape[-2:] != rgb.shape[:2]:  # the val pipeline resized the image
            logits = F.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        mask = logits.argmax(dim=1)[0].to(torch.uint8).cpu()
        write_palette_mask(output / f"{path.stem}.png", mask.numpy(), palette)
        blended = overlay_masks(torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0), mask.unsqueeze(0), palette,
                                data.ignore_index)
        Image.fromarray(blended[0].permute(1, 2, 0).numpy()).save(output / f"{path.stem}_overlay.jpg", quality=90)
        written.append(output / f"{path.stem}.png")
    print(f"wrote {len(written)} masks and overlays to {output}")
    return written


if __name__ == "__main__":
    main()
