"""What softtopk's numba kernels share: how a call's rows are split among threads, with as many threads as torch.

Numba's OpenMP threading layer sets OpenMP's thread count to numba's own at every parallel launch, and torch reads
its count from OpenMP: a kernel launched with numba's default (every core) would silently undo a user's
``torch.set_num_threads(1)``. So numba is given torch's count before each launch (numba cannot exceed the
``NUMBA_NUM_THREADS`` it started with; if torch asks for more, torch's count is restored after the call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numba
import torch

__all__ = ["lanes", "launch", "torch_threads"]


@contextlib.contextmanager
def torch_threads() -> Iterator[int]:
    """Inside: numba runs on torch's number of threads (yielded); torch's is what it was before, after."""
    n = torch.get_num_threads()
    threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def launch(kernel: Callable[..., Any], rows: int, *args: Any) -> Any:
    """``kernel(*args, n_lanes)`` on torch's number of threads, its ``rows`` split into :func:`lanes`: what
    :func:`torch_threads` does, as one plain call (a generator context manager costs microseconds a call)."""
    n = torch.get_num_threads()
    threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    try:
        return kernel(*args, lanes(rows, threads))
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def lanes(rows: int, threads: int) -> int:
    """Parallel tasks for ``rows`` rows on ``threads`` threads: a few per thread (for balance), each with its own
    scratch space."""
    return max(1, min(rows, 4 * threads))
