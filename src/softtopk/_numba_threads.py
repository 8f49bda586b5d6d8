"""What softtopk's numba kernels share: how a call's rows are split among threads, with as many threads as torch.

Numba's OpenMP threading layer sets OpenMP's thread count to numba's own at every parallel launch, and torch reads
its count from OpenMP: a kernel launched with numba's default (every core) would silently undo a user's
``torch.set_num_threads(1)``. So numba is given torch's count before each launch (numba cannot exceed the
``NUMBA_NUM_THREADS`` it started with; if torch asks for more, torch's count is restored after the call).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numba
import torch

__all__ = ["lanes", "launch", "torch_threads"]


_SET = threading.local()  # numba's thread count is per calling thread: what this module last set it to, in each


def _follow_torch() -> tuple[int, int]:
    """numba set to torch's number of threads (capped by ``NUMBA_NUM_THREADS``): (torch's count, numba's). Numba is
    asked only when torch's count changed since this thread last set numba's (``numba.get_num_threads`` takes two
    locks: microseconds on every small call); a count set by the caller through numba itself is then kept."""
    n = torch.get_num_threads()
    threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if getattr(_SET, "threads", None) != threads:
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        _SET.threads = threads
    return n, threads


def _restore(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads() -> Iterator[int]:
    """Inside: numba runs on torch's number of threads (yielded); torch's is what it was before, after."""
    n, threads = _follow_torch()
    try:
        yield threads
    finally:
        _restore(n)


def launch(kernel: Callable[..., Any], rows: int, *args: Any) -> Any:
    """``kernel(*args, n_lanes)`` as inside :func:`torch_threads`, its ``rows`` split into :func:`lanes`: one plain
    call (entering a generator context manager costs microseconds, a noticeable share of a small call)."""
    n, threads = _follow_torch()
    try:
        return kernel(*args, lanes(rows, threads))
    finally:
        _restore(n)


def lanes(rows: int, threads: int) -> int:
    """Parallel tasks for ``rows`` rows on ``threads`` threads: a few per thread (for balance), each with its own
    scratch space."""
    return max(1, min(rows, 4 * threads))
