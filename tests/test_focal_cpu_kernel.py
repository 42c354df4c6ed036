"""The C++ CPU kernel's build, cache and fallback, and its behaviour beyond the shared kernel cases
(``test_focal_kernels.py``): threads, extreme logits, unvalidated labels."""
import _ctypes
import os
import shutil
import stat
import time
from pathlib import Path

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
    # the library and its digest, no partial file left behind
    assert {path.name for path in fresh_library.iterdir()} == {first.name, first.with_suffix(".sha256").name}
    assert cpu_kernels.library() is not None


@needs_compiler
def test_a_compiler_that_takes_the_native_flag_builds_with_it_and_only_once(fresh_library, monkeypatch):
    """The portable build is a fallback for a compiler that rejects -march=native, never taken silently
    where the native one builds (this machine's gcc takes it)."""
    compiles, run = [], cpu_kernels.subprocess.run

    def recorded(command, **kwargs):
        compiles.append(command)
        return run(command, **kwargs)

    monkeypatch.setattr(cpu_kernels.subprocess, "run", recorded)
    assert cpu_kernels.library() is not None
    assert len(compiles) == 1 and set(cpu_kernels.NATIVE) <= set(compiles[0])


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
    umask = os.umask(0o002)  # user private groups: group-writable files by default
    try:
        path = cpu_kernels._build()
    finally:
        os.umask(umask)
    assert path.is_absolute() and path.parent == fresh_library
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # read and execute for all, written by its owner only
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
    assert torch.equal(results[2][0], results[1][0])  # the same tiles on 1 and 3 threads: the same bits
    again = value_and_grad(logits, target, "fused", weight="enet", poly_epsilon=1.0)
    assert torch.equal(again[0], results[-1][0])  # per-unit sums added in unit order: deterministic


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


def break_the_cached_library(cache, how):
    """Damage the library ``_build`` cached in ``cache`` the way a crash, a full disk or an intruder would."""
    path = next(cache.glob("cpu_kernel-*.so"))
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])  # loading this used to end the process with SIGBUS
    elif how == "foreign":  # another valid library under the cached name (it used to raise AttributeError)
        path.write_bytes(Path(_ctypes.__file__).read_bytes())
    return path


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """The library and its digest, built once for the tests that only need one in their cache."""
    folder = tmp_path_factory.mktemp("prebuilt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGFOCAL_CACHE", str(folder))
        cpu_kernels._build()
    return folder


@pytest.fixture
def cached(fresh_library, prebuilt):
    """A fresh cache holding a verified build (copied, not compiled); its library's path."""
    for path in prebuilt.iterdir():
        shutil.copy2(path, fresh_library / path.name)
    return cpu_kernels._build()


@needs_compiler
@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(fresh_library, cached, how):
    path = break_the_cached_library(fresh_library, how)
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None  # rebuilt: the digest matches again
    assert cpu_kernels._verified(path)
    logits, target = batch((2, 5, 6, 7))
    loss, _ = value_and_grad(logits.float(), target, "fused", weight="enet")
    torch.testing.assert_close(loss.double(), value_and_grad(logits, target, "reference", weight="enet")[0],
                               rtol=2e-5, atol=0)


@needs_compiler
@pytest.mark.parametrize("target", ["folder", "library"])
def test_a_cache_others_can_write_is_refused_with_a_warning_and_the_loss_still_runs(fresh_library, cached, target):
    path = cached
    (fresh_library if target == "folder" else path).chmod(0o777 if target == "folder" else 0o775)
    cpu_kernels.library.cache_clear()
    with pytest.warns(RuntimeWarning, match="writable by other users.*PyTorch implementation"):
        assert cpu_kernels.library() is None
    logits, target_labels = batch((2, 5, 6, 7))
    torch.testing.assert_close(focal_loss(logits.float(), target_labels).double(),
                               focal_loss(logits, target_labels, implementation="reference"), rtol=1e-6, atol=0)


@needs_compiler
def test_a_cache_of_another_user_is_refused(fresh_library, cached, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: os.lstat(fresh_library).st_uid + 1)
    cpu_kernels.library.cache_clear()
    with pytest.warns(RuntimeWarning, match="belongs to user id"):
        assert cpu_kernels.library() is None


@needs_compiler
def test_a_library_without_its_digest_is_not_loaded(cached):
    cached.with_suffix(".sha256").unlink()
    assert not cpu_kernels._verified(cached)


@needs_compiler
def test_a_symlinked_cache_folder_is_refused(fresh_library, monkeypatch, tmp_path_factory):
    link = tmp_path_factory.mktemp("elsewhere") / "cache"
    link.symlink_to(fresh_library)
    monkeypatch.setenv("SEGFOCAL_CACHE", str(link))
    with pytest.raises(RuntimeError, match="symbolic link"):
        cpu_kernels._build()

