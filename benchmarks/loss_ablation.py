"""Train and test one recipe with each of five losses, and tabulate what each loss buys.

    python benchmarks/loss_ablation.py --config configs/camvid_unet_focal.yaml [--set key=value ...]
                                  [--out runs/ablation] [--only NAME ...] [--rare Pole Fence ...]

For every loss variant (same recipe, same seed) it runs ``tools/train.py`` into ``OUT/NAME``
and then ``tools/eval.py`` on the test split with the best checkpoint, and prints a Markdown
table of mean IoU, class-average accuracy, pixel accuracy, the IoU of the rare classes and the
wall time of training. An interrupted ablation resumes: finished variants are read back from
``OUT/NAME/result.json`` and an unfinished one continues from its ``last.pt``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

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
    args = parser.parse_args(argv)

    out = Path(args.out)
    results = {}
    for name in args.only or VARIANTS:
        results[name] = run_variant(name, args.config, [*args.set, *VARIANTS[name]], out / name)
    table = format_results(results, args.rare)
    (out / "ablation.md").write_text(table + "\n", encoding="utf-8")
    print(table)


def run_variant(name: str, config: str, overrides: List[str], work_dir: Path) -> dict:
    """Train (or finish training) and test one variant; the result is cached in ``result.json``."""
    cached = work_dir / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    sets = [item for override in overrides for item in ("--set", override)]
    common = ["--config", config, *sets, "--work-dir", str(work_dir)]
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    _call(TOOLS / "train.py", *common, "--resume", "auto", "--no-progress")
    train_seconds = time.perf_counter() - started
    _call(TOOLS / "eval.py", *common, "--checkpoint", str(work_dir / "best.pt"), "--out", str(work_dir / "eval_test"))
    report = json.loads((work_dir / "eval_test" / "metrics.json").read_text(encoding="utf-8"))
    result = {"overrides": overrides, "train_seconds": train_seconds, "class_names": report["class_names"],
              "metrics": report["metrics"]}
    cached.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_results(results: Dict[str, dict], rare: Sequence[str]) -> str:
    """A Markdown table, one row per variant; metrics in percent, ``-`` for a class absent from the test set."""
    header = ["loss", "mIoU", "class-avg acc", "pixel acc", *(f"{name} IoU" for name in rare), "train time"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        metrics, names = result["metrics"], result["class_names"]
        missing = [label for label in rare if label not in names]
        if missing:
            raise SystemExit(f"--rare: {missing} are not among the class names {names}")
        cells = [name, _percent(metrics["miou"]), _percent(metrics["mean_accuracy"]),
                 _percent(metrics["pixel_accuracy"]),
                 *(_percent(metrics["iou"][names.index(label)]) for label in rare),
                 f"{result['train_seconds'] / 60:.1f} min"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _call(script: Path, *arguments: str) -> None:
    completed = subprocess.run([sys.executable, str(script), *arguments])
    if completed.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(arguments)} failed with exit code {completed.returncode}")


if __name__ == "__main__":
    main()
