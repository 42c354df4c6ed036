"""The C++ CPU kernel's thread pool: the same bits whatever the thread count, from one call to the
next, from several Python threads at once, and in a child forked after the pool exists."""
import os
import shutil
import threading
import time

import pytest
import torch

from segfocal.losses import FocalOptions, cpu_kernels

from focal_cases import batch

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")

GAMMA = 2.0
IGNORE = 255
OPTIONS = FocalOptions(gamma=GAMMA, ignore_index=IGNORE)


@pytest.fixture
def threads_of_this_thread(monkeypatch):
    """Set ``.count`` on the returned object to choose the kernel's thread count, per Python thread;
    tiles of 16 pixels and no grain: many units of work, each call spread over its threads."""
    local = threading.local()
    monkeypatch.setattr(cpu_kernels, "TILE", 16)
    monkeypatch.setattr(cpu_kernels, "GRAIN", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: getattr(local, "count", 1))
    return local


def case(seed, shape=(3, 6, 23, 17)):
    logits, target = batch(shape, seed=seed)
    return logits.float(), target


def kernel(logits, target):
    """The kernel's per-class focal sums, Poly-1 sum, gradient and label histogram."""
    classes = logits.shape[1]
    coefficients = torch.cat([torch.linspace(0.5, 2.0, classes), torch.zeros(1)])
    focal_sums, poly_sum, grad = cpu_kernels.forward(logits, target, coefficients, torch.tensor(0.3), OPTIONS,
                                                     write_grad=True)
    return focal_sums, poly_sum, grad, cpu_kernels.histogram(target, classes, IGNORE)


def assert_same_bits(results, expected):
    for result, reference in zip(results, expected):
        assert torch.equal(result, reference)


def test_thread_counts_and_repeated_calls_give_the_same_bits_and_the_float64_sums(threads_of_this_thread):
    logits, target = case(seed=21)
    runs = []
    for count in (1, 2, 3, 5, 2, 5, 3, 1, 5):  # the pool grows to 4 workers and is reused with fewer
        threads_of_this_thread.count = count
        runs.append(kernel(logits, target))
    for run in runs[1:]:
        assert_same_bits(run, runs[0])
    # the sums against the closed form in float64: (1 - p)^g (-log p) per label class, (1 - p)^(g + 1) in all
    focal_sums, poly_sum, _, counts = runs[0]
    valid = target != IGNORE
    labels = target[valid]
    log_p = logits.double().log_softmax(1).movedim(1, -1)[valid].gather(1, labels[:, None])[:, 0]
    one_minus_p = -torch.expm1(log_p)
    expected = torch.zeros(logits.shape[1], dtype=torch.float64).index_add_(0, labels, one_minus_p**GAMMA * -log_p)
    torch.testing.assert_close(focal_sums, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(poly_sum, (one_minus_p ** (GAMMA + 1)).sum(), rtol=1e-5, atol=0)
    assert torch.equal(counts, torch.bincount(labels, minlength=logits.shape[1]).double())


def test_concurrent_calls_from_python_threads_each_give_their_single_threaded_bits(threads_of_this_thread):
    cases = [case(seed=30 + index) for index in range(4)]  # a different input per Python thread
    expected = [kernel(*inputs) for inputs in cases]  # one kernel thread each
    start = threading.Barrier(len(cases))
    results, errors = {}, []

    def caller(index):
        threads_of_this_thread.count = 2 + index % 3  # 2, 3, 4, 2: the pool is asked for different sizes
        try:
            start.wait(timeout=60)
            results[index] = [kernel(*cases[index]) for _ in range(5)]
        except Exception as error:  # reported by the main thread
            errors.append(error)

    callers = [threading.Thread(target=caller, args=(index,)) for index in range(len(cases))]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in callers), "a concurrent call did not return"
    assert not errors, errors
    for index, runs in results.items():
        for run in runs:
            assert_same_bits(run, expected[index])
    assert len(results) == len(cases)


def run_in_child(check, timeout=60):
    """Fork; the child runs ``check()`` (True: pass) and exits at once. Fails on a wrong result, an
    error, or a child still running after ``timeout`` seconds (deadlocked), which is then killed."""
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: PyTorch's OpenMP team is not fork-safe
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + timeout
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if status[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child did not finish within {timeout} s (deadlocked)")
    assert os.waitstatus_to_exitcode(status[1]) == 0, "the child's kernel call failed or gave other bits"


def test_a_child_forked_after_the_pool_exists_runs_the_kernel_even_if_forked_during_a_call(threads_of_this_thread):
    """Forked while another Python thread is inside pooled calls: the child must neither inherit a
    held lock nor wait for the parent's workers, and runs the kernel on two threads of its own."""
    logits, target = case(seed=40, shape=(4, 6, 160, 160))  # a few ms in the kernel per call
    threads_of_this_thread.count = 2
    expected = kernel(logits, target)  # the pool exists from here on
    stop = threading.Event()

    def keep_calling():
        threads_of_this_thread.count = 2
        while not stop.is_set():
            cpu_kernels.forward(logits, target, torch.ones(7), torch.tensor(0.0), OPTIONS, write_grad=True)

    busy = threading.Thread(target=keep_calling)
    busy.start()
    try:
        for _ in range(5):  # forks land inside the other thread's calls most of the time
            time.sleep(0.01)
            run_in_child(lambda: all(torch.equal(a, b) for a, b in zip(kernel(logits, target), expected)))
    finally:
        stop.set()
        busy.join(timeout=60)
    assert_same_bits(kernel(logits, target), expected)  # and the parent's pool still works
