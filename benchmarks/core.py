"""Forward+backward time and peak memory of every ``softtopk`` method, against ``torch.topk``.

For each size n: ``x = torch.randn(32, n)`` (float32, seeded, ``requires_grad``), ``k = n // 100``,
internal temperature 1: each family's own t (sigmoid((x - tau)/t), the Laplace scale, clip((x - tau)/t), SOFT's
epsilon), passed as ``temperature`` = t / factor in softtopk's width convention (``_temperature``), the operators
of earlier runs. Each case runs ``topk_mask(x, k, method=m, ...).backward(g)`` with a fixed random upstream gradient
``g`` (made once, outside the timed region: the gradient of ``.sum()`` would be zero for the normalised
methods, and an implementation may shortcut it). The baseline ``topk`` is ``torch.topk(x, k).values``
backward with a random ``(32, k)`` upstream gradient.

Timing is interleaved (every case once per round, shuffled order) and the median over rounds is reported,
with the ratio to the baseline's median. Rounds run until a per-size time budget is spent (at least
``--min-rounds``), so small n get many rounds and n = 1e6 a few. Memory is the peak extra memory of one
forward+backward beyond ``x`` and ``g``, per element of ``x``.

    python -m benchmarks.core                 # n in 1e3..1e6, a few minutes on a 2-core CPU
    python -m benchmarks.core --quick         # n in {1e3, 1e4}, seconds
    python -m benchmarks.core --sizes 1e5 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import softtopk

from ._temperature import mask_kwargs
from ._timing import Fn, check_peak_extra_bytes, interleaved, median, peak_extra_bytes_each
from .report import fmt_n, replace_section

BATCH = 32
DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6)
QUICK_SIZES = (10**3, 10**4)
BASELINE = "topk"
#: the internal temperature of every case (``_temperature``: temperature = T / factor in softtopk's convention)
T = 1.0
#: case name -> keyword arguments of ``topk_mask`` (besides x and k); "straight_through" is
#: method="sigmoid", straight_through=True, "soft" is method="soft", epsilon=T, "hard" takes no temperature
CASES: dict[str, dict[str, Any]] = {
    # the threshold family; "perturbed" (n_samples hard top-k's a call) is measured by `python -m benchmarks`
    **{m: mask_kwargs(m, T) for m in ("hard", "straight_through", "dftopk", "sigmoid", "soft", "sparse", "lapsum")},
    "sparse(p=4/3)": mask_kwargs("sparse", T, p=4 / 3),
}
#: targets on the ratio to the baseline at n = TARGET_N (shown, not asserted)
TARGET_N = 10**5
TARGETS = {"dftopk": 1.3, "sigmoid": 2.0, "sparse": 2.0, "lapsum": 2.0}


@dataclass
class Result:
    """One (n, case) measurement."""

    n: int
    k: int
    case: str
    median_ms: float
    ratio: float  # median / median of the baseline at the same n
    peak_extra_bytes: int
    bytes_per_element: float  # peak_extra_bytes / x.numel()
    rounds: int
    times_ms: list[float]


def make_cases(n: int, device: torch.device, seed: int = 0) -> tuple[dict[str, Fn], Fn, torch.Tensor]:
    """The forward+backward callables at size n (baseline first), the reset to call between runs, and x."""
    gen = torch.Generator().manual_seed(seed)
    k = n // 100
    x = torch.randn(BATCH, n, generator=gen).to(device).requires_grad_()
    g = torch.randn(BATCH, n, generator=gen).to(device)  # upstream gradient of the (32, n) masks
    gk = torch.randn(BATCH, k, generator=gen).to(device)  # upstream gradient of topk's (32, k) values

    def baseline() -> None:
        torch.topk(x, k).values.backward(gk)

    def case(kwargs: dict[str, Any]) -> Fn:
        def run() -> None:
            softtopk.topk_mask(x, k, **kwargs).backward(g)

        return run

    def reset() -> None:
        x.grad = None

    fns = {BASELINE: baseline, **{name: case(kw) for name, kw in CASES.items()}}
    return fns, reset, x


def bench_size(
    n: int, device: torch.device, *, budget_s: float, warmup: int, min_rounds: int, max_rounds: int
) -> list[Result]:
    """Peak memory of each case (one run each, which is also a first warm-up), then the interleaved timing."""
    fns, reset, x = make_cases(n, device)
    t0 = time.perf_counter()
    peaks = peak_extra_bytes_each(fns, device, reset=reset)
    t1 = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved(fns, max_rounds, warmup, budget_s=budget_s, min_rounds=min_rounds, reset=reset, sync=sync)
    reset()
    rounds = len(times[BASELINE])
    print(
        f"# n={fmt_n(n)}: memory pass {t1 - t0:.1f} s, {warmup} warm-up + {rounds} timed rounds"
        f" {time.perf_counter() - t1:.1f} s",
        flush=True,
    )
    base = median(times[BASELINE])
    return [
        Result(
            n=n,
            k=n // 100,
            case=name,
            median_ms=median(ts) * 1e3,
            ratio=median(ts) / base,
            peak_extra_bytes=peaks[name],
            bytes_per_element=peaks[name] / x.numel(),
            rounds=len(ts),
            times_ms=[t * 1e3 for t in ts],
        )
        for name, ts in times.items()
    ]


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table."""
    rows = [
        "| n | method | median ms | ratio vs topk | peak extra bytes/element |",
        "|---:|:---|---:|---:|---:|",
    ]
    for r in results:
        rows.append(f"| {fmt_n(r.n)} | {r.case} | {r.median_ms:.3f} | {r.ratio:.2f} | {r.bytes_per_element:.1f} |")
    return "\n".join(rows)


def wide_table(results: list[Result]) -> str:
    """One row per method: the ratio to torch.topk at each n, then the peak extra bytes/element at the largest n."""
    sizes = sorted({r.n for r in results})
    cases = list(dict.fromkeys(r.case for r in results))
    at = {(r.case, r.n): r for r in results}
    top = sizes[-1]
    rows = [
        "| method | " + " | ".join(f"n={fmt_n(n)}" for n in sizes) + f" | bytes/elem (n={fmt_n(top)}) |",
        "|:---|" + "---:|" * (len(sizes) + 1),
    ]
    for case in cases:
        cells = [f"{at[case, n].ratio:.2f}x" if (case, n) in at else "" for n in sizes]
        mem = f"{at[case, top].bytes_per_element:.1f}" if (case, top) in at else ""
        rows.append(f"| {case} | " + " | ".join(cells) + f" | {mem} |")
    base = " · ".join(f"n={fmt_n(n)}: {at[BASELINE, n].median_ms:.2f} ms" for n in sizes if (BASELINE, n) in at)
    return "\n".join(rows) + f"\n\ntorch.topk forward+backward: {base}"


def write_plot(path: str, results: list[Result], title: str) -> None:
    """Ratio to torch.topk against n, one line per method (log-log), saved to ``path`` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    sizes = sorted({r.n for r in results})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for case in dict.fromkeys(r.case for r in results):
        pts = sorted((r.n, r.ratio) for r in results if r.case == case)
        style = {"color": "black", "linestyle": "--"} if case == BASELINE else {"marker": "o"}
        ax.plot([n for n, _ in pts], [v for _, v in pts], label=case, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [fmt_n(n) for n in sizes])
    ax.set_xlabel("n (batch 32, k = n/100, float32)")
    ax.set_ylabel("forward+backward time / torch.topk")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START, README_END = "<!-- BENCHMARK:START -->", "<!-- BENCHMARK:END -->"


def write_readme(
    path: str, header: list[str], results: list[Result], footer: list[str], plot: str | None = None
) -> None:
    """Replace the text between the benchmark markers of the README with this run's table (and plot)."""
    body = [
        "Forward+backward time as a ratio to `torch.topk(x, k).values` forward+backward, measured interleaved in",
        "one process (median of rounds), batch 32, k = n/100, float32, internal temperature 1 (each family's own t:",
        "`temperature` = t / factor in the width convention), random upstream gradient;",
        "peak extra memory in bytes per element of x. Generated by",
        "`python -m benchmarks.core --readme README.md --readme docs/benchmarks.md`:",
        "",
        "```",
        *[line.lstrip("# ") for line in header[:2]],
        "```",
        "",
        wide_table(results),
        "",
        "```",
        *footer,
        "```",
    ]
    if plot:
        rel = os.path.relpath(plot, os.path.dirname(os.path.abspath(path)))
        body += ["", f"![forward+backward time relative to torch.topk]({rel})"]
    replace_section(path, "\n".join(body), README_START, README_END)


def check_targets(results: list[Result]) -> list[dict[str, Any]]:
    """Each target with the measured ratio at ``TARGET_N`` (``None`` when that size was not run)."""
    at = {r.case: r.ratio for r in results if r.n == TARGET_N}
    out = []
    for case, limit in TARGETS.items():
        ratio = at.get(case)
        status = "n/a" if ratio is None else ("PASS" if ratio <= limit else "MISS")
        out.append({"case": case, "n": TARGET_N, "max_ratio": limit, "ratio": ratio, "status": status})
    return out


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """One line per target."""
    lines = []
    for t in targets:
        got = f"{t['ratio']:.2f}x" if t["ratio"] is not None else f"not measured (n={fmt_n(t['n'])} not run)"
        lines.append(f"target {t['case']:>8} <= {t['max_ratio']:.1f}x at n={fmt_n(t['n'])}: {got}  {t['status']}")
    return lines


def machine_note(device: torch.device) -> str:
    """A short description of the machine, e.g. ``2-core CPU``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU"


def parse_size(s: str, minimum: int = 100) -> int:
    """``1e5`` or ``100000`` -> 100000; at least ``minimum`` (100 by default, so that k = n // 100 >= 1)."""
    try:
        n = int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"size must be >= {minimum}, got {s}")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=parse_size, nargs="+", help="sizes n (default 1e3 1e4 1e5 1e6)")
    p.add_argument("--quick", action="store_true", help="n in {1e3, 1e4} and a short time budget")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--budget", type=float, help="seconds of timed rounds per size (default 30, --quick 1.5)")
    p.add_argument("--min-rounds", type=int, default=3, help="fewest timed rounds per size (default 3)")
    p.add_argument("--max-rounds", type=int, default=200, help="most timed rounds per size (default 200)")
    p.add_argument("--warmup", type=int, help="untimed rounds per size after the memory pass (default 1, --quick 0)")
    p.add_argument("--json", metavar="PATH", help="write all results and metadata as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument(
        "--readme",
        metavar="PATH",
        action="append",
        help="write the table into PATH between the benchmark markers (repeatable: README.md and docs/benchmarks.md)",
    )
    p.add_argument("--plot", metavar="PATH", help="save the ratios against n as an image (needs matplotlib)")
    args = p.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.budget is None:
        args.budget = 1.5 if args.quick else 30.0
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available (torch {torch.__version__}); use --device cpu")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device: torch.device = args.device
    t_start = time.perf_counter()
    meta = {
        "softtopk": softtopk.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "machine": machine_note(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "batch": BATCH,
        "k": "n // 100",
        "dtype": "float32",
        "temperature": T,
        "temperature_convention": "internal (each family's own t; topk_mask temperature = t / factor)",
        "budget_s": args.budget,
        "warmup": args.warmup,
        "min_rounds": args.min_rounds,
        "max_rounds": args.max_rounds,
    }
    probe = check_peak_extra_bytes(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    meta["load_average_1min"] = load
    header = [
        f"# softtopk {meta['softtopk']} forward+backward vs torch.topk -- {meta['date']}",
        f"# torch {meta['torch']}, device {device} ({meta['machine']}), torch threads: {meta['threads']}",
        f"# batch {BATCH}, k = n/100, float32, internal temperature {T:g}; median of interleaved rounds, "
        + f"{args.budget:g} s budget per size",
        f"# 1-min load average at start: {load:.2f}"
        + (" (high: timings may be noisy)" if load > 0.5 * (os.cpu_count() or 1) else ""),
        f"# memory probe: torch.empty(1024) float32 measured as {probe} bytes (ok)",
    ]
    print("\n".join(header), flush=True)

    results: list[Result] = []
    for n in args.sizes:
        results += bench_size(
            n,
            device,
            budget_s=args.budget,
            warmup=args.warmup,
            min_rounds=args.min_rounds,
            max_rounds=args.max_rounds,
        )

    table = markdown_table(results)
    targets = check_targets(results)
    elapsed = time.perf_counter() - t_start
    footer = target_lines(targets) + [f"# total time {elapsed:.1f} s"]
    print()
    print(table)
    print()
    print("\n".join(footer))

    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(header) + "\n\n" + table + "\n\n" + "\n".join(footer) + "\n")
    if args.plot:
        write_plot(args.plot, results, f"softtopk {meta['softtopk']}, torch {meta['torch']}, {meta['machine']}")
    for path in args.readme or ():
        write_readme(path, header, results, footer, args.plot)
    if args.json:
        meta["total_s"] = elapsed
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in results], "targets": targets}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
