"""``softtopk-bench --tag gpu --device cuda``: the Triton kernels of the threshold family against ``torch.topk`` and
against the torch path, on a GPU.

For every shape (the app shapes of :data:`softtopk.bench.cases.APP_SHAPES`, and batch 32 and 1024 × n = 1e3 ... 1e6
with k = n / 100), every dtype (float32, bfloat16) and every method (sigmoid, lapsum, sparse p = 2 and 4/3,
DFTopK), one forward+backward call (upstream gradient fixed, the temperature not differentiated) is timed for:

* **kernel**: :mod:`softtopk.kernels.triton_threshold` (the fused Triton kernels), called directly;
* **torch**: :mod:`softtopk.threshold`'s pure-torch path (``SOFTTOPK_DISABLE_TRITON=1`` while it runs, so that it
  is the reference whatever the dispatch does);
* **torch.topk**: ``torch.topk(x, k).values`` and its backward, once per (shape, dtype): the baseline of the ratios.

Timing: ``warmup`` calls (compilation), then repetitions until ``reps`` calls or ``budget_s`` seconds, each between
two CUDA events; the median is reported. Bandwidth: the bytes a fused forward+backward must move, R·n·(2·s_x + 12)
(x read and y written (float32) by the forward; g and y read (float32), gx written (x's dtype) by the backward),
divided by the median time, as a fraction of the device's peak HBM bandwidth: from :data:`PEAK_BANDWIDTH` by the
device's name, or else the measured bandwidth of a large ``clone`` (reported as such).

Without CUDA the command line refuses the tag; :func:`measure` itself runs on any device (the test suite runs
:meth:`GpuConfig.tiny` on CPU through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .cases import APP_SHAPES, SPEED_T, fmt_n

__all__ = ["METHODS", "PEAK_BANDWIDTH", "GpuConfig", "measure", "peak_bandwidth", "table"]

#: the methods timed, by their kernel family names ("dftopk": DFTopK)
METHODS = ("sigmoid", "lapsum", "sparse2", "sparse4/3", "dftopk")
#: peak HBM bandwidth (bytes/s) by device: (pattern on torch.cuda.get_device_name, label, bytes/s); first match wins
PEAK_BANDWIDTH: tuple[tuple[str, str, float], ...] = (
    (r"H200", "H200", 4.8e12),
    (r"H100.*PCIE", "H100 PCIe", 2.0e12),
    (r"H100", "H100 SXM", 3.35e12),
    (r"A100.*80GB", "A100 80GB", 2.0e12),
    (r"A100", "A100 40GB", 1.555e12),
    (r"\bL4\b", "L4", 0.3e12),
)


def _default_shapes() -> tuple[tuple[int, int, int], ...]:
    apps = tuple((s.rows, s.n, s.k) for s in APP_SHAPES)
    return apps + tuple((rows, n, n // 100) for rows in (32, 1024) for n in (10**3, 10**4, 10**5, 10**6))


@dataclass
class GpuConfig:
    """What the GPU benchmark measures (the defaults: the issue's case set)."""

    shapes: tuple[tuple[int, int, int], ...] = field(default_factory=_default_shapes)  # (rows, n, k)
    methods: tuple[str, ...] = METHODS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    warmup: int = 2
    reps: int = 50
    budget_s: float = 1.0  # per (shape, dtype, case): stop repeating after this
    torch_path: bool = True  # also time the torch path (slow at 1024 × 1e6: minutes)

    @classmethod
    def quick(cls) -> GpuConfig:
        """Seconds: the app shapes up to 1e6 elements and batch 32 × 1e3, 1e4; few repetitions."""
        shapes = tuple(s for s in _default_shapes() if s[0] * s[1] <= 10**6 and s[0] != 1024)
        return cls(shapes=shapes, warmup=1, reps=5, budget_s=0.2)

    @classmethod
    def tiny(cls) -> GpuConfig:
        """For tests on CPU (Triton's interpreter): one small shape, two methods, one repetition."""
        return cls(shapes=((2, 33, 3),), methods=("sigmoid", "dftopk"), dtypes=("float32",), warmup=0, reps=1,
                   budget_s=0.0)  # fmt: skip


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """(peak bytes/s, where it comes from) for ``device``: the table for known GPUs, else a measured ``clone``."""
    known = _peak_of_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if known is not None:
        return known[0], f"peak of {known[1]} (table)"
    return _copy_bandwidth(device), "measured: clone of 256 MiB (not a datasheet peak)"


def _peak_of_name(name: str) -> tuple[float, str] | None:
    """(bytes/s, label) of the first :data:`PEAK_BANDWIDTH` entry whose pattern matches ``name``, or None."""
    for pattern, label, bw in PEAK_BANDWIDTH:
        if re.search(pattern, name.upper()):
            return bw, label
    return None


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of ``clone`` (read + write) of a 256 MiB tensor (64 MiB on CPU), best of 5."""
    size = (256 if device.type == "cuda" else 64) << 20
    x = torch.empty(size // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        best = min(best, _time_once(lambda: x.clone(), device))
    return 2 * size / best


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _timed(fn: Callable[[], Any], cfg: GpuConfig, device: torch.device) -> list[float]:
    for _ in range(cfg.warmup):
        fn()
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < max(cfg.reps, 1) and (not times or time.perf_counter() - t0 < cfg.budget_s):
        times.append(_time_once(fn, device))
    return times


@contextlib.contextmanager
def _torch_path() -> Iterator[None]:
    """The torch reference, whatever the dispatch: Triton disabled, the numba kernel off."""
    from .. import threshold

    old_env, old_backend = os.environ.get("SOFTTOPK_DISABLE_TRITON"), threshold.BACKEND["threshold"]
    os.environ["SOFTTOPK_DISABLE_TRITON"] = "1"
    threshold.BACKEND["threshold"] = "torch"
    try:
        yield
    finally:
        threshold.BACKEND["threshold"] = old_backend
        if old_env is None:
            os.environ.pop("SOFTTOPK_DISABLE_TRITON", None)
        else:
            os.environ["SOFTTOPK_DISABLE_TRITON"] = old_env


def _call(method: str, impl: str, x: Tensor, k: int, t: Tensor) -> Tensor:
    """One forward of ``method`` by ``impl`` ("kernel" or "torch"), x in its own dtype (the torch path computes in
    float32 for half inputs, as softtopk does)."""
    from .. import threshold
    from ..kernels import triton_threshold as tt

    kk = torch.full((x.shape[0], 1), float(k), device=x.device)
    if impl == "kernel" and method == "dftopk":
        return tt.dftopk(x, k, t)
    if impl == "kernel":
        return tt.threshold_mask(method, x, kk, t, 1e-5, threshold.MAX_ITER)
    with _torch_path():
        if method == "dftopk":
            return threshold.dftopk(x.float(), k, t)
        return threshold.normalised_mask(method, x.float(), kk, t)


def _temperature(method: str, rows: int, device: torch.device) -> Tensor:
    """The family's own t at softtopk's speed temperature (width convention: T × φ' at 1/2)."""
    from ..threshold import FAMILIES

    slope = 0.25 if method == "dftopk" else FAMILIES[method].slope_at_half
    return torch.full((rows, 1), SPEED_T * slope, device=device)


def _measure_shape(rows: int, n: int, k: int, dtype: torch.dtype, cfg: GpuConfig, device: torch.device,
                   peak: float) -> list[dict[str, Any]]:  # fmt: skip
    gen = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    g = torch.randn(rows, n, generator=gen).to(device)
    moved = rows * n * (2 * x.element_size() + 12)
    g_top = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)

    def run(fn: Callable[[], Tensor], grad: Tensor) -> None:
        x.grad = None  # every call allocates its gradient afresh
        fn().backward(grad)

    base = statistics.median(_timed(lambda: run(lambda: torch.topk(x, k).values, g_top), cfg, device))
    out = []
    impls = ("kernel", "torch") if cfg.torch_path else ("kernel",)
    for method in cfg.methods:
        t = _temperature(method, rows, device)
        for impl in impls:
            rec: dict[str, Any] = {"rows": rows, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
                                   "method": method, "impl": impl, "topk_ms": base * 1e3, "skipped": None}  # fmt: skip
            try:
                call = functools.partial(_call, method, impl, x, k, t)
                ms = statistics.median(_timed(functools.partial(run, call, g), cfg, device)) * 1e3
            except torch.cuda.OutOfMemoryError as e:  # the torch path at the largest shapes
                rec["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
                out.append(rec)
                continue
            bw = moved / (ms / 1e3)
            out.append({**rec, "ms": ms, "ratio_topk": ms / (base * 1e3), "bytes": moved, "bandwidth": bw,
                        "peak_fraction": bw / peak})  # fmt: skip
    return out


def measure(cfg: GpuConfig, device: torch.device, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every (shape, dtype, method, implementation); returns {"setup": ..., "rows": [...]}."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("softtopk-bench --tag gpu: the kernels need Triton: pip install 'softtopk[gpu]'")
    t0 = time.perf_counter()
    peak, source = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"# gpu benchmark on {name}: peak bandwidth {peak / 1e9:.0f} GB/s ({source})")
    rows: list[dict[str, Any]] = []
    for r, n, k in cfg.shapes:
        for dt in cfg.dtypes:
            part = _measure_shape(r, n, k, getattr(torch, dt), cfg, device, peak)
            rows += part
            done = [p for p in part if p["impl"] == "kernel" and p["skipped"] is None]
            if done:
                worst = max(p["ratio_topk"] for p in done)
                log(f"# gpu {r} × {fmt_n(n)} k={k} {dt}: kernels ≤ {worst:.2f}× torch.topk")
    setup = {**asdict(cfg), "device": name, "peak_bandwidth": peak, "peak_source": source,
             "wall_s": time.perf_counter() - t0}  # fmt: skip
    return {"setup": setup, "rows": rows}


def table(part: dict[str, Any]) -> list[str]:
    """The Markdown table of a run's ``doc["gpu"]``: per shape, dtype and method, the kernel's and the torch path's
    forward+backward time, their ratio to ``torch.topk``, and the kernel's fraction of peak bandwidth."""
    setup = part["setup"]
    lines = [f"Forward+backward per call on {setup['device']}; bandwidth as a fraction of "
             f"{setup['peak_bandwidth'] / 1e9:.0f} GB/s ({setup['peak_source']}).", "",
             "| rows × n | k | dtype | method | torch.topk ms | kernel ms | × topk | torch path ms | × topk | "
             "kernel % of peak |", "|---|---:|:---|:---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in part["rows"]:
        by_key.setdefault((r["rows"], r["n"], r["k"], r["dtype"], r["method"]), {})[r["impl"]] = r
    for (rows, n, k, dt, method), impls in by_key.items():
        ker, ref = impls.get("kernel"), impls.get("torch")

        def cell(r: dict[str, Any] | None) -> str:
            if r is None:
                return "– | –"
            return "skipped | –" if r["skipped"] else f"{r['ms']:.3g} | {r['ratio_topk']:.2f}×"

        pct = "–" if ker is None or ker["skipped"] else f"{100 * ker['peak_fraction']:.0f} %"
        top = next(iter(impls.values()))["topk_ms"]
        lines.append(f"| {rows} × {fmt_n(n)} | {k} | {dt} | {method} | {top:.3g} | {cell(ker)} | {cell(ref)} | "
                     f"{pct} |")  # fmt: skip
    return lines
