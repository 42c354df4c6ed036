"""The Triton kernels compiled ahead of time for sm_80 and sm_90, as on a GPU, with no GPU.

Triton's interpreter (which runs the value tests here) accepts code the compiler rejects, so every
kernel is also compiled by Triton's real compiler and the ptxas in the triton wheel, for the
launches the package itself builds (``segfocal/losses/triton_aot.py``). The compiles run in
subprocesses: this process has the interpreter turned on (``conftest.py``).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from recipes import REPO

pytest.importorskip("triton")


def compiler_env(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # empty: a cached kernel hides front-end errors
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path)])
    return env


def run_python(tmp_path, code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=compiler_env(tmp_path),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_and_none_spills(tmp_path):
    report = tmp_path / "resources.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "triton_resources.py"), "--json", str(report)],
                            env=compiler_env(tmp_path), capture_output=True, text=True, timeout=600)
    records = json.loads(report.read_text()) if report.exists() else []
    failed = [r for r in records if "error" in r]
    assert result.returncode == 0 and records and not failed, (failed[:3], result.stdout[-2000:],
                                                               result.stderr[-3000:])
    spilled = [r for r in records if r["classes"] <= 150 and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, spilled
    # every kernel on both architectures, and every value of every input the kernels specialise on
    for arch in (80, 90):
        ours = [r for r in records if r["arch"] == arch]
        assert {r["kernel"] for r in ours} == {"histogram", "forward", "backward", "scale"}
        forward = [r for r in ours if r["kernel"] == "forward"]
        assert {r["classes"] for r in forward} == {1, 2, 19, 150, 1000}
        assert {r["logits"] for r in forward} == {"float32", "bfloat16", "float16"}
        assert {r["labels"] for r in forward} == {"int64", "int32", "uint8"}
        assert {r["ignore"] for r in forward} == {True, False}
        assert {r["write_grad"] for r in forward} == {True, False}
        assert all(r["registers"] <= 255 and r["shared_bytes"] <= 48 * 1024 for r in ours)


def test_the_check_rejects_what_the_compiler_rejects(tmp_path):
    """A kernel reading a plain global float (the bug the interpreter let through) fails to compile here."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        SCALE = 2.0

        @triton.jit
        def kernel(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)
    """))
    result = run_python(tmp_path, """
        import torch
        from bad_kernel import kernel
        from segfocal.losses.triton_aot import compile_launch
        from segfocal.losses.triton_kernels import Launch

        launch = Launch(kernel, (1,), dict(x_ptr=torch.zeros(64), n=64), dict(BLOCK=64), 4)
        try:
            compile_launch(launch, 90)
        except Exception as error:
            print("REJECTED", type(error).__name__, error)
        else:
            print("ACCEPTED")
    """)
    assert "REJECTED CompilationError" in result.stdout and "global variable" in result.stdout, (
        result.stdout[-2000:], result.stderr[-2000:])


def test_the_compiled_specialisation_is_the_one_the_jit_makes(tmp_path):
    """Argument types, constants and alignment attributes equal what Triton's own launch path derives."""
    result = run_python(tmp_path, """
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        from segfocal.losses import triton_aot

        checked = 0
        for variant in triton_aot.variants((1, 19, 1000)):
            for name, launch in triton_aot.launches(variant).items():
                backend = make_backend(GPUTarget("cuda", 80, 32))
                binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
                bound, specialisation, options = binder(**launch.args, **launch.constexprs,
                                                        num_warps=launch.num_warps)
                packed_options, *jit = launch.kernel._pack_args(backend, dict(options), bound, specialisation,
                                                                options)
                jit[2] = {key: value for key, value in jit[2].items() if value}  # constexprs carry no attribute
                ours = list(triton_aot.specialization(launch, 80))
                assert ours == jit, (name, variant, ours, jit)
                assert packed_options.num_warps == launch.num_warps
                checked += 1
        print("CHECKED", checked)
    """)
    assert "CHECKED 48" in result.stdout, (result.stdout[-2000:], result.stderr[-3000:])
