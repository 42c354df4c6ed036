"""The C++ CPU kernel's build, cache and fallback, and its behaviour beyond the shared kernel cases
(``test_focal_kernels.py``): threads, extreme logits, unvalidated labels."""
import os
import shutil
import time

import pytest
import torch

import segfocal.losses.fused as fused_module
from segfocal.losses import cpu_kernels, focal_loss

from focal_cases import batch, value_and_grad

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An empty cache folder, and ``library()`` forgotten before and after the test."""
    monkeypatch.setenv("SEGFOCAL_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path
    cpu_kernels.library.cache_clear()


@needs_compiler
def test_the_cpu_path_of_the_fused_loss_is_the_kernel():
    logits, _ = batch((2, 5, 4, 4))
    assert fused_module._kernels(logits.float()) is cpu_kernels
    assert fused_module._kernels(logits.bfloat16()) is cpu_kernels
    assert fused_module._kernels(logits) is None  # float64 stays on the exact chunked path
    assert fused_module._kernels(logits.half()) is None


@needs_compiler
def test_built_once_then_loaded_from_the_cache(fresh_library):
    first = cpu_kernels._build()
    built_at = first.stat().st_mtime_ns
    assert first.parent == fresh_library and first.suffix == ".so"
    assert cpu_kernels._build() == first and first.stat().st_mtime_ns == built_at
    assert [path.name for path in fresh_library.iterdir()] == [first.name]  # no partial file left behind
    assert cpu_kernels.library() is not None


@needs_compiler
def test_a_rejected_native_flag_falls_back_to_portable_flags(fresh_library, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "NATIVE", ("-fno-such-flag-segfocal",))
    assert cpu_kernels.library() is not None
    logits, target = batch((2, 5, 6, 7))
    loss, grad = value_and_grad(logits.float(), target, "fused", weight="enet")
    ref_loss, ref_grad = value_and_grad(logits, target, "reference", weight="enet")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-5 * float(ref_grad.abs().max()))


@needs_compiler
def test_a_relative_shared_cache_folder_gives_a_library_every_user_can_load(fresh_library, monkeypatch):
    monkeypatch.chdir(fresh_library)
    monkeypatch.setenv("SEGFOCAL_CACHE", ".")  # a bare file name would send dlopen to the system's path
    umask = os.umask(0o022)
    try:
        path = cpu_kernels._build()
    finally:
        os.umask(umask)
    assert path.is_absolute() and path.parent == fresh_library
    assert path.stat().st_mode & 0o055 == 0o055  # read and execute for the group and others
    assert cpu_kernels.library() is not None


@needs_compiler
def test_a_build_sweeps_the_folders_of_killed_builds_but_not_of_running_ones(fresh_library):
    abandoned, running = fresh_library / ".build-abandoned", fresh_library / ".build-running"
    for folder in (abandoned, running):
        folder.mkdir()
        (folder / "cpu_kernel-0000.so").write_bytes(b"partial")
    hour_ago = time.time() - cpu_kernels.ABANDONED_AFTER_S - 60
    os.utime(abandoned, (hour_ago, hour_ago))
    cpu_kernels._build()
    assert not abandoned.exists() and running.exists()


@needs_compiler
def test_a_rejected_native_flag_is_not_retried_once_the_portable_build_is_cached(fresh_library, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "NATIVE", ("-fno-such-flag-segfocal",))
    first = cpu_kernels._build()
    monkeypatch.setattr(cpu_kernels.subprocess, "run", lambda *args, **kwargs: pytest.fail("compiled again"))
    assert cpu_kernels._build() == first


@needs_compiler
def test_no_classes_unvalidated_give_zero_as_the_chunked_pass():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # the kernel, the kernel, the chunked pass
        x = torch.zeros(2, 0, 4, 4, dtype=dtype, requires_grad=True)
        loss = focal_loss(x, target, weight=None, validate=False)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == x.shape


@needs_compiler
def test_a_library_built_for_another_cpu_is_not_reused(fresh_library, monkeypatch):
    first = cpu_kernels._build()
    monkeypatch.setattr(cpu_kernels, "_cpu_id", lambda: b"another cpu")
    assert cpu_kernels._build() != first


def test_without_a_compiler_it_warns_and_the_chunked_path_gives_the_loss(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    logits, target = batch((2, 5, 6, 7))
    with pytest.warns(RuntimeWarning, match="'/nonexistent/c\\+\\+'.*PyTorch implementation"):
        assert cpu_kernels.library() is None
    assert fused_module._kernels(logits.float()) is None
    loss = focal_loss(logits.float(), target, weight="enet")
    torch.testing.assert_close(loss.double(), focal_loss(logits, target, weight="enet", implementation="reference"),
                               rtol=1e-6, atol=0)


def test_it_can_be_turned_off_without_a_build(fresh_library, monkeypatch):
    monkeypatch.setenv("SEGFOCAL_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "_build", lambda: pytest.fail("built although turned off"))
    assert cpu_kernels.library() is None
    assert fused_module._kernels(torch.zeros(2, 3)) is None


@needs_compiler
def test_threads_and_tiles_change_nothing_but_the_summation_order(monkeypatch):
    logits, target = batch((3, 7, 21, 19), seed=11)
    logits = logits.float()
    results = []
    for threads, tile in ((1, 0), (1, 16), (3, 16), (4, 32), (2, 24)):  # 24: rounded up to 32
        monkeypatch.setattr(cpu_kernels, "TILE", tile)
        monkeypatch.setattr(cpu_kernels, "GRAIN", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        results.append(value_and_grad(logits, target, "fused", weight="enet", poly_epsilon=1.0))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        assert torch.equal(grad, results[0][1])  # the gradient is per pixel: bit for bit the same
    again = value_and_grad(logits, target, "fused", weight="enet", poly_epsilon=1.0)
    assert torch.equal(again[0], results[-1][0])  # per-thread sums added in a fixed order: deterministic


@needs_compiler
def test_extreme_logits_match_the_reference():
    logits, target = batch((2, 6, 9, 10), seed=12, scale=40.0)  # exp underflows for most classes
    logits[0, 2, :3] = float("-inf")  # a class ruled out (never a label there)
    target[0, :3][target[0, :3] == 2] = 255
    loss, grad = value_and_grad(logits.float(), target, "fused", gamma=2.0, poly_epsilon=1.0)
    ref_loss, ref_grad = value_and_grad(logits, target, "reference", gamma=2.0, poly_epsilon=1.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))
    assert torch.all(grad[0, 2, :3] == 0)


@needs_compiler
def test_nan_logits_give_a_nan_loss_as_the_reference():
    logits, target = batch((2, 4, 5, 5), seed=13, ignore_fraction=0.0)
    logits[1, 3, 2, 2] = float("nan")
    loss = focal_loss(logits.float(), target)
    assert torch.isnan(loss) and torch.isnan(focal_loss(logits, target, implementation="reference"))


@needs_compiler
def test_unvalidated_out_of_range_labels_count_as_ignored():
    logits, target = batch((2, 5, 6, 6), seed=14, ignore_fraction=0.3)
    wild = target.clone()
    wild[target == 255] = 7  # out of [0, 5), not ignore_index: validation is what rejects them
    loss = focal_loss(logits.float(), wild, weight="enet", validate=False)
    torch.testing.assert_close(loss.double(), focal_loss(logits, target, weight="enet", implementation="reference"),
                               rtol=2e-5, atol=0)
