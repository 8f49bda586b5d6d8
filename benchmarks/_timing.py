"""Shared measurement helpers for the benchmarks: interleaved wall-clock timing and peak extra memory.

* :func:`interleaved` times several callables round by round (every callable once per round, in a fresh
  random order), so slow drifts of the machine (frequency, other load, page-cache state) hit all of them alike.
* :func:`peak_extra_bytes` (and :func:`peak_extra_bytes_each`) is the peak memory one call allocates beyond
  what already exists: on CPU from the allocation/free events of the PyTorch profiler, on CUDA from
  ``torch.cuda.max_memory_allocated``.
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

__all__ = ["Fn", "check_peak_extra_bytes", "interleaved", "median", "peak_extra_bytes", "peak_extra_bytes_each"]

Fn = Callable[[], object]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (as in ``timeit``); the state is restored afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median(xs: list[float]) -> float:
    """Median of a non-empty list (mean of the two middle values for an even length)."""
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def interleaved(
    fns: dict[str, Fn],
    rounds: int,
    warmup: int = 1,
    *,
    budget_s: float | None = None,
    min_rounds: int = 3,
    reset: Fn | None = None,
    sync: Fn | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time every callable once per round, in a shuffled order, and return the seconds of each call.

    Args:
        fns: name -> callable taking no argument.
        rounds: the number of timed rounds (the maximum one when ``budget_s`` is given).
        warmup: untimed rounds run first.
        budget_s: stop after the round during which the timed rounds passed this many seconds, once at least
            ``min_rounds`` rounds are done. ``None``: always run ``rounds`` rounds.
        min_rounds: the fewest timed rounds when ``budget_s`` is given.
        reset: called before every call, outside the timed region (e.g. ``x.grad = None``).
        sync: called right before starting and right before stopping the clock (e.g.
            ``torch.cuda.synchronize``), so asynchronous work is counted in full.
        seed: seed of the shuffling.

    Returns:
        name -> list of the per-call times in seconds, one per timed round.
    """
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _gc_paused():
        start = time.perf_counter()
        for r in range(warmup + rounds):
            if r == warmup:
                start = time.perf_counter()
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
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
            gc.collect(0)  # the garbage cycles of this round: with gc paused, all its objects are young
            done = r + 1 - warmup
            if budget_s is not None and done >= min_rounds and time.perf_counter() - start > budget_s:
                break
    return times


# the profiler's own log lines, and its warning about frees of tensors made before it started (handled below)
_PROFILER_CHATTER = re.compile(r"^(USDT|STAGE):.*Profiler|.*Memory block of unknown size was allocated before")


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Drop the ``USDT:``/``STAGE:`` lines that the profiler's C++ side writes to fd 2; keep everything else.

    Everything written to stderr meanwhile (Python warnings included) is captured and written back afterwards.
    """
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
            text = tmp.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not _PROFILER_CHATTER.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


_RANGE = "peak_extra_bytes:"


def _peak_cpu(fns: dict[str, Fn], reset: Fn | None) -> dict[str, int]:
    # One profiler session for all callables, each call inside its own record_function range. The profiler
    # records one "[memory]" event per allocation (+bytes) and per free (-bytes); within a range, the running
    # sum in time order is the memory held by the tensors made since the range began, its maximum the peak
    # extra memory. Frees of tensors made earlier only push the sum below 0.
    gc.collect()
    with _gc_paused(), _without_profiler_chatter():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for name, fn in fns.items():
                if reset is not None:
                    reset()
                with record_function(_RANGE + name):
                    fn()
                    gc.collect(0)
    events = prof.profiler.kineto_results.events()
    ranges = {e.name()[len(_RANGE) :]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith(_RANGE)}
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


def peak_extra_bytes_each(
    fns: dict[str, Fn], device: torch.device | str = "cpu", reset: Fn | None = None
) -> dict[str, int]:
    """:func:`peak_extra_bytes` of several callables, each called once (after ``reset``, if given).

    On CPU all of them run in one profiler session, which is much cheaper than one session each.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _peak_cpu(fns, reset)
    if device.type == "cuda":
        peaks = {}
        for name, fn in fns.items():
            if reset is not None:
                reset()
            peaks[name] = _peak_cuda(fn, device)
        return peaks
    raise ValueError(f"peak_extra_bytes: unsupported device {device}")


def peak_extra_bytes(fn: Fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by one call of ``fn`` beyond the memory already held when it starts.

    Memory that ``fn`` leaves allocated (e.g. a ``.grad`` it fills) counts up to its peak, like everything else.
    CPU: from the PyTorch profiler's memory events; CUDA: ``max_memory_allocated`` after a peak reset.
    """
    return peak_extra_bytes_each({"fn": fn}, device)["fn"]


def check_peak_extra_bytes(device: torch.device | str = "cpu", n: int = 1024) -> int:
    """Sanity check of :func:`peak_extra_bytes` on known cases; returns the bytes of one float32 ``empty(n)``.

    Checks that ``empty(n)`` shows ``4 n`` bytes, that two live tensors add up (``4 n + 8 n``), and that
    a tensor freed before the next allocation does not count twice (peak ``8 n``, not ``12 n``).
    """

    def one() -> None:
        torch.empty(n, device=device)

    def two_live() -> None:
        a = torch.empty(n, device=device)
        b = torch.empty(2 * n, device=device)
        del a, b

    def freed_first() -> None:
        a = torch.empty(n, device=device)
        del a
        b = torch.empty(2 * n, device=device)
        del b

    peaks = peak_extra_bytes_each({"one": one, "two_live": two_live, "freed_first": freed_first}, device)
    got = (peaks["one"], peaks["two_live"], peaks["freed_first"])
    want = (4 * n, 12 * n, 8 * n)
    if got != want:
        raise RuntimeError(f"peak_extra_bytes self-check failed: got {got} bytes, expected {want}")
    return got[0]
