"""A kernel back end that fails to compile or launch never stops the loss: the fused loss warns once,
naming the reason, and its chunked PyTorch pass gives the same value and gradient.

Failures are injected into the real back ends (the C++ CPU kernel, and the Triton kernels in
Triton's interpreter): one entry point at a time raises what a compiler or driver would.
"""
import types
import warnings

import pytest
import torch

import segfocal.losses.fused as fused
from segfocal.losses import focal_loss

from focal_cases import batch, value_and_grad

OPTIONS = dict(gamma=2.0, weight="enet", poly_epsilon=0.5, ignore_index=255)


class InjectedCompileError(RuntimeError):
    pass


@pytest.fixture
def fresh_failures(monkeypatch):
    """No back end has failed or warned yet in this test (the registry is per process)."""
    monkeypatch.setattr(fused, "_KERNEL_FAILURES", {})
    monkeypatch.setattr(fused, "_WARNED", set())


def failing_backend(module, failing: str):
    """``module`` with the entry point ``failing`` raising, under the module's own name."""
    def fail(*args, **kwargs):
        raise InjectedCompileError("ptxas fatal: injected for the test")

    functions = {name: getattr(module, name) for name in ("histogram", "forward", "gradient", "scale_")}
    functions[failing] = fail
    return types.SimpleNamespace(__name__=module.__name__, **functions)


def triton_or_cpu(name):
    if name == "triton":
        pytest.importorskip("triton")
        from segfocal.losses import triton_kernels

        return triton_kernels
    from segfocal.losses import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("no C++ compiler")
    return cpu_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("failing", ["histogram", "forward", "gradient", "scale_"])
@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_a_failing_kernel_warns_once_and_the_chunked_pass_gives_the_loss(backend_name, failing, dtype,
                                                                          fresh_failures, monkeypatch):
    module = triton_or_cpu(backend_name)
    if dtype not in module.DTYPES:
        pytest.skip(f"{backend_name} does not take {dtype}")
    broken = failing_backend(module, failing)
    monkeypatch.setattr(fused, "_kernels", lambda logits: fused._usable(broken))
    logits, target = batch((2, 5, 6, 7), seed=3, dtype=dtype)
    expected_loss, expected_grad = value_and_grad(logits.double(), target, "reference", upstream=2.5, **OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grad = value_and_grad(logits, target, "fused", upstream=2.5, **OPTIONS)
        again = value_and_grad(logits, target, "fused", upstream=2.5, **OPTIONS)
    # float16 never writes the gradient in the forward, so its backward recomputes, never scales
    reached = not (failing == "scale_" and dtype == torch.float16) and not (
        failing == "gradient" and dtype != torch.float16)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if reached:
        assert len(messages) == 1, messages
        assert "InjectedCompileError" in messages[0] and "ptxas fatal: injected" in messages[0]
        assert fused._KERNEL_FAILURES[module.__name__].startswith("InjectedCompileError")
    else:
        assert messages == [] and fused._KERNEL_FAILURES == {}
    tolerance = dict(rtol=2e-3, atol=2e-4) if dtype == torch.float16 else dict(rtol=2e-5, atol=1e-7)
    for value, gradient in ((loss, grad), again):
        torch.testing.assert_close(value.double(), expected_loss, **tolerance)
        torch.testing.assert_close(gradient.double(), expected_grad,
                                   rtol=tolerance["rtol"], atol=tolerance["rtol"] * float(expected_grad.abs().max()))


def test_a_failed_back_end_is_not_tried_again(fresh_failures, monkeypatch):
    module = triton_or_cpu("cpu")
    calls = []

    def histogram(*args):
        calls.append(1)
        raise InjectedCompileError("no kernel image is available for execution on the device")

    broken = types.SimpleNamespace(__name__=module.__name__, histogram=histogram)
    monkeypatch.setattr(fused, "_kernels", lambda logits: fused._usable(broken))
    logits, target = batch((2, 5, 4, 4), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        focal_loss(logits, target, **OPTIONS)
    focal_loss(logits, target, **OPTIONS)
    assert calls == [1]


def fake_cuda_logits(num_classes=19, dtype=torch.float32):
    """What the back-end choice reads of CUDA logits, on a machine without a GPU."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, num_classes, 8, 8))


def test_cuda_logits_choose_triton_unless_turned_off_too_many_classes_or_float64(fresh_failures, monkeypatch):
    pytest.importorskip("triton")
    from segfocal.losses import triton_kernels

    monkeypatch.delenv("SEGFOCAL_TRITON", raising=False)
    assert fused._kernels(fake_cuda_logits()) is triton_kernels
    assert fused._kernels(fake_cuda_logits(dtype=torch.bfloat16)) is triton_kernels
    assert fused._kernels(fake_cuda_logits(triton_kernels.MAX_CLASSES)) is triton_kernels
    assert fused._kernels(fake_cuda_logits(triton_kernels.MAX_CLASSES + 1)) is None
    assert fused._kernels(fake_cuda_logits(dtype=torch.float64)) is None
    monkeypatch.setenv("SEGFOCAL_TRITON", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen, so not warned about
        assert fused._kernels(fake_cuda_logits()) is None


def test_cuda_logits_without_triton_warn_once_and_use_the_chunked_pass(fresh_failures, monkeypatch):
    monkeypatch.delenv("SEGFOCAL_TRITON", raising=False)
    monkeypatch.setattr(fused, "_HAS_TRITON", False)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert fused._kernels(fake_cuda_logits()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused._kernels(fake_cuda_logits()) is None
