"""Every Triton kernel of softtopk through Triton's real compiler for an H100/H200 (sm_90), without a GPU (see
_compile_kernels.py): the interpreter, which runs the other kernel tests on CPU, executes the kernels' Python
semantics and would not notice code that does not compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install 'softtopk[gpu]'): kernel tests skipped")


def test_kernels_compile_for_sm90(tmp_path):
    """Compiled in a subprocess with ``TRITON_INTERPRET=0`` and a fresh cache; its output says what failed."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's CUDA backend is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    script = Path(__file__).with_name("_compile_kernels.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
