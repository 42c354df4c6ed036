"""Ctrl-C and SIGTERM during training: finish the current step, save, then stop.

While :class:`StopSignals` is active, the first SIGINT or SIGTERM only records the request; the
trainer checks it after each optimiser step, writes ``last.pt`` and raises
:class:`TrainingInterrupted`. A second signal acts at once as usual (``KeyboardInterrupt`` for
SIGINT, termination for SIGTERM), leaving the previous ``last.pt`` as it was. Cluster schedulers
send SIGTERM before they preempt a job, so it is treated like Ctrl-C.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint``; ``exit_code`` is 128 + the signal number."""

    def __init__(self, checkpoint: Path, signal_number: int, epoch: int, step: int) -> None:
        self.checkpoint, self.signal_number, self.epoch, self.step = checkpoint, signal_number, epoch, step
        self.exit_code = 128 + signal_number
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped on {name} at epoch {epoch}, step {step}; saved {checkpoint}")


class StopSignals:
    """A context manager that turns the first SIGINT/SIGTERM into a request (:attr:`signal_number`).

    Outside the main thread (where Python cannot install handlers) it does nothing, and signals
    keep their usual effect.
    """

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._request) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _request(self, number: int, frame: Any) -> None:
        self.signal_number = number
        self._restore()  # a second signal acts at once
        sys.stderr.write(f"\n{signal.Signals(number).name}: stopping after the current step and saving last.pt "
                         f"(send it again to stop at once, keeping the previous last.pt)\n")

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
