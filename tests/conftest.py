"""Test-session setup."""
import os

import pytest
import torch
from hypothesis import settings

from focal_cases import fast_path_kept

if not torch.cuda.is_available():
    # Without a GPU, the Triton kernels (tests/test_focal_kernels.py) run in Triton's interpreter. It
    # must be chosen before Triton is first imported: Triton's own library functions are decorated
    # then. The CPU code paths never use Triton, so nothing else is affected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests search at random by default, so every local run may find a new case. CI
# (HYPOTHESIS_PROFILE=ci, set by .ci/run) replays one fixed search instead: a clean-clone dry run
# then sees exactly the examples CI will see. Cases a search finds are kept as @example.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: small convolutions run fastest so, and stay fast when other
    jobs share the CPUs. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def kernels_stay_on():
    """Every test fails if the fused loss turns a kernel back end off during it: its chunked pass
    would answer with the reference's values and hide the broken kernel. Tests of that fallback
    install a registry of their own inside (``tests/test_focal_fallback.py``)."""
    with fast_path_kept():
        yield
