"""Prove the fused loss's fast path on this machine in a minute (see :mod:`segfocal.losses.selfcheck`).

    segfocal check [--device cpu|cuda] [--quick] [--no-timing] [--json FILE]

Prints the environment, runs every back end usable on the device (the C++ kernel on the CPU, the
Triton kernels on CUDA, and the chunked pass) against the float64 reference on a fixed set of cases,
and times forward + backward beside weighted ``F.cross_entropy`` and the memory-traffic bound at the
measured copy bandwidth. Exits 0 only when every case agrees and no back end was turned off (a
kernel that fails to compile or launch is reported with its own message). With the loss-only
install: ``python -m segfocal.losses.selfcheck``.
"""
from __future__ import annotations

import sys

from ..losses.selfcheck import add_arguments, run
from .common import command_main

__all__ = ["add_arguments", "run"]

main = command_main(sys.modules[__name__])
