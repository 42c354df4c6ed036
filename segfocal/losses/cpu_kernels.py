"""The fused focal loss on the CPU: the C++ kernel of ``cpu_kernel.cpp``, built on first use.

Same interface and scheme as :mod:`.triton_kernels`: :func:`histogram` counts the labels, then
:func:`forward` reads every pixel's logits once, accumulates the per-class focal sums and the
Poly-1 sum, and writes the gradient in the same pass; the backward only scales it
(:func:`scale_`). Memory traffic is thus the logits read once and the gradient written once.
Float32 and bfloat16 logits, int64/int32/uint8 labels (other integer dtypes are converted).

The source is compiled with the system's C++ compiler (``$CXX``, else ``c++``) for this machine's
CPU (``-O3 -march=native``), once, in about ten seconds, into a cache folder
(``$SEGFOCAL_CACHE``, else ``~/.cache/segfocal``) keyed by the source, compiler, flags and CPU, verified
(a SHA-256 written beside it; the folder and file the user's own, written by no one else) and loaded with
:mod:`ctypes`: no Python or PyTorch headers, nothing to build at install time. It runs on up to
``torch.get_num_threads()`` threads: the calling one and the workers of a pool kept inside the
library across calls (one call at a time uses the pool; a forked child makes its own). Where no
compiler is found or the build fails, :func:`library` warns once and returns ``None``, and the
fused loss keeps its PyTorch chunked implementation; ``SEGFOCAL_CPU_KERNEL=0`` chooses that implementation without trying.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..files import cache_folder
from .labels import ignore_index_fits
from .layout import empty_gradient, flat_labels, flat_logits, forward_outputs
from .options import FocalOptions

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -fno-trapping-math lets the compiler evaluate both sides of a select, so the loops vectorise
FLAGS = ("-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-pthread")
NATIVE = ("-march=native",)  # dropped when the compiler rejects it
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the logits' dtypes it takes, and their codes in the C++ source
LABEL_DTYPES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}
GRAIN = 1 << 18  # logits per thread at least: smaller inputs use fewer threads
TILE = 0  # pixels per tile; 0: the kernel's choice (about 32 KiB of float32)
ABANDONED_AFTER_S = 3600  # a build folder this old belongs to no running build (the compiler's timeout is 600 s)


class _Problem(ctypes.Structure):
    """The C struct ``FocalProblem`` of ``cpu_kernel.cpp``, field for field."""
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("logits", "labels", "grad", "coefficients", "focal_sums",
                                               "poly_sum", "counts")]
        + [(name, ctypes.c_int64) for name in (
            "batch", "classes", "spatial", "stride_b", "stride_c", "stride_s", "label_stride_b", "label_stride_s",
            "grad_stride_b", "grad_stride_c", "grad_stride_s", "ignore_index", "has_ignore", "logits_dtype",
            "label_dtype", "num_threads", "grain", "tile")]
        + [(name, ctypes.c_double) for name in ("gamma", "poly_coefficient", "upstream")]
    )


def supports(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits (CPU, float32 or bfloat16) and could be built."""
    return logits.device.type == "cpu" and logits.dtype in DTYPES and available()


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernel could be built and loaded here (a constant to ``torch.compile``)."""
    return library() is not None


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel (built or found in the cache), or ``None`` with a warning if it cannot be built."""
    if os.environ.get("SEGFOCAL_CPU_KERNEL", "1") == "0":
        return None
    try:
        lib = _load(_build())
        for name in ("segfocal_histogram", "segfocal_forward"):  # AttributeError: another library by that name
            function = getattr(lib, name)
            function.argtypes, function.restype = [ctypes.POINTER(_Problem)], ctypes.c_int
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        warnings.warn(f"segfocal: the C++ CPU focal kernel is not available ({error}); the fused loss uses its "
                      f"slower PyTorch implementation on the CPU (set SEGFOCAL_CPU_KERNEL=0 to silence this)",
                      RuntimeWarning, stacklevel=2)
        return None
    return lib


def histogram(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """float64 pixel count of each class ``[C]`` (ignored and out-of-range labels are not counted)."""
    return torch.ops.segfocal.cpu_histogram(target, num_classes, ignore_index)


def forward(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, poly_coefficient: torch.Tensor,
            options: FocalOptions, write_grad: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """float64 per-class focal sums ``[C]`` and the Poly-1 sum ``[]``; with ``write_grad`` also the
    logits' gradient for an upstream gradient of 1 (else ``None``). ``coefficients`` ``[C + 1]``:
    each class's factor ``w a / D`` and a zero for ignored pixels; ``poly_coefficient``: ``poly_epsilon / D``;
    ``options``: the loss's, for ``gamma`` and ``ignore_index``."""
    focal_sums, poly_sum, grad = torch.ops.segfocal.cpu_forward(
        logits, target, coefficients, poly_coefficient, float(options.gamma), options.ignore_index, 1.0, write_grad)
    return focal_sums, poly_sum, grad if write_grad else None


def gradient(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             poly_coefficient: torch.Tensor, grad_loss: torch.Tensor, options: FocalOptions) -> torch.Tensor:
    """The logits' gradient recomputed from the logits (their dtype and memory format), with the
    upstream gradient folded in; ``coefficients`` as for :func:`forward`."""
    return torch.ops.segfocal.cpu_forward(logits, target, coefficients, poly_coefficient, float(options.gamma),
                                          options.ignore_index, float(grad_loss), True)[2]


def scale_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_loss`` in place; nothing is read or written when ``grad_loss`` is 1 (a
    host-side test: on the CPU it costs no synchronisation)."""
    if float(grad_loss) != 1.0:
        grad.mul_(grad_loss)
    return grad


# The kernel as custom operators, so that ``torch.compile`` keeps it in its graph as one opaque call
# (their fake implementations say the outputs' shapes) instead of tracing, or breaking on, ctypes.
@torch.library.custom_op("segfocal::cpu_histogram", mutates_args=(), device_types="cpu")
def _histogram_op(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.float64)
    problem, _labels = _labels_problem(target, num_classes, ignore_index)  # _labels: alive during the call
    problem.counts, problem.grain = counts.data_ptr(), max(1, GRAIN // 4)  # a label costs less than C logits
    _call("segfocal_histogram", problem)
    return counts


@_histogram_op.register_fake
def _(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return target.new_empty(num_classes, dtype=torch.float64)


@torch.library.custom_op("segfocal::cpu_forward", mutates_args=(), device_types="cpu")
def _forward_op(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
                poly_coefficient: torch.Tensor, gamma: float, ignore_index: int, upstream: float,
                write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    focal_sums, poly_sum, grad = _run(logits, target, coefficients, poly_coefficient, upstream, gamma, ignore_index,
                                      write_grad)
    return focal_sums, poly_sum, grad if grad is not None else logits.new_empty(0)


@_forward_op.register_fake
def _(logits: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, poly_coefficient: torch.Tensor,
      gamma: float, ignore_index: int, upstream: float, write_grad: bool):
    return forward_outputs(logits, write_grad)


def _run(logits, target, coefficients, poly_coefficient, upstream, gamma, ignore_index, write_grad):
    num_classes = logits.shape[1]
    focal_sums = torch.zeros(num_classes, dtype=torch.float64)
    poly_sum = torch.zeros((), dtype=torch.float64)
    coefficients = coefficients.to(torch.float32).contiguous()
    logits_view, strides = flat_logits(logits)
    grad, grad_view, grad_strides = empty_gradient(logits) if write_grad else (None, None, (0, 0, 0))
    problem, _labels = _labels_problem(target, num_classes, ignore_index)  # _labels: alive during the call
    problem.logits, problem.logits_dtype = logits_view.data_ptr(), DTYPES[logits.dtype]
    problem.stride_b, problem.stride_c, problem.stride_s = strides
    problem.grad = None if grad_view is None else grad_view.data_ptr()
    problem.grad_stride_b, problem.grad_stride_c, problem.grad_stride_s = grad_strides
    problem.coefficients, problem.focal_sums, problem.poly_sum = (
        coefficients.data_ptr(), focal_sums.data_ptr(), poly_sum.data_ptr())
    problem.gamma, problem.poly_coefficient, problem.upstream = float(gamma), float(poly_coefficient), upstream
    _call("segfocal_forward", problem)
    return focal_sums, poly_sum, grad


def _labels_problem(target: torch.Tensor, num_classes: int, ignore_index: int):
    """A problem with the labels' fields filled in, and the tensors it points into (keep them alive)."""
    has_ignore = ignore_index_fits(ignore_index, target.dtype)
    if target.dtype not in LABEL_DTYPES:
        target = target.long()
    labels, (label_stride_b, label_stride_s), _, spatial = flat_labels(target)
    problem = _Problem(
        labels=labels.data_ptr(), batch=labels.shape[0], classes=num_classes, spatial=spatial,
        label_stride_b=label_stride_b, label_stride_s=label_stride_s, ignore_index=ignore_index if has_ignore else 0,
        has_ignore=int(has_ignore), label_dtype=LABEL_DTYPES[target.dtype], num_threads=torch.get_num_threads(),
        grain=max(1, GRAIN), tile=TILE)
    return problem, labels


def _call(name: str, problem: _Problem) -> None:
    """Run an entry point (ctypes releases the GIL meanwhile); nothing to do without pixels or classes."""
    if problem.batch * problem.spatial * problem.classes == 0:
        return
    status = getattr(library(), name)(ctypes.byref(problem))
    if status == -2:
        raise RuntimeError(f"segfocal CPU kernel {name}: out of memory or threads")
    if status != 0:
        raise RuntimeError(f"segfocal CPU kernel {name} rejected its input (status {status})")


def compiler_name() -> str:
    """The C++ compiler the kernel is built with: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX") or "c++"


def _build() -> Path:
    """The shared library's path, compiling it into the cache folder unless a verified build is there.

    A cached file is used only if it and the folder are the current user's and no one else may
    write them, and its bytes match the SHA-256 written beside it at build time; a file that fails
    the digest (truncated, corrupt, another library under its name) is rebuilt.
    """
    compiler = compiler_name()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    source = SOURCE.read_bytes()
    cache = cache_folder()
    cache.mkdir(parents=True, exist_ok=True, mode=0o755)
    _check_private(cache)
    _sweep_abandoned_builds(cache)
    cpu_id, builds = _cpu_id(), []
    for flags in (FLAGS + NATIVE, FLAGS):
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), cpu_id]))
        builds.append((flags, cache / f"cpu_kernel-{key.hexdigest()[:16]}.so"))
    for _, path in builds:  # a portable build is there when the native flag was rejected before
        if path.exists() and _verified(path):
            return path
    errors = []
    for flags, path in builds:
        # built in a folder of its own, then renamed: atomic
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as folder:
            partial = Path(folder) / path.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True,
                                    text=True, timeout=600)
            if result.returncode == 0:
                partial.chmod(0o755)  # whatever the umask: loadable by all, writable by its owner only
                digest = Path(folder) / _digest_path(path).name
                digest.write_text(hashlib.sha256(partial.read_bytes()).hexdigest())
                digest.chmod(0o644)
                os.replace(partial, path)  # the library first: a kill between the two leaves a file
                os.replace(digest, _digest_path(path))  # without a digest, which is rebuilt
                return path
        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("; ".join(errors))


def _digest_path(library_path: Path) -> Path:
    return library_path.with_suffix(".sha256")


def _check_private(path: Path) -> None:
    """Raise unless ``path`` (not a symlink) is the current user's and no one else may write it:
    whoever can write the cache can make this process run their code."""
    status = os.lstat(path)
    if stat.S_ISLNK(status.st_mode):
        raise RuntimeError(f"{path} is a symbolic link: refusing to load a kernel through it")
    if hasattr(os, "geteuid") and status.st_uid != os.geteuid():
        raise RuntimeError(f"{path} belongs to user id {status.st_uid}, not to this user ({os.geteuid()}): "
                           f"refusing to load a kernel from it (set SEGFOCAL_CACHE to a folder of your own)")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"{path} is writable by other users (mode {stat.S_IMODE(status.st_mode):o}): refusing "
                           f"to load a kernel from it (chmod go-w, or set SEGFOCAL_CACHE)")


def _verified(path: Path) -> bool:
    """Whether the cached library's bytes match the digest written at its build (raises if the file
    is not private: see :func:`_check_private`)."""
    _check_private(path)
    return _matches_digest(path, path.read_bytes())


def _matches_digest(path: Path, data: bytes) -> bool:
    """Whether ``data`` (the library's bytes) has the SHA-256 written beside ``path`` at its build."""
    try:
        expected = _digest_path(path).read_text().strip()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == expected


def _load(path: Path) -> ctypes.CDLL:
    """Load the library just verified. On Linux the open file itself is loaded (``/proc/self/fd``):
    the bytes checked are the bytes loaded, even if the file is replaced meanwhile."""
    with open(path, "rb") as file:
        if not _matches_digest(path, file.read()):
            raise RuntimeError(f"{path} changed while it was loaded (another build replaced it); retry")
        handle = Path(f"/proc/self/fd/{file.fileno()}")
        return ctypes.CDLL(str(handle if handle.exists() else path))


def _sweep_abandoned_builds(cache: Path) -> None:
    """Remove build folders older than any build takes, left by a process killed while compiling."""
    for folder in cache.glob(".build-*"):
        try:
            if time.time() - folder.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def _cpu_id() -> bytes:
    """The CPU's model and instruction-set flags: a library built with ``-march=native`` is only
    reused on the same kind of CPU (a cache folder may be shared by a cluster's machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(wanted)) or [platform.machine(), platform.processor()]).encode()
