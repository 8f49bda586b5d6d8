"""softtopk-bench: speed, memory, scaling and quality of softtopk's top-k operators and their peers, in one run.

Sub-commands (any subset; none means all four):

* ``speed``: forward+backward time, median of interleaved rounds (``_timing.interleaved``), as a ratio to
  ``torch.topk`` forward+backward on the same input. Batch 32, float32, random upstream gradient; k = n/100 and a
  fixed k = 10; n from 1e2 to 1e6, and n = 1e7 at batch 1 for the O(n) methods.
* ``memory``: peak extra bytes per element of x of one forward+backward (torch profiler on CPU,
  ``max_memory_allocated`` on CUDA), measured on the same grid.
* ``scaling``: the fitted exponent of time against n (log-log slope over the largest sizes each case ran).
* ``quality``: distance to the hard mask, |sum y - k|, sparsity and the gradient's cosine with the perturbed
  optimizer's, per temperature; and every method's mask on one sorted input.

Temperatures are each method's own parameter; softtopk's masks take the family's internal t (the t of
sigmoid((x - tau)/t), the Laplace scale, the noise sigma, SOFT's epsilon), converted to softtopk's width convention
by ``_temperature``, so that every operator is the one compared with the peers at that t in earlier runs.

Every case's first call at a size is a probe: a case whose call is predicted (from the smaller sizes) or measured
to exceed ``--max-call-s`` seconds or ``--max-mem-gb`` GiB stops there, and a case that fails is recorded as
skipped at that size with its error, never a crash.

    softtopk-bench                       # everything: ~15 minutes on a 2-core CPU; results in docs/benchmarks/
    softtopk-bench --quick               # under a minute (make demo): small sizes, no files unless --out
    softtopk-bench speed memory --sizes 1e3 1e4 --only sigmoid torchsort
    softtopk-bench --readme README.md    # also rewrite the README between <!-- SUITE:START/END --> markers
    softtopk-bench --from-json docs/benchmarks/suite.json --readme README.md   # the same from a saved run
    python -m benchmarks ...             # the same, from the repository root
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import softtopk

from . import report
from ._timing import check_peak_extra_bytes, interleaved, median, peak_extra_bytes_each
from .core import parse_size as core_parse_size
from .peers import BASELINE, Case, Skip, first_line, load_cases
from .quality import mask_curves, quality
from .report import fmt_n

__all__ = ["Config", "Grid", "Measurement", "SkipRecord", "fit_exponent", "main", "run"]

SUITES = ("speed", "memory", "scaling", "quality")
FULL_SIZES = (10**2, 10**3, 10**4, 10**5, 10**6)
QUICK_SIZES = (10**2, 10**3)
LARGE_N = 10**7
BATCH = 32
FIXED_K = 10
#: seconds of interleaved timed rounds per size (full run); --quick uses QUICK_BUDGET for every size
BUDGETS = {10**2: 1.5, 10**3: 2.0, 10**4: 3.0, 10**5: 6.0, 10**6: 10.0, 10**7: 8.0}
QUICK_BUDGET = 0.25


@dataclass
class Grid:
    """A set of sizes measured with one batch size and one rule for k."""

    name: str
    batch: int
    sizes: list[int]
    fixed_k: int | None = None  # None: k = max(n // 100, 1)
    only_linear: bool = False
    #: a supplementary grid of the scaling fit: case -> (lo, hi), run only for lo < n < hi (others do not run)
    limit: dict[str, tuple[int, int]] | None = None
    max_call_s: float | None = None  # a tighter per-call cap than the run's

    def k(self, n: int) -> int:
        return min(self.fixed_k, n - 1) if self.fixed_k is not None else max(n // 100, 1)

    @property
    def k_rule(self) -> str:
        return f"k={self.fixed_k}" if self.fixed_k is not None else "k=n/100"


@dataclass
class Measurement:
    grid: str
    n: int
    k: int
    batch: int
    case: str
    source: str
    median_ms: float | None
    q1_ms: float | None
    q3_ms: float | None
    ratio: float | None
    rounds: int
    peak_extra_bytes: int | None
    bytes_per_element: float | None
    probe_s: float
    setup_s: float = 0.0
    note: str = ""


@dataclass
class SkipRecord:
    grid: str
    n: int
    case: str
    source: str
    reason: str


@dataclass
class Config:
    suites: tuple[str, ...]
    quick: bool
    device: torch.device
    grids: list[Grid]
    budgets: dict[int, float]
    max_call_s: float
    slow_s: float
    max_mem_bytes: float
    min_rounds: int
    max_rounds: int
    only: list[str] | None
    temperatures: list[float]
    quality_rows: int
    quality_n: int
    ref_samples: int
    mask_temperatures: list[float]
    progress: bool
    seed: int = 0

    def budget(self, n: int) -> float:
        if n in self.budgets:
            return self.budgets[n]
        e = min(self.budgets, key=lambda m: abs(math.log10(m) - math.log10(n)))
        return self.budgets[e]


@dataclass
class _History:
    """Per case and k-rule: (elements, seconds of one call, peak bytes or None) at the sizes run so far."""

    points: dict[tuple[str, str], list[tuple[int, float, int | None]]] = field(default_factory=dict)
    stopped: dict[tuple[str, str], str] = field(default_factory=dict)

    def predict(self, case: Case, grid: Grid, elements: int) -> tuple[float | None, float | None, float]:
        """(predicted seconds, predicted bytes, exponent used) of one call at ``elements`` = batch * n."""
        pts = self.points.get((case.name, grid.k_rule), [])
        if not pts:
            return None, None, case.growth(grid.fixed_k is not None)
        # the declared exponent, not the measured one: small sizes are overhead-bound and a noisy machine can make
        # any growth look steep; a case whose growth is under-declared is caught by the per-call cap once
        order = case.growth(grid.fixed_k is not None)
        # from the nearest size measured below (or, if none, the nearest above)
        below = [p for p in pts if p[0] <= elements]
        e, t, m = max(below) if below else min(pts)
        scale = (elements / e) ** order
        return t * scale, (m * scale if m is not None else None), order


def _selected(case: Case, only: list[str] | None) -> bool:
    if case.name == BASELINE or only is None:
        return True
    return any(sel == case.name or sel == case.source or case.name.startswith(sel + ".") for sel in only)


def _inputs(n: int, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + n)
    x = torch.randn(batch, n, generator=gen).to(device).requires_grad_()
    g = torch.randn(batch, n, generator=gen).to(device)
    return x, g


def _probe_and_memory(
    fns: dict[str, Callable[[], object]],
    visible: set[str],
    device: torch.device,
    reset: Callable[[], None],
    sync: Callable[[], None] | None,
) -> tuple[dict[str, float], dict[str, int | None], dict[str, BaseException]]:
    """One call of each case (its warm-up): wall time, peak extra memory (for the torch-visible ones, all in one
    profiler session on CPU) and the exception of each one that failed."""
    seconds: dict[str, float] = {}
    errors: dict[str, BaseException] = {}

    def timed(name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            if sync:
                sync()
            t0 = time.perf_counter()
            try:
                fn()
                if sync:
                    sync()
            except Exception as e:  # noqa: BLE001 - recorded, the case is skipped at this size
                errors[name] = e
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            seconds[name] = time.perf_counter() - t0

        return call

    wrapped = {name: timed(name, fn) for name, fn in fns.items()}
    peaks: dict[str, int | None] = dict.fromkeys(fns)
    in_profiler = {name: w for name, w in wrapped.items() if name in visible}
    if in_profiler:
        peaks.update(peak_extra_bytes_each(in_profiler, device, reset=reset))
    for name, w in wrapped.items():
        if name not in visible:
            reset()
            w()
    reset()
    for name in errors:
        peaks[name] = None
    return seconds, peaks, errors


def _checked(fn: Callable[[], object], x: torch.Tensor, notes: dict[str, str], name: str) -> Callable[[], None]:
    """``fn`` followed by a check that it left a finite ``x.grad`` (for the slow cases: a negligible extra pass)."""

    def call() -> None:
        fn()
        if name not in notes and x.grad is not None and not bool(torch.isfinite(x.grad).all()):
            notes[name] = "non-finite gradient"

    return call


def run_grid(
    grid: Grid,
    cases: list[Case],
    cfg: Config,
    hist: _History,
    *,
    timing: bool,
    log: Callable[[str], None],
    step: Callable[[str], None],
) -> tuple[list[Measurement], list[SkipRecord]]:
    """Probe (with the memory measurement), then interleaved timing, of every case at every size of the grid.

    A case whose one call is predicted (from its time and memory at the previous size and its growth exponent) to
    exceed the caps is not run at this size or above; one that fails, or whose call turns out to exceed the time
    cap, is timed once (or not at all) and stopped. Cases slower than ``cfg.slow_s`` are not interleaved with the
    rest: the probe counts as one of their few timed calls.
    """
    results: list[Measurement] = []
    skips: list[SkipRecord] = []
    for n in grid.sizes:
        step(f"{grid.name} n={fmt_n(n)}")
        r, s = _run_size(grid, n, cases, cfg, hist, timing=timing, log=log)
        results += r
        skips += s
    return results, skips


def _run_size(
    grid: Grid, n: int, cases: list[Case], cfg: Config, hist: _History, *, timing: bool, log: Callable[[str], None]
) -> tuple[list[Measurement], list[SkipRecord]]:
    results: list[Measurement] = []
    skips: list[SkipRecord] = []
    device = cfg.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    fixed = grid.fixed_k is not None
    t_size = time.perf_counter()
    k = grid.k(n)
    x, g = _inputs(n, grid.batch, device, cfg.seed)
    elements = x.numel()

    def reset() -> None:
        x.grad = None

    def skip(case: Case, reason: str) -> None:
        skips.append(SkipRecord(grid.name, n, case.name, case.source, reason))
        hist.stopped[(case.name, grid.name)] = reason

    fns: dict[str, Callable[[], object]] = {}
    by_name: dict[str, Case] = {}
    setup: dict[str, float] = {}
    max_call_s = grid.max_call_s or cfg.max_call_s
    for case in cases:
        if (grid.only_linear and not case.linear) or (fixed and case.k_independent):
            continue
        if grid.limit is not None and case.name != BASELINE:
            lo, hi = grid.limit.get(case.name, (0, 0))
            if not lo < n < hi:
                continue
        if (case.name, grid.name) in hist.stopped:
            continue
        t_pred, m_pred, order = hist.predict(case, grid, elements)
        if case.name != BASELINE and t_pred is not None and t_pred > max_call_s:
            skip(case, f"predicted {t_pred:.3g} s per call (n^{order:g} growth) > {max_call_s:g} s cap")
            continue
        if case.name != BASELINE and m_pred is not None and m_pred > cfg.max_mem_bytes:
            cap = cfg.max_mem_bytes / 2**30
            skip(case, f"predicted {m_pred / 2**30:.3g} GiB peak (n^{order:g} growth) > {cap:g} GiB cap")
            continue
        t0 = time.perf_counter()
        try:
            fns[case.name] = case.build(x, k, g)
            by_name[case.name] = case
        except Skip as e:
            skip(case, str(e))
        except Exception as e:  # noqa: BLE001 - recorded as skipped at this size
            skip(case, f"setup failed: {first_line(e)}")
        setup[case.name] = time.perf_counter() - t0

    visible = {name for name in fns if by_name[name].memory_visible}
    probe, peaks, errors = _probe_and_memory(fns, visible, device, reset, sync)
    notes: dict[str, str] = {}
    for name, e in errors.items():
        if name == BASELINE:
            raise e
        skip(by_name[name], f"failed: {first_line(e)}")
        del fns[name]
    for name, fn in fns.items():
        check = getattr(fn, "finite", None)
        if check is not None and not check():
            notes[name] = "non-finite gradient"
    if x.grad is not None:
        reset()
    # the gradient of the torch cases, checked once each (an extra call only for the few it is cheap for)
    for name, fn in fns.items():
        if name in notes or getattr(fn, "finite", None) is not None or probe[name] > cfg.slow_s:
            continue
        reset()
        fn()
        if x.grad is not None and not bool(torch.isfinite(x.grad).all()):
            notes[name] = "non-finite gradient"
    reset()
    over = {name for name in fns if probe[name] > max_call_s and name != BASELINE}

    times: dict[str, list[float]] = {}
    if timing:
        fast = {name: fn for name, fn in fns.items() if probe[name] <= cfg.slow_s or name == BASELINE}
        times.update(
            interleaved(
                fast,
                cfg.max_rounds,
                0,
                budget_s=cfg.budget(n),
                min_rounds=cfg.min_rounds,
                reset=reset,
                sync=sync,
                seed=cfg.seed + n,
            )
        )
        slow = {name: _checked(fn, x, notes, name) for name, fn in fns.items() if name not in fast and name not in over}
        extra = {name: (1 if cfg.quick or grid.limit is not None or probe[name] > 5.0 else 2) for name in slow}
        for rounds in sorted(set(extra.values())):
            group = {name: fn for name, fn in slow.items() if extra[name] == rounds}
            times.update(interleaved(group, rounds, 0, reset=reset, sync=sync, seed=cfg.seed))
        for name in slow:
            times[name].append(probe[name])  # the probe is one of their timed calls (its warm-up is built in)
        for name in over:  # over the cap: the probe is the only measurement, and larger sizes are not run
            times[name] = [probe[name]]
        reset()
    base = median(times[BASELINE]) if timing else None
    for name in fns:
        case = by_name[name]
        ts = sorted(times.get(name, []))
        med = median(ts) if ts else None
        peak = peaks.get(name)
        # the prediction for the next size starts from the median (the probe can include one-time costs)
        per_call = med if med is not None and name not in over else probe[name]
        hist.points.setdefault((name, grid.k_rule), []).append((elements, per_call, peak))
        note = notes.get(name, "")
        if name in over:
            note = (note + "; " if note else "") + f"one call {probe[name]:.3g} s > cap: timed once"
            hist.stopped[(name, grid.name)] = f"one call took {probe[name]:.3g} s at n={fmt_n(n)}"
        results.append(
            Measurement(
                grid=grid.name,
                n=n,
                k=k,
                batch=grid.batch,
                case=name,
                source=case.source,
                median_ms=med * 1e3 if med is not None else None,
                q1_ms=ts[len(ts) // 4] * 1e3 if ts else None,
                q3_ms=ts[(3 * len(ts)) // 4] * 1e3 if ts else None,
                ratio=med / base if med is not None and base else None,
                rounds=len(ts),
                peak_extra_bytes=peak,
                bytes_per_element=peak / elements if peak is not None else None,
                probe_s=probe[name],
                setup_s=setup.get(name, 0.0),
                note=note,
            )
        )
    rounds = len(times.get(BASELINE, []))
    log(f"# {grid.name} n={fmt_n(n)} k={k}: {len(fns)} cases, {rounds} rounds, {time.perf_counter() - t_size:.1f} s")
    return results, skips


HALF_DECADES = (2, 5)  # the supplementary sizes 2·10^e and 5·10^e between the grid's sizes
SCALING_CALL_S = 6.0  # per-call cap of the supplementary grid
FIT_MIN_MS = 10.0  # sizes faster than this are left out of the fit (per-call overhead), when enough others remain


def _scaling_grid(main: Grid, results: list[Measurement], skips: list[SkipRecord]) -> Grid | None:
    """Extra sizes 2·10^e and 5·10^e, in the decade below the size where a case stopped in ``main``, for the cases
    with fewer than three sizes above the overhead-bound range: enough points for their exponent."""
    stop: dict[str, int] = {}
    for s in skips:
        if s.grid == main.name:
            stop[s.case] = min(stop.get(s.case, s.n), s.n)
    for r in results:
        if r.grid == main.name and r.rounds == 1 and r.case != BASELINE:  # over the cap: stopped at this size
            stop[r.case] = min(stop.get(r.case, r.n), r.n)
    limit = {}
    for case, n_stop in stop.items():
        good = [r for r in results if r.grid == main.name and r.case == case and r.rounds > 1]
        if sum(1 for r in good if (r.median_ms or 0) >= FIT_MIN_MS) < 3:
            limit[case] = (n_stop // 10, n_stop)
    sizes = sorted(
        {m * 10**e for e in range(1, 8) for m in HALF_DECADES for lo, hi in limit.values() if lo < m * 10**e < hi}
    )
    if not sizes:
        return None
    return Grid(
        f"{main.name}, scaling", main.batch, sizes, fixed_k=main.fixed_k, limit=limit, max_call_s=SCALING_CALL_S
    )


def fit_exponent(points: list[tuple[int, float]], last: int = 3, min_ms: float = FIT_MIN_MS) -> dict[str, Any] | None:
    """Least-squares slope of log(time) against log(n) over the ``last`` largest sizes among those taking at least
    ``min_ms`` milliseconds (below that, fixed per-call overhead flattens the curve), or over the ``last`` largest
    sizes when fewer than two do; ``None`` with fewer than two points. ``points``: (n, milliseconds)."""
    pts = sorted((n, t) for n, t in points if t is not None and t > 0)
    big = [p for p in pts if p[1] >= min_ms]
    pts = (big if len(big) >= 2 else pts)[-last:]
    if len(pts) < 2:
        return None
    xs = [math.log10(n) for n, _ in pts]
    ys = [math.log10(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx
    return {
        "exponent": slope,
        "n_min": pts[0][0],
        "n_max": pts[-1][0],
        "points": len(pts),
        "overhead_free": len(big) >= 2,
    }


def scaling(results: list[Measurement], grids: list[Grid]) -> list[dict[str, Any]]:
    """The fitted exponent of every case on every batch-32 grid (with the points of its supplementary grid)."""
    out = []
    for grid in grids:
        if grid.only_linear or grid.limit is not None:
            continue
        group = {grid.name} | {g.name for g in grids if g.limit is not None and g.k_rule == grid.k_rule}
        names = list(dict.fromkeys(r.case for r in results if r.grid == grid.name))
        for name in names:
            pts = [(r.n, r.median_ms) for r in results if r.grid in group and r.case == name and r.rounds >= 1]
            fit = fit_exponent(pts)
            if fit is not None:
                src = next(r.source for r in results if r.case == name)
                out.append({"grid": grid.name, "case": name, "source": src, **fit})
    return out


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------
def parse_size(s: str) -> int:
    return core_parse_size(s, minimum=16)


def default_out() -> Path:
    """docs/benchmarks of the source checkout this file lives in, else ./softtopk-bench."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "src" / "softtopk").is_dir():
        return root / "docs" / "benchmarks"
    return Path.cwd() / "softtopk-bench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softtopk-bench",
        description="Speed, memory, scaling and quality of softtopk's top-k operators and their peers.",
        epilog="Sub-commands: any of speed, memory, scaling, quality (default: all). "
        "Peers come from the optional [peers] extra; a peer that cannot be imported is skipped with a notice.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help="speed, memory, scaling, quality (default: all)")
    p.add_argument("--quick", action="store_true", help="n in {1e2, 1e3}, short budgets, small quality run (<1 min)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--sizes", type=parse_size, nargs="+", help="sizes n of the batch-32 grids (default 1e2..1e6)")
    p.add_argument(
        "--large",
        type=parse_size,
        default=None,
        help="n of the batch-1 grid of the O(n) methods (default 1e7; 0 or --quick: not run)",
    )
    p.add_argument("--no-large", action="store_true", help="skip the batch-1 grid")
    p.add_argument("--no-fixed-k", action="store_true", help="skip the k = 10 grid")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="cases to run: names (e.g. sigmoid, torchsort, "
        "ott-jax float32) or sources (softtopk, entmax, in-house); torch.topk always runs",
    )
    p.add_argument("--budget", type=float, help="seconds of timed rounds per size (default: by size, 2..12)")
    p.add_argument("--max-call-s", type=float, help="skip a case at sizes where one call takes longer (default 15)")
    p.add_argument("--max-mem-gb", type=float, default=6.0, help="skip a case above this predicted peak (GiB)")
    p.add_argument("--min-rounds", type=int, default=3, help="fewest timed rounds per size (default 3)")
    p.add_argument("--max-rounds", type=int, default=200, help="most timed rounds per size (default 200)")
    p.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        help="quality temperatures, each method's own parameter (softtopk's masks: the family's internal t, "
        "see benchmarks/_temperature.py) (default 0.003 .. 1)",
    )
    p.add_argument("--quality-n", type=int, help="quality: n (default 200; --quick 100); k = n/10")
    p.add_argument("--quality-rows", type=int, help="quality: rows (default 8; --quick 4)")
    p.add_argument("--ref-samples", type=int, help="quality: perturbed reference samples (default 100000)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write JSON, CSV, PNG plots and summary.md here "
        "(default docs/benchmarks of the checkout; --quick: nothing unless given)",
    )
    p.add_argument("--no-files", action="store_true", help="write no files (print only)")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: redo the tables, plots (next to PATH unless --out) and --readme from a suite.json",
    )
    p.add_argument("--readme", metavar="PATH", help="rewrite PATH between <!-- SUITE:START --> and <!-- SUITE:END -->")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    suites = tuple(args.suites) or SUITES
    for s in suites:
        if s not in SUITES:
            parser.error(f"unknown sub-command {s!r}: choose from {', '.join(SUITES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu")
    quick = args.quick
    sizes = sorted(args.sizes or (QUICK_SIZES if quick else FULL_SIZES))
    grids = [Grid("k=n/100", BATCH, sizes)]
    if not args.no_fixed_k and not quick:
        grids.append(Grid(f"k={FIXED_K}", BATCH, [n for n in sizes if n > FIXED_K], fixed_k=FIXED_K))
    large = args.large if args.large is not None else (None if quick else LARGE_N)
    if large and not args.no_large:
        grids.append(Grid("k=n/100, batch 1", 1, [large], only_linear=True))
    if "speed" not in suites and "memory" not in suites and "scaling" not in suites:
        grids = []
    elif "speed" not in suites and "memory" not in suites:  # scaling alone: the k = n/100 grid is enough
        grids = grids[:1]
    budgets = (
        {n: args.budget for n in sizes + [LARGE_N]}
        if args.budget is not None
        else ({n: QUICK_BUDGET for n in sizes} if quick else dict(BUDGETS))
    )
    temps = args.temperatures or ([0.01, 0.1] if quick else [0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and not quick)
    return Config(
        suites=suites,
        quick=quick,
        device=device,
        grids=grids,
        budgets=budgets,
        max_call_s=args.max_call_s if args.max_call_s is not None else (1.0 if quick else 15.0),
        slow_s=0.25 if quick else 1.5,
        max_mem_bytes=args.max_mem_gb * 2**30,
        min_rounds=2 if quick else args.min_rounds,
        max_rounds=args.max_rounds,
        only=args.only,
        temperatures=temps,
        quality_rows=args.quality_rows or (4 if quick else 8),
        quality_n=args.quality_n or (100 if quick else 200),
        ref_samples=args.ref_samples or (4000 if quick else 100_000),
        mask_temperatures=[0.03, 0.3],
        progress=progress,
        seed=args.seed,
    )


class _Progress:
    """A tqdm bar (when enabled and installed) whose log lines go through ``tqdm.write``; else plain prints."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def step(self, what: str = "") -> None:
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: Config) -> dict[str, Any]:
    """Run the selected suites; returns everything measured (the JSON document)."""
    t_start = time.perf_counter()
    notices: list[str] = []
    cases = [c for c in load_cases(cfg.device, notices, cfg.only) if _selected(c, cfg.only)]
    if cfg.quick:
        heavy = [c.name for c in cases if c.heavy]
        if heavy:
            notices.append(f"not in --quick (compiling or one call takes seconds): {', '.join(heavy)}")
        cases = [c for c in cases if not c.heavy]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    meta = {
        "softtopk": softtopk.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(cfg.device),
        "machine": torch.cuda.get_device_name(cfg.device)
        if cfg.device.type == "cuda"
        else f"{os.cpu_count()}-core CPU",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "suites": list(cfg.suites),
        "quick": cfg.quick,
        "load_average_1min": load,
        "max_call_s": cfg.max_call_s,
        "max_mem_gib": cfg.max_mem_bytes / 2**30,
        "grids": [asdict(g) for g in cfg.grids],
        "versions": report.peer_versions(),
        "torchsort_origin": report.torchsort_origin(),
    }
    steps = sum(len(g.sizes) for g in cfg.grids) + (len(cfg.temperatures) + 1 if "quality" in cfg.suites else 0)
    steps += 5 if "scaling" in cfg.suites and cfg.grids and not cfg.quick else 0
    prog = _Progress(steps, cfg.progress)
    try:
        prog.log(
            f"# softtopk-bench {'--quick ' if cfg.quick else ''}{' '.join(cfg.suites)}: softtopk {meta['softtopk']}, "
            f"torch {meta['torch']}, {cfg.device} ({meta['machine']}), {meta['threads']} threads, "
            f"1-min load {load:.2f}"
        )
        for line in notices:
            prog.log(f"# {line}")
        if cfg.grids:
            probe = check_peak_extra_bytes(cfg.device)
            prog.log(f"# memory probe: torch.empty(1024) float32 measured as {probe} bytes (ok)")
        results: list[Measurement] = []
        skips: list[SkipRecord] = []
        hist = _History()
        timing = "speed" in cfg.suites or "scaling" in cfg.suites
        for grid in cfg.grids:
            r, s = run_grid(grid, cases, cfg, hist, timing=timing, log=prog.log, step=prog.step)
            results += r
            skips += s
        if "scaling" in cfg.suites and cfg.grids and not cfg.quick:
            extra = _scaling_grid(cfg.grids[0], results, skips)
            if extra is not None:
                cfg.grids.append(extra)
                r, s = run_grid(extra, cases, cfg, hist, timing=True, log=prog.log, step=prog.step)
                results += r
                skips += s
        fits = scaling(results, cfg.grids) if "scaling" in cfg.suites else []
        qrows, curves = [], None
        if "quality" in cfg.suites:
            qcases = [c for c in cases if c.quality]
            qn = cfg.quality_n
            qrows = quality(
                qcases,
                cfg.temperatures,
                rows=cfg.quality_rows,
                n=qn,
                k=max(qn // 10, 1),
                ref_samples=cfg.ref_samples,
                device=cfg.device,
                seed=cfg.seed,
                log=prog.log,
                step=prog.step,
            )
            curves = mask_curves(qcases, cfg.mask_temperatures, n=40, k=10, device=cfg.device, seed=cfg.seed)
            prog.step("masks")
    finally:
        prog.close()
    meta["total_s"] = time.perf_counter() - t_start
    meta["grids"] = [asdict(g) for g in cfg.grids]  # with the supplementary grid of the scaling fit, if any
    return {
        "meta": meta,
        "notices": notices,
        "cases": [
            {"name": c.name, "source": c.source, "kind": c.kind, "temperature": c.temperature, "note": c.note}
            for c in cases
        ],
        "speed": [asdict(r) for r in results],
        "skipped": [asdict(s) for s in skips],
        "scaling": fits,
        "quality": [asdict(q) for q in qrows],
        "quality_setup": {
            "rows": cfg.quality_rows,
            "n": cfg.quality_n,
            "k": max(cfg.quality_n // 10, 1),
            "ref_samples": cfg.ref_samples,
            "temperatures": cfg.temperatures,
        },
        "masks": curves,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = make_config(args, parser)
    if args.readme:
        if not os.path.isfile(args.readme):
            parser.error(f"--readme {args.readme}: no such file")
        report.check_readme_markers(args.readme)  # fail before a long run, not after
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        default = Path(args.from_json).resolve().parent
    else:
        doc = run(cfg)
        default = None if cfg.quick else default_out()
    out = None if args.no_files else (Path(args.out) if args.out else default)
    # the plots the README links to: those written now, or (--from-json --no-files) those next to the JSON
    plots = out if out is not None else (default if args.from_json else None)
    print()
    print(report.summary_markdown(doc, plots, readme=None))
    if out is not None:
        written = report.write_all(doc, out)
        print(f"# wrote {', '.join(str(p) for p in written)}")
    if args.readme:
        report.write_readme(args.readme, doc, plots)
        print(f"# rewrote {args.readme} between {report.README_START} and {report.README_END}")
    if not args.from_json:
        print(f"# total time {doc['meta']['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
