"""Train and test one recipe with each of five losses, and tabulate what each loss buys.

    python benchmarks/loss_ablation.py --config configs/camvid_unet_focal.yaml [--set key=value ...]
                                  [--out runs/ablation] [--only NAME ...] [--rare Pole Fence ...] [--calibrate]

For every loss variant (same recipe, same seed) it runs ``tools/train.py`` into ``OUT/NAME``
and then ``tools/eval.py`` on the test split with the best checkpoint, and prints a Markdown
table of mean IoU, class-average accuracy, pixel accuracy, the IoU of the rare classes and the
wall time of training, then the IoU of every class. With ``--calibrate``, ``tools/calibrate.py``
first fits each best checkpoint's per-class decision calibration on the val split, and each variant
gets a second row, ``NAME + calibration``: its test figures with that calibration (fitted on val,
so a held-out figure), beside the val mIoU cross-fitted over two folds of images. An interrupted
ablation resumes: finished variants are read back from ``OUT/NAME/result.json`` and an unfinished
one continues from its ``last.pt``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from segfocal.evaluation import segmentation_metrics

TOOLS = Path(__file__).resolve().parents[1] / "tools"

#: The losses compared, as config overrides of the recipe.
VARIANTS: Dict[str, List[str]] = {
    "cross_entropy": ["loss.name=cross_entropy", "loss.weight=null"],
    "weighted_cross_entropy": ["loss.name=cross_entropy", "loss.weight=enet"],
    "focal": ["loss.name=focal", "loss.weight=null", "loss.poly_epsilon=0"],
    "cb_focal": ["loss.name=focal", "loss.weight=enet", "loss.poly_epsilon=0"],
    "cb_focal_poly1": ["loss.name=focal", "loss.weight=enet", "loss.poly_epsilon=1"],
}

CAMVID_RARE = ["Pole", "SignSymbol", "Pedestrian", "Bicyclist", "Fence"]


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="the recipe's YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every variant (repeatable)")
    parser.add_argument("--out", default="runs/ablation", help="one run directory per variant under this")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    parser.add_argument("--rare", nargs="*", default=CAMVID_RARE, help="class names whose IoU gets a column")
    parser.add_argument("--calibrate", action="store_true",
                        help="also each variant with its decision calibration, fitted on the val split")
    args = parser.parse_args(argv)

    out = Path(args.out)
    results = {}
    for name in args.only or VARIANTS:
        results[name] = run_variant(name, args.config, [*args.set, *VARIANTS[name]], out / name, args.calibrate)
    table = format_results(results, args.rare, args.calibrate)
    (out / "ablation.md").write_text(table + "\n", encoding="utf-8")
    print(table)


def run_variant(name: str, config: str, overrides: List[str], work_dir: Path, calibrate: bool = False) -> dict:
    """Train (or finish training) and test one variant, calibrated too with ``calibrate``; the result is
    cached in ``result.json`` (a cached one without a calibration gets one when asked for)."""
    cached = work_dir / "result.json"
    result = json.loads(cached.read_text(encoding="utf-8")) if cached.is_file() else None
    if result is not None and (not calibrate or "calibration" in result):
        return result
    sets = [item for override in overrides for item in ("--set", override)]
    common = ["--config", config, *sets, "--work-dir", str(work_dir)]
    best = str(work_dir / "best.pt")
    if result is None:
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        started = time.perf_counter()
        _call(TOOLS / "train.py", *common, "--resume", "auto", "--no-progress")
        result = {"overrides": overrides, "train_seconds": time.perf_counter() - started}
    if calibrate:
        _call(TOOLS / "calibrate.py", *common, "--checkpoint", best)
    _call(TOOLS / "eval.py", *common, "--checkpoint", best, "--out", str(work_dir / "eval_test"))
    report = json.loads((work_dir / "eval_test" / "metrics.json").read_text(encoding="utf-8"))
    result.update(class_names=report["class_names"], metrics=report["metrics"])
    if "calibrated" in report:
        result.update(calibrated=report["calibrated"]["metrics"], calibration=report["calibrated"]["calibration"])
    cached.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_results(results: Dict[str, dict], rare: Sequence[str], calibrate: bool = False) -> str:
    """Markdown tables: one row per variant (and per calibrated variant), metrics in percent, ``-`` for a
    class absent from the test set; then every class's IoU."""
    header = ["loss", "mIoU", "class-avg acc", "pixel acc", *(f"{name} IoU" for name in rare), "train time"]
    if calibrate:
        header.append("val mIoU (calibrated: 2-fold cross-fitted)")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = next(iter(results.values()))["class_names"]
    per_class = ["| loss | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    missing = [label for label in rare if label not in names]
    if missing:
        raise SystemExit(f"--rare: {missing} are not among the class names {names}")
    for name, result in results.items():
        rows_of = [(name, result["metrics"], result.get("calibration", {}).get("confusion_before"))]
        if calibrate:
            calibration = result["calibration"]
            rows_of.append((f"{name} + calibration", result["calibrated"], calibration["confusion_cross_fitted"]))
        for label, metrics, val_confusion in rows_of:
            cells = [label, _percent(metrics["miou"]), _percent(metrics["mean_accuracy"]),
                     _percent(metrics["pixel_accuracy"]),
                     *(_percent(metrics["iou"][names.index(rare_name)]) for rare_name in rare),
                     f"{result['train_seconds'] / 60:.1f} min"]
            if calibrate:
                cells.append(_percent(segmentation_metrics(torch.tensor(val_confusion))["miou"]))
            rows.append("| " + " | ".join(cells) + " |")
            per_class.append(f"| {label} | " + " | ".join(_percent(value) for value in metrics["iou"]) + " |")
    return "\n".join(rows) + "\n\nIoU of every class:\n\n" + "\n".join(per_class)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _call(script: Path, *arguments: str) -> None:
    completed = subprocess.run([sys.executable, str(script), *arguments])
    if completed.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(arguments)} failed with exit code {completed.returncode}")


if __name__ == "__main__":
    main()
