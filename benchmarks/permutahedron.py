"""Benchmarks of the permutahedron operators (soft sort / rank, isotonic solvers) and of SOFT sorted top-k.

Three tables, each measured interleaved (every case once per round, shuffled; median over rounds):

1. ``soft_rank`` and ``soft_sort`` forward+backward (float32, batch 32, temperature 1: the regularisation strength,
   torchsort's ``regularization_strength``; ``descending=False`` so that the values are torchsort's) against
   ``torchsort`` when it is importable, for n in 1e2 … 1e5.
2. ``isotonic``: PAV (exact) against Dykstra run to its tolerance: time, iterations, max error (batch 32, float64,
   y = a decreasing trend plus noise).
3. ``topk_permutation(method="sinkhorn")`` (Sinkhorn to tolerance, implicit backward) against a 200-iteration
   log-domain Sinkhorn differentiated by autograd through every iteration (SOFT's reference implementation),
   n = 1e4, k = 10: forward+backward time and peak extra memory, with the ratios (targets: >= 20x each).

    python -m benchmarks.permutahedron            # a few minutes on a 2-core CPU
    python -m benchmarks.permutahedron --quick    # seconds
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import sys
import time
import warnings
from typing import Callable

import torch

from softtopk import permutahedron as perm
from softtopk.permutations import topk_permutation

from ._timing import interleaved, median, peak_extra_bytes_each
from .report import check_readme_markers, fmt_n, replace_section

BATCH = 32
SORT_SIZES = (10**2, 10**3, 10**4, 10**5)
QUICK_SORT_SIZES = (10**2, 10**3)
TARGET = 20.0
README_START, README_END = "<!-- PERM-BENCHMARK:START -->", "<!-- PERM-BENCHMARK:END -->"


def _torchsort():
    try:
        import torchsort
    except ImportError as e:  # a C++/CUDA extension: often not installable
        return None, f"{type(e).__name__}: {e}"
    return torchsort, None


# --------------------------------------------------------------------------------------------------------------
# 1. soft sort / soft rank vs torchsort
# --------------------------------------------------------------------------------------------------------------
def bench_sort_rank(sizes, budget: float, device: torch.device) -> list[str]:
    torchsort, why = _torchsort()
    lines = []
    if torchsort is None:
        lines.append(f"torchsort not importable ({why}): softtopk timed alone.")
        lines.append("")
    lines += [
        "| n | op | softtopk ms | torchsort ms | softtopk / torchsort | max abs diff |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for n in sizes:
        lines += _sort_rank_one(n, budget, device, torchsort)
        print(f"# sort/rank n={fmt_n(n)} done", flush=True)
    if torchsort is not None:
        lines += ["", _precision_note(max(sizes), device, torchsort)]
    return lines


def _precision_note(n: int, device: torch.device, torchsort) -> str:
    """Where the float32 differences come from: both libraries against float64 soft ranks."""
    x = torch.randn(BATCH, n, generator=torch.Generator().manual_seed(0)).to(device)
    x64 = x.double()
    with torch.no_grad():
        ours64, theirs64 = perm.soft_rank(x64, descending=False), torchsort.soft_rank(x64)
        ours, theirs = perm.soft_rank(x, descending=False), torchsort.soft_rank(x)
    gap64 = float((ours64 - theirs64).abs().max())
    return (
        f"The max abs diff of soft_rank is float32 rounding: at n = {fmt_n(n)} the two libraries agree to {gap64:.1e} "
        f"in float64, and against float64 our float32 ranks are off by {float((ours - ours64).abs().max()):.1e}, "
        f"torchsort's by {float((theirs - theirs64).abs().max()):.1e} (softtopk runs PAV in float64)."
    )


def _sort_rank_one(n: int, budget: float, device: torch.device, torchsort) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, n, generator=gen).to(device).requires_grad_()
    g = torch.randn(BATCH, n, generator=gen).to(device)
    ops: dict[str, tuple[Callable, Callable | None]] = {
        "soft_rank": (
            lambda: perm.soft_rank(x, temperature=1.0, descending=False),
            (lambda: torchsort.soft_rank(x, regularization_strength=1.0)) if torchsort else None,
        ),
        "soft_sort": (
            lambda: perm.soft_sort(x, temperature=1.0, descending=False),
            (lambda: torchsort.soft_sort(x, regularization_strength=1.0)) if torchsort else None,
        ),
    }
    fns = {}
    diffs = {}
    for name, (ours, theirs) in ops.items():
        fns[f"softtopk.{name}"] = lambda f=ours: f().backward(g)
        if theirs is not None:
            fns[f"torchsort.{name}"] = lambda f=theirs: f().backward(g)
            with torch.no_grad():
                diffs[name] = float((ours() - theirs()).abs().max())

    def reset() -> None:
        x.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved(fns, 200, 1, budget_s=budget, min_rounds=3, reset=reset, sync=sync)
    lines = []
    for name in ops:
        ours = median(times[f"softtopk.{name}"]) * 1e3
        if f"torchsort.{name}" in times:
            theirs = median(times[f"torchsort.{name}"]) * 1e3
            lines.append(
                f"| {fmt_n(n)} | {name} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {diffs[name]:.1e} |"
            )
        else:
            lines.append(f"| {fmt_n(n)} | {name} | {ours:.2f} | – | – | – |")
    return lines


# --------------------------------------------------------------------------------------------------------------
# 2. PAV vs Dykstra
# --------------------------------------------------------------------------------------------------------------
def bench_isotonic(sizes, device: torch.device) -> list[str]:
    lines = [
        "| n | p | PAV ms | Dykstra ms | Dykstra iterations | Dykstra max abs error |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for n in sizes:
        gen = torch.Generator().manual_seed(1)
        y = (torch.linspace(3.0, 0.0, n, dtype=torch.float64) + 0.5 * torch.randn(BATCH, n, generator=gen)).to(device)
        for p, mode, name, max_iter in ((2, perm.Q2, "2", 20_000), (4 / 3, perm.Q4, "4/3", 2_000)):
            exact = perm.isotonic(y, p=p)
            times = interleaved({"pav": lambda p=p, y=y: perm.isotonic(y, p=p)}, 20, 1, budget_s=1.0, min_rounds=3)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v, iters = perm._dykstra(y, None, None, None, mode, 1e-10, max_iter)
            dt = time.perf_counter() - t0
            its = str(iters) if iters else f"not converged in {max_iter}"
            err = float((v - exact).abs().max())
            lines.append(
                f"| {fmt_n(n)} | {name} | {median(times['pav']) * 1e3:.2f} | {dt * 1e3:.0f} | {its} | {err:.1e} |"
            )
        print(f"# isotonic n={fmt_n(n)} done", flush=True)
    return lines


# --------------------------------------------------------------------------------------------------------------
# 3. topk_permutation vs unrolled Sinkhorn
# --------------------------------------------------------------------------------------------------------------
def unrolled_sinkhorn_topk(x: torch.Tensor, k: int, eps: float, iters: int = 200) -> torch.Tensor:
    """SOFT sorted top-k as in the paper's code: log-domain Sinkhorn, ``iters`` iterations, all recorded by
    autograd. Same anchors, masses and per-row cost normalisation as ``topk_permutation(method="sinkhorn")``."""
    n = x.shape[-1]
    anchors = k - torch.arange(k + 1, dtype=x.dtype, device=x.device)
    cost = (x.unsqueeze(-2) - anchors.view(1, k + 1, 1)) ** 2
    cost = cost / cost.amax(dim=(-2, -1), keepdim=True)
    log_nu = torch.full((k + 1,), -math.log(n), dtype=x.dtype, device=x.device)
    log_nu[k] = math.log((n - k) / n)
    log_nu = log_nu.view(1, k + 1, 1)
    f = torch.zeros(x.shape[0], 1, n, dtype=x.dtype, device=x.device)
    g = torch.zeros(x.shape[0], k + 1, 1, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        f = -eps * math.log(n) - eps * torch.logsumexp((g - cost) / eps, dim=-2, keepdim=True)
        g = eps * log_nu - eps * torch.logsumexp((f - cost) / eps, dim=-1, keepdim=True)
    return torch.exp((f + g - cost) / eps)[:, :k] * n


def bench_permutation(batch: int, n: int, k: int, temps, budget: float, device: torch.device) -> tuple[list[str], bool]:
    lines = [
        "| ε | topk_permutation ms | unrolled-200 ms | time ratio | topk_permutation peak MB | unrolled peak MB "
        "| memory ratio | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ok = True
    for eps in temps:
        line, good = _permutation_one(batch, n, k, eps, budget, device)
        lines.append(line)
        ok &= good
        print(f"# permutation eps={eps:g} done", flush=True)
    return lines, ok


def _permutation_one(batch: int, n: int, k: int, eps: float, budget: float, device: torch.device) -> tuple[str, bool]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, n, generator=gen).to(device).requires_grad_()
    up = torch.randn(batch, k, n, generator=gen).to(device)
    fns = {
        "implicit": lambda: (topk_permutation(x, k, method="sinkhorn", epsilon=eps) * up).sum().backward(),
        "unrolled": lambda: (unrolled_sinkhorn_topk(x, k, eps) * up).sum().backward(),
    }

    def reset() -> None:
        x.grad = None

    with torch.no_grad():
        ours = topk_permutation(x, k, method="sinkhorn", epsilon=eps)
        diff = float((ours - unrolled_sinkhorn_topk(x, k, eps)).abs().max())
    peaks = peak_extra_bytes_each(fns, device, reset=reset)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved(fns, 50, 1, budget_s=budget, min_rounds=3, reset=reset, sync=sync)
    ti, tu = median(times["implicit"]) * 1e3, median(times["unrolled"]) * 1e3
    mi, mu = peaks["implicit"] / 2**20, peaks["unrolled"] / 2**20
    good = tu / ti >= TARGET and mu / mi >= TARGET
    line = f"| {eps:g} | {ti:.1f} | {tu:.1f} | {tu / ti:.1f}x | {mi:.1f} | {mu:.1f} | {mu / mi:.1f}x | {diff:.1e} |"
    return line, good


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.permutahedron", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and short budgets")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--perm-batch", type=int, default=8, help="batch of the topk_permutation comparison (default 8)")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    p.add_argument(
        "--readme", metavar="PATH", help=f"rewrite PATH between {README_START} and {README_END} with the tables"
    )
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.readme:
        check_readme_markers(args.readme, README_START, README_END)
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    header = [
        f"# torch {torch.__version__}, device {device}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        f", PAV backend: {perm.pav_backend(device)}; 1-min load average at start {load:.2f}",
    ]
    print("\n".join(header), flush=True)
    sizes = QUICK_SORT_SIZES if args.quick else SORT_SIZES
    budget = 1.0 if args.quick else 8.0
    out = header + ["", "## soft_rank / soft_sort forward+backward, batch 32, float32, temperature 1", ""]
    out += bench_sort_rank(sizes, budget, device)
    out += ["", "## isotonic: PAV vs Dykstra (tol 1e-10), batch 32, float64", ""]
    out += bench_isotonic((10**2,) if args.quick else (10**2, 10**3), device)
    n = 10**3 if args.quick else 10**4
    temps = (0.1,) if args.quick else (0.1, 0.01)
    out += [
        "",
        f"## topk_permutation(sinkhorn) vs unrolled 200-iteration autograd Sinkhorn, batch {args.perm_batch}, "
        f"n = {fmt_n(n)}, k = 10, float32, forward+backward",
        "",
    ]
    lines, ok = bench_permutation(args.perm_batch, n, 10, temps, 2.0 if args.quick else 10.0, device)
    out += lines
    out += ["", f"target >= {TARGET:g}x in time and memory: {'PASS' if ok else 'MISS'}"]
    out += [f"# total time {time.perf_counter() - t0:.1f} s"]
    text = "\n".join(out)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.readme:
        replace_section(args.readme, readme_body(out), README_START, README_END)
    return 0


def readme_body(out: list[str]) -> str:
    """The README section: this run's tables, the ``## `` headings as ``#### `` ones."""
    try:
        ts = f", torchsort {importlib.metadata.version('torchsort')} built from source for the comparison"
    except importlib.metadata.PackageNotFoundError:
        ts = ", torchsort not installed"
    lines = [
        f"Measured by `python -m benchmarks.permutahedron --readme README.md` ({os.cpu_count()}-core CPU, torch "
        f"{torch.__version__.split('+')[0]}, PAV backend {perm.pav_backend('cpu')}{ts}):",
    ]
    for line in out[1:]:
        lines.append("#### " + line[3:] if line.startswith("## ") else line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
