"""Prove the fused loss's fast path on this machine: every back end usable here against the float64
reference, failing if a back end was turned off, and its speed beside weighted cross-entropy and the
memory-traffic bound. Torch only, so the loss-only install can run it:
``python -m segfocal.losses.selfcheck`` (``segfocal check`` is the same with the toolkit).

A back end that raises is turned off by the fused loss and its chunked pass answers with the right
values, so a check of values alone would pass with a broken kernel: each back end's cases run with
a fresh failure registry, and a back end turned off fails the check with the kernel's own message.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..files import cache_folder
from . import fused
from .class_weights import class_weights
from .focal import focal_loss

PRESETS = {  # (batch, classes, height, width): the training batches of the three datasets' recipes
    "camvid": (8, 12, 360, 480),
    "cityscapes": (8, 19, 512, 1024),
    "ade": (16, 150, 512, 512),
}
IGNORE = 255
OPTIONS = dict(gamma=2.0, weight="enet", poly_epsilon=0.5, ignore_index=IGNORE)  # the loss every case computes
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative, of loss and gradient


@dataclass
class Case:
    backend: str
    classes: int
    dtype: str
    layout: str
    ignored: str  # "none", "some" or "all"
    loss_error: float = float("nan")
    grad_error: float = float("nan")
    passed: bool = False
    problem: str = ""


@dataclass
class Timing:
    preset: str
    shape: Tuple[int, ...]
    dtype: str
    fused_ms: float
    cross_entropy_ms: float
    bound_ms: float  # the bytes the loss must move at the measured copy bandwidth

    @property
    def ratio_to_bound(self) -> float:
        return self.fused_ms / self.bound_ms


@dataclass
class Report:
    environment: Dict[str, Any]
    cases: List[Case] = field(default_factory=list)
    timings: List[Timing] = field(default_factory=list)
    bandwidth_gbs: float = float("nan")

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case.passed for case in self.cases)

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "environment": self.environment, "cases": [asdict(case) for case in self.cases],
                "timings": [{**asdict(timing), "ratio_to_bound": timing.ratio_to_bound} for timing in self.timings],
                "copy_bandwidth_gbs": self.bandwidth_gbs}


def environment(device: torch.device) -> Dict[str, Any]:
    """What the check ran on: versions, the device, the C++ compiler, the kernel cache."""
    def version(package: str) -> Optional[str]:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    from .cpu_kernels import compiler_name

    compiler = compiler_name()
    info = {"segfocal": version("segfocal"), "torch": torch.__version__, "triton": version("triton"),
            "cuda": torch.version.cuda, "python": platform.python_version(), "device": str(device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "compiler": shutil.which(compiler) or f"{compiler} (not found)",
            "kernel_cache": str(cache_folder())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    return info


def backends(device: torch.device) -> Dict[str, Any]:
    """The back ends usable on ``device``: name -> the kernel module (``None``: the chunked pass)."""
    if device.type == "cuda":
        if fused._HAS_TRITON:
            from . import triton_kernels

            return {"triton": triton_kernels, "chunked": None}
        return {"chunked": None}
    from . import cpu_kernels

    return {"cpu kernel": cpu_kernels, "chunked": None}


@contextlib.contextmanager
def pinned(module: Any) -> Iterator[Dict[str, str]]:
    """Route every fused call to ``module`` (``None``: the chunked pass) and record, in the registry it
    yields, a back end the fused loss turns off meanwhile."""
    failures: Dict[str, str] = {}
    saved = fused._kernels, fused._KERNEL_FAILURES
    fused._KERNEL_FAILURES = failures
    fused._kernels = lambda logits: None if module is None or logits.dtype not in module.DTYPES else (
        fused._usable(module))
    try:
        yield failures
    finally:
        fused._kernels, fused._KERNEL_FAILURES = saved


def run_cases(device: torch.device, quick: bool) -> List[Case]:
    """Loss and gradient of every usable back end on each case, against the float64 reference."""
    cases = []
    for name, module in backends(device).items():
        largest = getattr(module, "MAX_CLASSES", 150)
        class_counts = [2, 19] if quick else [2, 19, 150]
        if module is None:
            class_counts.append(largest + 1)  # beyond any kernel: the chunked pass's own case
        dtypes = [torch.float32] if module is None and quick else [
            dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)
            if module is None or dtype in module.DTYPES]
        for classes in class_counts:
            for dtype in dtypes:
                for layout in ("nchw", "channels_last"):
                    for ignored in ("none", "some"):
                        cases.append(_case(name, module, device, classes, dtype, layout, ignored))
        cases.append(_case(name, module, device, 19, torch.float32, "nchw", "all"))
        if module is not None:
            cases.append(_compiled_case(name, module, device))
    return cases


def _compiled_case(name: str, module: Any, device: torch.device) -> Case:
    """The loss under ``torch.compile(fullgraph=True)``: the kernel must stay in the traced graph (as a
    custom operator) and give the reference's value."""
    case = Case(name + " compiled", 19, "float32", "nchw", "some")
    graphs: List[Any] = []

    def recording(graph_module: Any, inputs: Any) -> Any:  # a backend that keeps the traced graph
        graphs.append(graph_module)
        return graph_module.forward

    logits, target = _inputs(19, 0, "some")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, t: focal_loss(x, t, validate=False, **OPTIONS), fullgraph=True,
                                 backend=recording)
        with pinned(module) as failures:
            loss = float(compiled(logits.float().to(device), target.to(device)))
        torch._dynamo.reset()
        operators = {str(node.target) for graph in graphs for node in graph.graph.nodes}
        reference = float(focal_loss(logits, target, implementation="reference", **OPTIONS))
        case.loss_error = abs(loss - reference) / abs(reference)
        case.passed = not failures and case.loss_error <= TOLERANCE[torch.float32] and any(
            "segfocal" in operator for operator in operators)
        if not case.passed:
            case.problem = ("the compiled graph does not call the kernel" if not failures else
                            f"the back end was turned off: {'; '.join(failures.values())}")
    except Exception as error:  # a graph break (fullgraph) or a compile error: reported as it is
        case.problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:500]}"
    return case


def _inputs(classes: int, seed: int, ignored: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 logits [2, classes, 24, 20] and their labels, ``ignored`` ("none", "some": a fifth, "all")."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 24, 20, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, classes, (2, 24, 20), generator=generator)
    if ignored != "none":
        target[torch.rand(target.shape, generator=generator) < (1.0 if ignored == "all" else 0.2)] = IGNORE
    return logits, target


def _case(name: str, module: Any, device: torch.device, classes: int, dtype: torch.dtype, layout: str,
          ignored: str) -> Case:
    case = Case(name, classes, str(dtype).removeprefix("torch."), layout, ignored)
    logits, target = _inputs(classes, classes, ignored)
    logits = logits.to(dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = logits.to(device).contiguous(memory_format=memory_format).requires_grad_(True)
    try:
        with pinned(module) as failures:
            loss = focal_loss(x, target.to(device), implementation="fused", **OPTIONS)
            (grad,) = torch.autograd.grad(loss, x)
        if failures:
            raise RuntimeError(f"the back end was turned off: {'; '.join(failures.values())}")
        exact = logits.double().requires_grad_(True)  # the same rounded inputs, in float64
        reference = focal_loss(exact, target, implementation="reference", **OPTIONS)
        (reference_grad,) = torch.autograd.grad(reference, exact)
        scale = float(reference_grad.abs().max()) or 1.0
        loss, reference = float(loss.detach()), float(reference.detach())
        case.loss_error = abs(loss - reference) / max(abs(reference), 1e-12)
        case.grad_error = float((grad.double().cpu() - reference_grad).abs().max()) / scale
        tolerance = TOLERANCE[dtype]
        case.passed = case.loss_error <= tolerance and case.grad_error <= tolerance * 5
        if not case.passed:
            case.problem = f"differs from the float64 reference (loss {case.loss_error:.2e}, gradient {case.grad_error:.2e})"
        if ignored == "all" and (loss != 0.0 or bool(grad.any())):
            case.passed, case.problem = False, "an all-ignored batch must give 0 and a zero gradient"
    except Exception as error:  # a kernel that does not compile or launch: reported with its own message
        case.problem = f"{type(error).__name__}: {str(error).strip()[:500]}"
    return case


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2 ** 20) -> float:
    """Bytes per second of a large same-device copy, counting bytes read and written: the memory-bound
    loss's speed limit."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _median_seconds(lambda: target.copy_(source), device, rounds=10)
    return 2 * nbytes / seconds


def time_presets(device: torch.device, quick: bool, bandwidth: float) -> List[Timing]:
    """Forward + backward of the fused loss (ENet weights, gamma 2) and of weighted ``F.cross_entropy``
    on each preset's batch, medians; the bound is logits read + labels read + gradient written."""
    timings = []
    presets = ["camvid"] if quick else ["camvid", "cityscapes"]
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    for preset in presets:
        batch, classes, height, width = PRESETS[preset]
        if device.type == "cpu":
            batch = max(1, batch // 4)  # a CPU's time is spent, not its memory: a quarter of the batch
        for dtype in dtypes:
            generator = torch.Generator().manual_seed(0)
            logits = (torch.randn(batch, classes, height, width, generator=generator) * 2).to(device, dtype)
            logits.requires_grad_(True)
            target = torch.randint(0, classes, (batch, height, width), generator=generator).to(device)

            def fused_step() -> None:
                focal_loss(logits, target, weight="enet", validate=False).backward()
                logits.grad = None

            def cross_entropy_step() -> None:
                weight = class_weights(target, classes).to(logits.dtype)
                F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE).backward()
                logits.grad = None

            rounds = 3 if quick else 7
            traffic = 2 * logits.numel() * logits.element_size() + target.numel() * target.element_size()
            timings.append(Timing(preset, tuple(logits.shape), str(dtype).removeprefix("torch."),
                                  _median_seconds(fused_step, device, rounds) * 1e3,
                                  _median_seconds(cross_entropy_step, device, rounds) * 1e3,
                                  traffic / bandwidth * 1e3))
    return timings


def _median_seconds(step, device: torch.device, rounds: int) -> float:
    step()  # warm-up (kernel build, caches)
    seconds = []
    for _ in range(rounds):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(device: Optional[str] = None, quick: bool = False, timings: bool = True) -> Report:
    """The whole check on ``device`` (default: CUDA if available, else the CPU)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = Report(environment(target), run_cases(target, quick))
    if timings:
        report.bandwidth_gbs = copy_bandwidth(target) / 1e9
        usable = backends(target)
        with pinned(usable.get("triton", usable.get("cpu kernel"))) as failures:
            report.timings = time_presets(target, quick, report.bandwidth_gbs * 1e9)
        if failures:
            report.cases.append(Case("timing", 0, "", "", "", problem=f"the back end was turned off while timing: "
                                                                        f"{'; '.join(failures.values())}"))
    return report


def format_report(report: Report) -> str:
    env = report.environment
    lines = ["segfocal " + str(env["segfocal"]) + f", torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"Python {env['python']}",
             f"device {env['device']}" + (f" ({env['gpu']}, {env['capability']})" if "gpu" in env else
                                           f" ({env['cpu']}, {env['threads']} threads)"),
             f"C++ compiler {env['compiler']}; kernel cache {env['kernel_cache']}", ""]
    by_backend: Dict[str, List[Case]] = {}
    for case in report.cases:
        by_backend.setdefault(case.backend, []).append(case)
    for name, cases in by_backend.items():
        failed = [case for case in cases if not case.passed]
        worst = max((max(case.loss_error, case.grad_error) for case in cases if case.passed), default=float("nan"))
        lines.append(f"{name:<11} {len(cases) - len(failed)}/{len(cases)} cases agree with the float64 reference "
                     f"(largest relative error {worst:.1e})")
        lines += [f"  FAILED {case.classes} classes {case.dtype} {case.layout} ignored={case.ignored}: {case.problem}"
                  for case in failed]
    if report.timings:
        lines += ["", f"copy bandwidth {report.bandwidth_gbs:.1f} GB/s; forward+backward, median ms:",
                  f"{'preset':<12}{'shape':<24}{'dtype':<10}{'fused':>9}{'weighted CE':>13}{'CE/fused':>10}"
                  f"{'bound':>9}{'fused/bound':>13}"]
        for timing in report.timings:
            lines.append(f"{timing.preset:<12}{str(timing.shape):<24}{timing.dtype:<10}{timing.fused_ms:>9.1f}"
                         f"{timing.cross_entropy_ms:>13.1f}{timing.cross_entropy_ms / timing.fused_ms:>10.2f}"
                         f"{timing.bound_ms:>9.1f}{timing.ratio_to_bound:>13.2f}")
    lines += ["", "PASSED: every back end usable here agrees and ran" if report.passed else
              "FAILED: see the lines above"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="segfocal check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and one timed preset")
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="check values only")
    parser.add_argument("--json", metavar="FILE", help="also write everything to FILE as JSON")


def run(args: argparse.Namespace) -> Report:
    report = check(args.device, args.quick, args.timing)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    if not report.passed:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
