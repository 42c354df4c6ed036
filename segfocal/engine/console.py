"""What a training run prints: progress bars on a terminal, plain log lines elsewhere (a file, CI,
``--no-progress``), and in both one summary line per epoch (or per validation, counting steps)."""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence

from tqdm import tqdm

if TYPE_CHECKING:
    from .timeline import Timeline


class Console:
    """Rank 0's console. ``bars`` is decided once: asked for (``progress``) and stderr is a terminal."""

    def __init__(self, enabled: bool, progress: bool) -> None:
        self.enabled = enabled
        self.bars = enabled and progress and sys.stderr.isatty()

    def progress(self, items: Iterable, description: str) -> Iterable:
        """``items`` with a progress bar when bars are on."""
        return tqdm(items, desc=description, leave=False, disable=not self.bars)

    def line(self, text: str) -> None:
        """A line for every console (rank 0), above any bar."""
        if self.enabled:
            self._print(text)

    def step(self, epoch: int, timeline: "Timeline", batch: int, batches: int, step: int, loss: float,
             lr: float) -> None:
        """A plain line for a logged optimiser step, where there is no bar to show it."""
        if self.enabled and not self.bars:
            self._print(f"epoch {epoch + 1}/{timeline.total_epochs}  batch {batch}/{batches}  "
                        f"step {step}/{timeline.total_steps}  loss {loss:.4f}  lr {lr:.2e}")

    def report(self, entry: Dict[str, Any], timeline: "Timeline", metric: str, best: float, best_at: int,
               class_names: Sequence[str], seconds_per_unit: float) -> None:
        """One line per ``metrics.jsonl`` entry (each epoch, or each validation when counting steps):
        train loss; validation mIoU, class-average accuracy and the rarest class's IoU (fewest val
        pixels) when it validated; the best so far; time per unit (epoch or step) and ETA."""
        if not self.enabled:
            return
        unit = timeline.unit
        done = entry[unit]
        parts = [f"{unit} {done}/{timeline.total}", f"train loss {entry['train_loss']:.4f}"]
        val = entry.get("val")
        if val is not None:
            parts += [f"val mIoU {_percent(val['miou'])}", f"class-acc {_percent(val['mean_accuracy'])}"]
            rarest = _rarest(val["support"])
            if rarest is not None:
                parts.append(f"rarest {class_names[rarest]} IoU {_percent(val['iou'][rarest])}")
        if best_at >= 0:
            parts.append(f"best {metric} {_percent(best)} ({unit} {best_at})")  # every metric is a fraction
        remaining = max(0, timeline.total - done) * seconds_per_unit
        parts.append(f"{seconds_per_unit:.{1 if seconds_per_unit >= 0.1 else 3}f} s/{unit}  ETA {_duration(remaining)}")
        self._print("  ".join(parts))

    @staticmethod
    def _print(line: str) -> None:
        tqdm.write(line, file=sys.stdout)  # above any bar, never through it
        sys.stdout.flush()


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _rarest(support: Sequence[int]) -> Optional[int]:
    present = [(count, index) for index, count in enumerate(support) if count > 0]
    return min(present)[1] if present else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"
