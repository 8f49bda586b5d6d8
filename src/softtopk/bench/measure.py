"""Measurement: interleaved wall-clock timing, and the peak extra memory of one call.

* :func:`interleaved` times several callables round by round, every callable once per round in a fresh random
  order, so that slow drifts of the machine (frequency, other load, page-cache state) hit all of them alike.
* :func:`peak_extra_bytes` is the peak memory one call allocates beyond what already exists: on CPU from the
  allocation and free events of the PyTorch profiler, on CUDA from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["Fn", "check_peak_extra_bytes", "interleaved", "median", "peak_extra_bytes"]

Fn = Callable[[], object]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (as in ``timeit``); the previous state is restored after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def interleaved(
    fns: dict[str, Fn],
    rounds: int,
    *,
    budget_s: float | None = None,
    min_rounds: int = 3,
    reset: Fn | None = None,
    sync: Fn | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time every callable once per round, in a shuffled order; name -> seconds of each timed call.

    Args:
        fns: name -> callable taking no argument (warmed up by the caller).
        rounds: the most rounds.
        budget_s: stop after the round in which the rounds passed this many seconds, once ``min_rounds`` are done.
        min_rounds: the fewest rounds when ``budget_s`` is given.
        reset: called before every call, outside the timed region (e.g. ``x.grad = None``).
        sync: called right before starting and stopping the clock (``torch.cuda.synchronize``).
        seed: seed of the shuffling.
    """
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with gc_paused():
        start = time.perf_counter()
        for r in range(rounds):
            rng.shuffle(names)
            for name in names:
                if reset is not None:
                    reset()
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                fns[name]()
                if sync is not None:
                    sync()
                times[name].append(time.perf_counter() - t0)
            gc.collect(0)  # the garbage cycles of this round: with gc paused, all its objects are young
            if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
    return times


# the profiler's own log lines, and its warning about frees of tensors made before it started (handled below)
_CHATTER = re.compile(r"^(USDT|STAGE):.*Profiler|.*Memory block of unknown size was allocated before")


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Drop the lines the profiler's C++ side writes to fd 2; everything else written meanwhile is written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _CHATTER.match(line)))
            sys.stderr.flush()


def _peak_cpu(fns: dict[str, Fn], reset: Fn | None) -> dict[str, int]:
    # One profiler session, each call in its own record_function range. The profiler records one "[memory]" event
    # per allocation (+bytes) and per free (-bytes); within a range, the running sum in time order is the memory
    # held by the tensors made since the range began, and its maximum the peak extra memory.
    gc.collect()
    with gc_paused(), _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, fn in fns.items():
            if reset is not None:
                reset()
            with record_function("peak:" + name):
                fn()
                gc.collect(0)
    events = prof.profiler.kineto_results.events()
    ranges = {e.name()[5:]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("peak:")}
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    peaks = {}
    for name, (begin, end) in ranges.items():
        peak = held = 0
        for t, nbytes in memory:
            if begin <= t <= end:
                held += nbytes
                peak = max(peak, held)
        peaks[name] = peak
    return peaks


def _peak_cuda(fn: Fn, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_extra_bytes(fns: dict[str, Fn], device: torch.device, reset: Fn | None = None) -> dict[str, int]:
    """Peak bytes one call of each callable allocates beyond the memory held when it starts (one profiler session
    for all of them on CPU). Memory a call leaves allocated (a ``.grad`` it fills) counts up to its peak."""
    if device.type == "cpu":
        return _peak_cpu(fns, reset)
    peaks = {}
    for name, fn in fns.items():
        if reset is not None:
            reset()
        peaks[name] = _peak_cuda(fn, device)
    return peaks


def check_peak_extra_bytes(device: torch.device, n: int = 1024) -> int:
    """Self-check of :func:`peak_extra_bytes` on known cases; returns the bytes of one float32 ``empty(n)``.

    ``empty(n)`` must show 4n bytes, two live tensors 4n + 8n, and a tensor freed before the next allocation must
    not count twice (8n, not 12n).
    """

    def two_live() -> None:
        a, b = torch.empty(n, device=device), torch.empty(2 * n, device=device)
        del a, b

    def freed_first() -> None:
        a = torch.empty(n, device=device)
        del a
        b = torch.empty(2 * n, device=device)
        del b

    fns: dict[str, Fn] = {"one": lambda: torch.empty(n, device=device), "two_live": two_live}
    fns["freed_first"] = freed_first
    peaks = peak_extra_bytes(fns, device)
    got, want = (peaks["one"], peaks["two_live"], peaks["freed_first"]), (4 * n, 12 * n, 8 * n)
    if got != want:
        raise RuntimeError(f"peak_extra_bytes self-check failed: got {got} bytes, expected {want}")
    return got[0]
