"""The environment of the kernel tests, imported by each of them (not a conftest.py: its module name would shadow
tests/conftest.py for the other test folders).

The kernel tests run the Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``), or on CUDA
for real when a GPU is present (and ``TRITON_INTERPRET`` is not set to 1 by the caller). Triton reads
``TRITON_INTERPRET`` when a kernel is *defined* (``@triton.jit``), and softtopk defines its kernels on the first
kernel call of the process (``softtopk.kernels._triton_kernels`` is imported lazily), so setting it here, when a
kernel test module is imported, is enough. ``SOFTTOPK_TRITON_ON_CPU=1``, which lets
:func:`softtopk.kernels.available` say yes for CPU tensors, is set only inside these tests (the ``kernel_env``
fixture), never for the rest of the suite.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def kernel_env(monkeypatch):
    """The testing switch on (CPU tensors may take the kernels) and the torch reference forced for comparisons."""
    from softtopk import threshold

    monkeypatch.setenv("SOFTTOPK_TRITON_ON_CPU", "1")
    monkeypatch.delenv("SOFTTOPK_DISABLE_TRITON", raising=False)
    monkeypatch.setitem(threshold.BACKEND, "threshold", "torch")
    yield
