"""Test-session setup."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, the Triton kernels (tests/test_focal_triton.py) run in Triton's interpreter. It
    # must be chosen before Triton is first imported: Triton's own library functions are decorated
    # then. The CPU code paths never use Triton, so nothing else is affected.
    os.environ.setdefault("TRITON_INTERPRET", "1")
