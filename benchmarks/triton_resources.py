"""Every Triton kernel of segfocal compiled ahead of time for sm_80 and sm_90, with its resources.

    python benchmarks/triton_resources.py [--arch 80 90] [--classes 1 2 19 150 1000] [--json FILE]

No GPU is needed: Triton's compiler and the ptxas in the triton wheel run on the CPU
(``segfocal/losses/triton_aot.py``). For each architecture, class count and variant (logits dtype,
label dtype, ignore label, gradient written in the forward pass) it compiles the launches one
training step makes and prints a Markdown table of registers, spills, stack and shared memory
(from ptxas's own report) per kernel and class count, the range over the variants (``--full``:
every kernel); identical specialisations are compiled once. Exits 1 if any kernel
fails to compile (the error is in the table and the JSON). Each compile starts from an empty
Triton cache, so a cached result cannot hide a front-end error.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated by the compiler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segfocal.losses import triton_aot  # noqa: E402


def compile_one(task):
    """One (architecture, variant, kernel) compiled; a JSON-ready record."""
    arch, variant, kernel = task
    launch = triton_aot.launches(variant)[kernel]
    record = {"arch": arch, "kernel": kernel, "classes": variant.num_classes,
              "logits": str(variant.logits_dtype).replace("torch.", ""),
              "labels": str(variant.label_dtype).replace("torch.", ""),
              "ignore": launch.constexprs.get("HAS_IGNORE"), "write_grad": launch.constexprs.get("WRITE_GRAD"),
              "block_p": launch.constexprs.get("BLOCK_P"), "block_c": launch.constexprs.get("BLOCK_C"),
              "num_warps": launch.num_warps}
    started = time.perf_counter()
    try:
        record.update(triton_aot.compile_launch(launch, arch)[1]._asdict())
    except Exception as error:  # reported per kernel: one failure must not hide the others
        record["error"] = f"{type(error).__name__}: {error}"
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def tasks(archs, class_counts):
    """(arch, variant, kernel) for every distinct specialisation."""
    seen = set()
    for arch in archs:
        for variant in triton_aot.variants(class_counts):
            for kernel, launch in triton_aot.launches(variant).items():
                signature, constants, attributes = triton_aot.specialization(launch, arch)
                key = (arch, kernel, launch.num_warps, tuple(signature.items()), tuple(constants.items()),
                       tuple((k, str(v)) for k, v in attributes.items()))
                if key not in seen:
                    seen.add(key)
                    yield arch, variant, kernel


def markdown(records, full=False):
    """One row per architecture, kernel and class count (the range over its variants), or with
    ``full`` one row per compiled kernel."""
    if full:
        groups = {(r["arch"], r["kernel"], r["classes"], r["logits"], r["labels"], r["ignore"], r["write_grad"]): [r]
                  for r in records}
    else:
        groups = {}
        for r in records:
            groups.setdefault((r["arch"], r["kernel"], "" if r["kernel"] == "scale" else r["classes"]), []).append(r)
    lines = ["| sm | kernel | C | variant | tile (px x classes) | warps | registers | spill stores / loads B "
             "| stack B | shared B |", "|" + "---|" * 10]
    for key, rows in groups.items():
        failures = [r["error"] for r in rows if "error" in r]
        rows = [r for r in rows if "error" not in r]
        variant = (f"{key[3]}, {key[4]}, ignore {key[5]}, grad {key[6]}" if full
                   else f"{len(rows) + len(failures)} variants")
        first = (rows or [{}])[0]
        tile = f"{first['block_p']} x {first['block_c']}" if first.get("block_p") else ""
        figures = (f"{_span(rows, 'registers')} | {_span(rows, 'spill_stores')} / {_span(rows, 'spill_loads')} "
                   f"| {_span(rows, 'stack_bytes')} | {_span(rows, 'shared_bytes')}" if rows else "| | |")
        if failures:
            figures += f" **{len(failures)} fail**: {failures[0][:120]}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {variant} | {tile} | {first.get('num_warps', '')} "
                     f"| {figures} |")
    return "\n".join(lines)


def _span(rows, name):
    """``low-high`` of a figure over rows (one number when they agree)."""
    low, high = min(r[name] for r in rows), max(r[name] for r in rows)
    return str(low) if low == high else f"{low}-{high}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(triton_aot.ARCHITECTURES))
    parser.add_argument("--classes", type=int, nargs="+", default=list(triton_aot.CLASS_COUNTS))
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--full", action="store_true", help="one row per compiled kernel, not per class count")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: a cached compile would hide a front-end error
        todo = list(tasks(args.arch, args.classes))
        # spawned, not forked: a fork of a process that holds torch's threads can deadlock
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            records = list(pool.map(compile_one, todo))
    records.sort(key=lambda r: (r["arch"], r["kernel"], r["classes"], r["logits"], r["labels"]))
    print(markdown(records, args.full))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    failed = [r for r in records if "error" in r]
    print(f"\n{len(records)} kernels compiled, {len(failed)} failed, "
          f"{sum(r.get('spill_stores', 0) > 0 for r in records)} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
