"""The Triton kernels compiled ahead of time for a GPU architecture, on any machine: no GPU needed.

Triton's compiler and the ``ptxas`` shipped in the ``triton`` wheel build a cubin for any NVIDIA
architecture on the CPU, and its ``-v`` report gives the registers, spills and stack per
thread. The launches compiled here are built by the same functions that launch the kernels (:class:`.triton_kernels.Launch`), and specialised the way Triton's JIT
specialises a launch (argument types, 16-byte alignment and divisibility, integers equal to 1), so
what is compiled here is what runs on a GPU. Used by the tests and ``benchmarks/triton_resources.py``.

The kernels must have been decorated by the compiler, not the interpreter: run this in a process
without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import re
from typing import Dict, Iterator, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, native_specialize_impl

from . import triton_kernels
from .triton_kernels import Launch

ARCHITECTURES = (80, 90)  # A100 (and the sm_8x family the cubin runs on), H100/H200
CLASS_COUNTS = (1, 2, 19, 150, 1000)
SPATIAL = 4096  # pixels per image of the sample launches: divisible by 16, as real images' sizes usually are


class Variant(NamedTuple):
    """The inputs a set of launches is built from."""
    num_classes: int
    logits_dtype: torch.dtype
    label_dtype: torch.dtype
    ignore_index: int
    write_grad: bool


class Resources(NamedTuple):
    """Per-thread figures of one compiled kernel, from ``ptxas -v`` (the run that built its cubin)."""
    registers: int
    spill_stores: int  # bytes: 0 means no register spills
    spill_loads: int
    stack_bytes: int  # the stack frame, spills included
    shared_bytes: int  # per block, Triton's scratch included


def variants(class_counts=CLASS_COUNTS) -> Iterator[Variant]:
    """Four variants per class count that together take every logits dtype, every label dtype, the
    ignore label present and absent (an index the label dtype cannot hold) and the gradient written
    in the forward pass and not."""
    kinds = [
        (torch.float32, torch.int64, -100, True),
        (torch.bfloat16, torch.int32, 1 << 40, True),  # 2**40 does not fit int32: no ignore label
        (torch.float16, torch.uint8, 255, False),  # float16 recomputes the gradient in the backward
        (torch.float32, torch.uint8, -100, False),  # -100 does not fit uint8: no ignore label
    ]
    for num_classes, kind in itertools.product(class_counts, kinds):
        yield Variant(num_classes, *kind)


def launches(variant: Variant) -> Dict[str, Launch]:
    """The launches one training step makes for ``variant`` (histogram, forward, the recomputing
    backward, the in-place scale), built on small CPU tensors by the launching code itself."""
    batch = 2
    logits = torch.zeros(batch, variant.num_classes, SPATIAL, dtype=variant.logits_dtype)
    target = torch.zeros(batch, SPATIAL, dtype=variant.label_dtype)
    grad = torch.empty_like(logits) if variant.write_grad else None
    coefficients = torch.zeros(variant.num_classes + 1)
    poly_coefficient, grad_loss = torch.zeros(()), torch.ones(())
    counts = torch.zeros(variant.num_classes, dtype=torch.float64)
    poly_sum = torch.zeros((), dtype=torch.float64)
    return {
        "histogram": triton_kernels.histogram_launch(target, counts, variant.ignore_index),
        "forward": triton_kernels.forward_launch(logits, target, grad, coefficients, poly_coefficient, counts.clone(),
                                                 poly_sum, 2.0, variant.ignore_index),
        "backward": triton_kernels.gradient_launch(logits, target, torch.empty_like(logits), coefficients,
                                                   poly_coefficient, grad_loss, 2.0, variant.ignore_index),
        "scale": triton_kernels.scale_launch(torch.empty_like(logits), grad_loss),
    }


def specialization(launch: Launch, arch: int):
    """How Triton's JIT specialises ``launch`` for ``sm_{arch}``: the signature (each argument's type,
    or ``"constexpr"``), the compile-time constants and the attributes (divisibility by 16)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constants, attributes = {}, {}, {}
    for index, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constants[(index,)] = "constexpr", launch.constexprs[name]
            continue
        kind, key = native_specialize_impl(type(backend), launch.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constants[(index,)] = key
        elif isinstance(key, str) and key:  # "D": divisible by 16 (an integer) or 16-byte aligned (a pointer)
            attributes[(index,)] = backend.parse_attr(key)
    return signature, constants, attributes


def compile_launch(launch: Launch, arch: int):
    """``launch``'s kernel compiled for ``sm_{arch}``: the ``triton.compiler.CompiledKernel`` and its
    :class:`Resources`. Raises what the compiler raises (a front-end ``CompilationError``, a
    ``ptxas`` failure)."""
    if not isinstance(launch.kernel, JITFunction):
        raise RuntimeError("the Triton kernels were decorated by the interpreter (TRITON_INTERPRET=1): "
                           "compile them in a process without it")
    source = ASTSource(launch.kernel, *specialization(launch, arch))
    log, dumped = io.StringIO(), triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": launch.num_warps})
    finally:
        triton.knobs.nvidia.dump_ptxas_log = dumped
    return compiled, _resources(log.getvalue(), int(compiled.metadata.shared))


def _resources(ptxas_log: str, shared_bytes: int) -> Resources:
    """The figures of ptxas's ``-v`` report (a cached compile has none: compile into a fresh cache)."""
    patterns = {"registers": r"Used (\d+) registers", "stack_bytes": r"(\d+) bytes stack frame",
                "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}
    figures = {}
    for name, pattern in patterns.items():
        found = re.search(pattern, ptxas_log)
        if found is None:
            raise RuntimeError(f"no ptxas report to read {name} from (was the kernel taken from Triton's cache? "
                               f"set TRITON_CACHE_DIR to an empty folder):\n{ptxas_log}")
        figures[name] = int(found.group(1))
    return Resources(shared_bytes=shared_bytes, **figures)
