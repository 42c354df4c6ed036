"""The kernel back ends of the fused loss against the float64 composite reference, in value and gradient.

Every test runs for each back end: the C++ CPU kernel (``segfocal.losses.cpu_kernels``, built on
first use) and the Triton kernels. On a CUDA machine the Triton kernels run compiled on the GPU;
elsewhere they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) on CPU
tensors: the same kernel code, run with NumPy.
"""
import importlib
import os
import shutil
import types

import pytest
import torch

import segfocal.losses.fused as fused_module
from segfocal.losses import focal_loss

import focal_cases
from focal_cases import OPTIONS, far_off_labels, fast_path_kept, options_id, value_and_grad

CUDA = torch.cuda.is_available()


def cpu_backend():
    from segfocal.losses import cpu_kernels

    if cpu_kernels.library() is None:
        if shutil.which(os.environ.get("CXX") or "c++") is not None:
            pytest.fail("a C++ compiler is installed but the CPU kernel did not build (see the warning)")
        pytest.skip("no C++ compiler")
    def split_finely(monkeypatch):  # 3 threads over 16-pixel tiles
        monkeypatch.setattr(cpu_kernels, "TILE", 16)
        monkeypatch.setattr(cpu_kernels, "GRAIN", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)

    return types.SimpleNamespace(module=cpu_kernels, device="cpu", split_finely=split_finely)


def triton_backend():
    pytest.importorskip("triton")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    module = importlib.import_module("segfocal.losses.triton_kernels")

    def split_finely(monkeypatch):  # 3 programs, each looping over many pixel blocks
        monkeypatch.setattr(module, "MAX_PROGRAMS", 3)

    return types.SimpleNamespace(module=module, device="cuda" if CUDA else "cpu", split_finely=split_finely)


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    """A kernel back end (``.module``, ``.device``), with every fused call on logits of a dtype it
    takes routed through it, whatever the device (``conftest.py`` fails the test if it was turned off)."""
    chosen = cpu_backend() if request.param == "cpu" else triton_backend()
    monkeypatch.setattr(fused_module, "_kernels",
                        lambda logits: chosen.module if logits.dtype in chosen.module.DTYPES else None)
    return chosen


def batch(backend, shape, **kwargs):
    return focal_cases.batch(shape, device=backend.device, **kwargs)


def check_against_reference(logits, target, rtol=2e-5, **options):
    """Triton on ``logits`` (their dtype and layout) against the float64 reference on the same values."""
    loss, grad = value_and_grad(logits, target, "fused", **options)
    ref_loss, ref_grad = value_and_grad(logits.double(), target, "reference", **options)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=1e-7)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * float(scale))
    return grad


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
@pytest.mark.parametrize("shape", [(37, 5), (2, 5, 9, 11), (2, 5, 3, 4, 6)])
def test_kernels_equal_reference(options, shape, backend):
    logits, target = batch(backend, shape, seed=len(shape))
    check_against_reference(logits.float(), target, **options)


def test_work_split_in_many_pieces_adds_up(backend, monkeypatch):
    backend.split_finely(monkeypatch)
    logits, target = batch(backend, (3, 4, 17, 23), seed=1)
    check_against_reference(logits.float(), target, poly_epsilon=1.0)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "sliced", "transposed"])
def test_kernels_read_strided_logits_and_write_a_gradient_they_can_address(layout, backend):
    shape = (2, 6, 5, 12, 10) if layout == "channels_last_3d" else (2, 6, 12, 10)
    logits, target = batch(backend, shape)
    logits = logits.float()
    if layout == "channels_last":
        strided = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        strided = logits.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        wide = torch.zeros(2, 6, 12, 20, device=backend.device)
        wide[..., ::2] = logits
        strided = wide[..., ::2]
    else:  # dense, but height and width cannot be merged into one stride
        strided = logits.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    grad = check_against_reference(strided, target)
    if layout.startswith("channels_last"):
        assert grad.stride() == strided.stride()


@pytest.mark.parametrize("num_classes", [150, 1000])  # 1000: the widest tile, 4 pixels over 16 warps
def test_many_classes_and_a_large_class_tile(num_classes, backend):
    logits, target = batch(backend, (2, num_classes, 6, 7), seed=3)
    check_against_reference(logits.float(), target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype, backend):
    logits, target = batch(backend, (2, 5, 9, 11), seed=4)
    half = logits.to(dtype)
    loss, grad = value_and_grad(half, target, "fused", poly_epsilon=1.0)
    ref_loss, ref_grad = value_and_grad(half.double(), target, "reference", poly_epsilon=1.0)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("target_dtype,ignore_index", [(torch.uint8, 255), (torch.int32, 2), (torch.uint8, -100)])
def test_label_dtypes_and_ignore_index(target_dtype, ignore_index, backend):
    logits, target = batch(backend, (2, 5, 9, 11), seed=5, ignore_index=ignore_index if ignore_index >= 0 else 0)
    target = target.to(target_dtype)
    check_against_reference(logits.float(), target, ignore_index=ignore_index, weight="enet")


def test_all_ignored_gives_zero_and_zero_gradient(backend):
    logits, _ = batch(backend, (2, 5, 4, 4))
    target = torch.full((2, 4, 4), 255, device=backend.device)
    loss, grad = value_and_grad(logits.float(), target, "fused", poly_epsilon=1.0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_saturated_pixels_keep_finite_accurate_gradients(backend):
    logits, target = batch(backend, (2, 4, 6, 6), seed=6, ignore_fraction=0.0)
    onehot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).double()
    saturated = logits + 40.0 * onehot  # p_t rounds to 1 in float32
    for gamma in (0.5, 2.0):
        grad = check_against_reference(saturated.float(), target, gamma=gamma, rtol=1e-4)
        assert torch.isfinite(grad).all()


def test_a_large_gamma_on_far_off_labels_follows_the_closed_form(backend):
    # 1 - p_t rounds to 1 there, but gamma p_t does not vanish: (1 - p_t)^gamma must come from p_t
    logits, target, gamma, expected_loss, expected_grad = far_off_labels(torch.float32, device=backend.device)
    loss, grad = value_and_grad(logits, target, "fused", gamma=gamma, weight=None)
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=1e-4, atol=0)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=1e-4, atol=1e-4 * scale)


def test_the_module_uses_the_kernels_and_reports_its_weights(backend):
    from segfocal.losses import FocalLoss

    logits, target = batch(backend, (2, 5, 9, 11), seed=7)
    criterion = FocalLoss(weight="enet")
    loss = criterion(logits.float(), target)
    reference = FocalLoss(weight="enet", implementation="reference")(logits, target)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(criterion.last_class_weights.double(),
                               reference.new_tensor(1.0) / torch.log(1.10 + _shares(target, 5)), rtol=1e-6, atol=0)


def _shares(target, num_classes):
    counts = torch.bincount(target[target != 255].flatten(), minlength=num_classes).double()
    return counts / counts.sum()


def test_the_forward_writes_the_gradient_and_float16_recomputes_it(backend, monkeypatch):
    calls = []
    original = backend.module.gradient
    monkeypatch.setattr(backend.module, "gradient", lambda *args: calls.append(args[0].dtype) or original(*args))
    logits, target = batch(backend, (2, 5, 9, 11), seed=8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        value_and_grad(logits.to(dtype), target, "fused")
    assert calls == [dtype for dtype in (torch.float16,) if dtype in backend.module.DTYPES]


def test_a_second_backward_through_the_same_graph_recomputes(backend):
    logits, target = batch(backend, (2, 5, 9, 11), seed=9)
    x = logits.float().requires_grad_(True)
    loss = focal_loss(x, target, implementation="fused", poly_epsilon=1.0)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (2.0 * loss).backward(retain_graph=True)
    (3.0 * loss).backward()
    _, ref_grad = value_and_grad(logits, target, "reference", poly_epsilon=1.0)
    torch.testing.assert_close(first.double(), ref_grad, rtol=2e-5, atol=2e-5 * float(ref_grad.abs().max()))
    torch.testing.assert_close(x.grad.double(), 6 * ref_grad, rtol=2e-5, atol=1e-4 * float(ref_grad.abs().max()))


def test_without_a_gradient_the_loss_is_the_same(backend):
    logits, target = batch(backend, (2, 5, 9, 11), seed=10)
    with torch.no_grad():
        loss = focal_loss(logits.float(), target, implementation="fused", poly_epsilon=1.0)
    reference = focal_loss(logits, target, implementation="reference", poly_epsilon=1.0)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)


def test_the_cuda_path_of_the_fused_loss_is_the_triton_kernels(monkeypatch):
    """The dispatch of CUDA logits, the Triton counterpart of the CPU path test: run on fake CUDA
    tensors (shapes and devices without data), so it holds on a machine without a GPU too."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from segfocal.losses import triton_kernels

    with FakeTensorMode():
        logits = torch.empty(2, 19, 8, 8, device="cuda")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert fused_module._kernels(logits.to(dtype)) is triton_kernels
        assert fused_module._kernels(logits.double()) is None  # float64 stays on the exact chunked path
        too_many = torch.empty(2, triton_kernels.MAX_CLASSES + 1, 8, device="cuda")
        assert fused_module._kernels(too_many) is None
        monkeypatch.setenv("SEGFOCAL_TRITON", "0")
        assert fused_module._kernels(logits) is None
        monkeypatch.setenv("SEGFOCAL_TRITON", "1")
        monkeypatch.setattr(fused_module, "_HAS_TRITON", False)  # the only other way off, and never silent
        monkeypatch.setattr(fused_module, "_WARNED", set())
        with pytest.warns(RuntimeWarning, match="Triton is not installed"):
            assert fused_module._kernels(logits) is None


@pytest.mark.parametrize("phase", ["histogram", "forward", "scale_"])
def test_the_guard_fails_a_kernel_test_whose_kernel_raised(phase, monkeypatch):
    """Proof that the guard bites: the C++ back end made to raise in one phase (the histogram, the
    forward pass, or the backward's scaling of the gradient it wrote). The chunked pass still gives
    the reference's values, so only the guard can tell."""
    chosen = cpu_backend()
    monkeypatch.setattr(fused_module, "_kernels", lambda logits: fused_module._usable(chosen.module))

    def broken(*args, **kwargs):
        raise RuntimeError(f"deliberately broken {phase}")

    monkeypatch.setattr(chosen.module, phase, broken)
    logits, target = focal_cases.batch((2, 5, 6, 6))
    with pytest.raises(pytest.fail.Exception, match=f"deliberately broken {phase}"):
        with fast_path_kept():
            loss, grad = value_and_grad(logits.float(), target, "fused", weight="enet")
    reference_loss, reference_grad = value_and_grad(logits, target, "reference", weight="enet")
    torch.testing.assert_close(loss.double(), reference_loss, rtol=1e-5, atol=0)  # the fallback's answer
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, layout", [(torch.float32, torch.contiguous_format),
                                           (torch.bfloat16, torch.channels_last)], ids=["float32", "bfloat16-nhwc"])
def test_under_torch_compile_the_loss_keeps_the_kernels_in_one_graph(backend, monkeypatch, dtype, layout):
    """Both back ends are custom operators: ``torch.compile(fullgraph=True)`` keeps them (their calls
    counted), with an upstream gradient that the backward scales."""
    calls = []
    if backend.module.__name__.endswith("triton_kernels"):
        launch = backend.module.Launch.__call__
        monkeypatch.setattr(backend.module.Launch, "__call__",
                            lambda self: (calls.append(self.kernel.__name__ if hasattr(self.kernel, "__name__")
                                                       else str(self.kernel)), launch(self))[1])
    else:
        call = backend.module._call
        monkeypatch.setattr(backend.module, "_call", lambda name, problem: (calls.append(name), call(name, problem))[1])
    options = dict(weight="enet", alpha=0.25, poly_epsilon=0.5, validate=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: 1.5 * focal_loss(x, t, **options), fullgraph=True)
    logits, target = focal_cases.batch((2, 5, 6, 7))
    x = logits.to(dtype).to(backend.device).contiguous(memory_format=layout).requires_grad_(True)
    loss = compiled(x, target.to(backend.device))
    (grad,) = torch.autograd.grad(loss, x)
    torch._dynamo.reset()
    assert len(calls) == 2  # the histogram and the forward pass: the chunked pass calls neither
    reference, reference_grad = value_and_grad(logits.to(dtype).double(), target, "reference", upstream=1.5, **options)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.detach().double().cpu(), 1.5 * reference, rtol=tolerance, atol=0)
    torch.testing.assert_close(grad.double().cpu(), reference_grad, rtol=tolerance,
                               atol=tolerance * float(reference_grad.abs().max()))
