"""The runner: every selected case at every shape of its tags (warmed up, then timed interleaved with the others at
that shape), the quality metrics, and the JSON document every table is written from."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

import softtopk

from .cases import BASELINE, SHAPES, SPEED_T, TAGS, Case, Fn, Shape, softtopk_cases
from .measure import check_peak_extra_bytes, interleaved, median, peak_extra_bytes
from .peers import first_line, peer_cases
from .quality import quality

__all__ = ["SCHEMA", "Config", "fit_exponent", "machine", "plan", "run", "select_cases"]

SCHEMA = "softtopk-bench/1"
QUICK_MAX_N = 1000  # --quick: the grid's sizes up to this (the app shapes all run)


@dataclass
class Config:
    """What a run measures and how long it may take."""

    tags: tuple[str, ...] = TAGS
    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    only: list[str] | None = None  # case names or sources (the baseline always runs)
    budget_s: float | None = None  # seconds of interleaved rounds per shape (None: by size)
    max_call_s: float = 10.0  # a case stops at the size where one call is predicted or measured above this
    slow_s: float = 1.5  # cases slower than this are timed apart, in one or two calls
    max_mem_gb: float = 6.0
    min_rounds: int = 3
    max_rounds: int = 200
    temperatures: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    quality_rows: int = 8
    quality_n: int = 200
    ref_samples: int = 100_000
    seed: int = 0

    def budget(self, shape: Shape) -> float:
        if self.budget_s is not None:
            return self.budget_s
        if self.quick:
            return 0.2
        e = shape.rows * shape.n
        return 2.0 if e <= 10**5 else 3.0 if e <= 10**6 else 6.0 if e <= 10**7 else 10.0


def _selected(case: Case, only: list[str] | None) -> bool:
    return case.name == BASELINE or only is None or case.name in only or case.source in only


def select_cases(cfg: Config, notices: list[str]) -> list[Case]:
    """The cases of the selected tags (and ``only``), the peers that import here included."""
    cases = softtopk_cases()
    if {"peers", "permutahedron", "quality"} & set(cfg.tags):
        wanted = lambda source: cfg.only is None or any(s.startswith(source) for s in cfg.only)  # noqa: E731
        cases += peer_cases(cfg.device, notices, wanted)
    cases = [c for c in cases if c.tags & set(cfg.tags) and _selected(c, cfg.only)]
    if cfg.quick and any(c.heavy for c in cases):
        notices.append("not in --quick (compiles, or one call takes seconds): "
                       + ", ".join(c.name for c in cases if c.heavy))  # fmt: skip
        cases = [c for c in cases if not c.heavy]
    return cases


def plan(cfg: Config, cases: list[Case]) -> dict[Shape, list[Case]]:
    """Shape -> the cases measured there (each once, whichever tags bring it), smallest shapes first."""
    out: dict[Shape, list[Case]] = {}
    for tag in cfg.tags:
        for shape in SHAPES.get(tag, []):
            if cfg.quick and tag != "apps" and shape.n > QUICK_MAX_N:
                continue
            at = out.setdefault(shape, [])
            at += [c for c in cases if tag in c.tags and c not in at]
    return dict(sorted(out.items(), key=lambda kv: (kv[0].rows * kv[0].n, kv[0].n)))


@dataclass
class _History:
    """Per case: (elements, seconds of one call, peak bytes) at the last shape run, and why it stopped."""

    last: dict[str, tuple[int, float, int | None]] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    def refuse(self, case: Case, shape: Shape, cfg: Config) -> str | None:
        """Why ``case`` does not run at ``shape`` (``None``: it runs)."""
        if case.name in self.stopped or case.name == BASELINE:
            return self.stopped.get(case.name)
        if case.name not in self.last:
            return None
        e, t, m = self.last[case.name]
        scale = (shape.rows * shape.n / e) ** case.order
        if t * scale > cfg.max_call_s:
            return f"predicted {t * scale:.3g} s per call (n^{case.order:g} growth) > {cfg.max_call_s:g} s cap"
        if m is not None and m * scale > cfg.max_mem_gb * 2**30:
            return f"predicted {m * scale / 2**30:.3g} GiB peak (n^{case.order:g} growth) > {cfg.max_mem_gb:g} GiB cap"
        return None


def _sync(device: torch.device) -> Fn | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _warm_up(case: Case, x: Tensor, g: Tensor, shape: Shape, cfg: Config) -> tuple[Fn, float, float]:
    """The forward+backward callable of ``case``, the seconds of one call, and those of its first call (which it
    has made): a first call over ``slow_s`` is followed by a second, whose time is the one returned first, so that
    a one-time compilation is not taken for the case's speed (by the caps, or the slow path of the timing)."""
    k, sync = case.k_at(shape), _sync(cfg.device)
    t0 = time.perf_counter()
    if case.build is not None:
        fn = case.build(x, k, g)
    else:
        out = case.output(x, k)
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same upstream gradient for every mask
        w = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(cfg.device)
        out.backward(w)
        fn = lambda: case.output(x, k).backward(w)  # noqa: E731
    if sync is not None:
        sync()
    first = time.perf_counter() - t0
    if first <= cfg.slow_s:
        return fn, first, first
    x.grad = None
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return fn, time.perf_counter() - t0, first


def _record(shape: Shape, case: Case, **fields: Any) -> dict[str, Any]:
    base = {"rows": shape.rows, "n": shape.n, "k": case.k_at(shape), "use": shape.use, "case": case.name}
    return {**base, "source": case.source, "skipped": None, "note": "", **fields}


def run_shape(shape: Shape, cases: list[Case], cfg: Config, hist: _History) -> list[dict[str, Any]]:
    """Warm-up (first call), memory (second call), then the interleaved timing of every case at ``shape``."""
    gen = torch.Generator().manual_seed(cfg.seed + shape.n)
    x = torch.randn(shape.rows, shape.n, generator=gen).to(cfg.device).requires_grad_()
    g = torch.randn(shape.rows, shape.n, generator=gen).to(cfg.device)
    records: list[dict[str, Any]] = []
    built: dict[str, tuple[Case, Fn, float, float]] = {}  # case, callable, seconds of one call, of the first
    notes: dict[str, str] = {}
    for case in cases:
        why = hist.refuse(case, shape, cfg)
        try:
            if why is None:
                x.grad = None
                built[case.name] = (case, *_warm_up(case, x, g, shape, cfg))
                if x.grad is not None and not bool(torch.isfinite(x.grad).all()):
                    notes[case.name] = "non-finite gradient"
        except Exception as e:  # noqa: BLE001 - recorded as skipped at this shape
            why = f"failed: {first_line(e)}"
        if why is not None:
            hist.stopped.setdefault(case.name, f"{why} (from {shape.label})")
            records.append(_record(shape, case, skipped=why))
    return records + _time_built(shape, x, built, notes, cfg, hist)


OWN_SOURCES = ("torch", "softtopk")  # the cases timed apart from the peers'


PEERS, OWN, CORE = range(3)  # the groups of interleaved timing, in the order they run


def _group(case: Case) -> int:
    return CORE if "core" in case.tags else OWN if case.source in OWN_SOURCES else PEERS


def _time_built(shape: Shape, x: Tensor, built: dict, notes: dict, cfg: Config, hist: _History) -> list[dict]:
    def reset() -> None:  # outside the timed region: every call allocates its gradient afresh
        x.grad = None

    sync = _sync(cfg.device)
    over = {n for n, (_, _, s, _) in built.items() if s > cfg.max_call_s and n != BASELINE}
    visible = {n: fn for n, (c, fn, _, _) in built.items() if c.memory_visible and n not in over}
    peaks = peak_extra_bytes(visible, cfg.device, reset=reset)
    fast = {n: fn for n, (_, fn, s, _) in built.items() if s <= cfg.slow_s or n == BASELINE}
    # each group of cases is interleaved among itself and with torch.topk, and its ratios are against that group's
    # torch.topk: the peers (a peer's runtime, JAX's thread pools, then does not slow the calls after it in a round),
    # the rest of softtopk's and torch's own, and the core cases (the threshold masks and softmax, whose targets the
    # tables check: rounds of their own, not a few between calls that take 10-500x as long and evict the caches)
    groups: dict[int, dict[str, Fn]] = {}
    for n, fn in fast.items():
        for g in (PEERS, OWN, CORE) if n == BASELINE else (_group(built[n][0]),):
            groups.setdefault(g, {})[n] = fn
    times: dict[str, list[float]] = {}
    base_of: dict[str, float] = {}
    for g, group in sorted(groups.items()):  # the peers first (their threads idle again before softtopk's rounds)
        if len(group) == 1:
            continue
        got = interleaved(group, cfg.max_rounds, budget_s=cfg.budget(shape), min_rounds=cfg.min_rounds,
                          reset=reset, sync=sync, seed=cfg.seed + shape.n + g)  # fmt: skip
        for n, ts in got.items():  # torch.topk's record: the core rounds' (the last ones)
            base_of[n], times[n] = median(got[BASELINE]), ts
    if BASELINE not in times:  # only torch.topk at this shape
        times.update(interleaved({BASELINE: fast[BASELINE]}, cfg.max_rounds, budget_s=cfg.budget(shape),
                                 min_rounds=cfg.min_rounds, reset=reset, sync=sync))  # fmt: skip
    for name, (_, fn, one, _) in built.items():
        if name in over:
            times[name] = [one]
            notes[name] = f"one call {one:.3g} s > cap: timed once"
            hist.stopped[name] = f"one call took {one:.3g} s at {shape.label}"
        elif name not in fast:
            times.update(interleaved({name: fn}, 1 if one > 5 else 2, reset=reset, sync=sync))
    base = median(times[BASELINE])
    out = []
    for name, (case, _, _, first) in built.items():
        ts, peak = sorted(times[name]), peaks.get(name)
        hist.last[name] = (shape.rows * shape.n, median(ts), peak)
        out.append(_record(shape, case, median_ms=median(ts) * 1e3, q1_ms=ts[len(ts) // 4] * 1e3,
                           q3_ms=ts[3 * len(ts) // 4] * 1e3, rounds=len(ts), ratio=median(ts) / base_of.get(name, base),
                           first_call_ms=first * 1e3, note=notes.get(name, ""),
                           bytes_per_element=None if peak is None else peak / (shape.rows * shape.n)))  # fmt: skip
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a run measured: CPU model, cores, torch threads, the GPU if any, the load at the start."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    """softtopk, torch, Python, and every optional package a case may use that is installed."""
    out = {"softtopk": softtopk.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("numba", "triton", "torchsort", "entmax", "ott-jax", "jax", "diffsort", "difftopk"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def run(cfg: Config, log: Callable[[str], None] = print, step: Callable[[str], None] = lambda s: None) -> dict:
    """Measure everything ``cfg`` selects; returns the JSON document (schema :data:`SCHEMA`)."""
    t_start, notices = time.perf_counter(), list[str]()
    cases = select_cases(cfg, notices)
    doc: dict[str, Any] = {"schema": SCHEMA, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(cfg.device), "versions": versions(), "notices": notices,
           "config": {**asdict(cfg), "device": str(cfg.device), "speed_temperature": SPEED_T},
           "cases": [_case_info(c) for c in cases], "speed": [], "quality": None}  # fmt: skip
    m, v = doc["machine"], doc["versions"]
    log(f"# softtopk-bench: softtopk {v['softtopk']}, torch {v['torch']}, {m['cpu']} ({m['cores']} cores, "
        f"{m['threads']} threads), {m['device']}; 1-min load {m['load_1min'] or 0:.2f}")  # fmt: skip
    for line in notices:
        log(f"# {line}")
    shapes = plan(cfg, cases)
    if shapes:
        log(f"# memory self-check: empty(1024) float32 = {check_peak_extra_bytes(cfg.device)} bytes (ok)")
    hist = _History()
    for shape, at in shapes.items():
        step(shape.label)
        t0 = time.perf_counter()
        doc["speed"] += run_shape(shape, at, cfg, hist)
        log(f"# {shape.label}: {len(at)} cases, {time.perf_counter() - t0:.1f} s")
    if "quality" in cfg.tags:
        step("quality")
        doc["quality"] = quality([c for c in cases if "quality" in c.tags], cfg, log)
    doc["total_s"] = time.perf_counter() - t_start
    return doc


def _case_info(c: Case) -> dict[str, Any]:
    return {"name": c.name, "source": c.source, "kind": c.kind, "tags": sorted(c.tags), "note": c.note,
            "temperature": c.temperature if c.mask is not None else None, "fixed_k": c.fixed_k}  # fmt: skip


def fit_exponent(points: list[tuple[int, float]], last: int = 3, min_ms: float = 10.0) -> tuple[float, int, int] | None:
    """Least-squares slope of log time against log n over the ``last`` largest sizes that take at least ``min_ms``
    (below, per-call overhead flattens the curve; all sizes when fewer than two do): (slope, n_min, n_max)."""
    pts = sorted((n, t) for n, t in points if t and t > 0)
    big = [p for p in pts if p[1] >= min_ms]
    pts = (big if len(big) >= 2 else pts)[-last:]
    if len(pts) < 2:
        return None
    xs, ys = [math.log10(n) for n, _ in pts], [math.log10(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return slope, pts[0][0], pts[-1][0]

