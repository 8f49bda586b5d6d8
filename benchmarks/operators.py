"""Forward+backward time and peak memory vs n of the operators beyond ``topk_mask``'s threshold family.

Stochastic (perturbed optimizer, Gumbel top-k), threshold routing, the soft permutations of
``topk_permutation`` (Sinkhorn: SOFT's k+1 anchors, and the sorting networks, k = 10), and the top-k losses —
each against ``torch.topk`` forward+backward on the same input, measured interleaved in one process (``_timing``).
Batch 32, float32, k = max(n // 100, 1) unless the case says otherwise. Cases whose cost grows faster than
O(n · k) stop at the size given in ``MAX_N``. The temperatures of the masks are internal ones (the noise sigma of
``perturbed``, the t of sigmoid((s - threshold)/t) of ``threshold_mask``; see ``_temperature``), converted to
softtopk's width convention, so that the operators timed are those of earlier runs.

    python -m benchmarks.operators                    # n in 1e2..1e5, a few minutes on a 2-core CPU
    python -m benchmarks.operators --quick            # n in {1e2, 1e3}
    python -m benchmarks.operators --readme README.md # the table between the OPS-BENCHMARK markers
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

import softtopk

from ._temperature import mask_kwargs, threshold_temperature
from ._timing import interleaved, median, peak_extra_bytes_each
from .core import parse_size
from .report import fmt_n, replace_section

BATCH = 32
SIZES = (10**2, 10**3, 10**4, 10**5)
QUICK = (10**2, 10**3)
README_START, README_END = "<!-- OPS-BENCHMARK:START -->", "<!-- OPS-BENCHMARK:END -->"


def _k(n: int) -> int:
    return max(n // 100, 1)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _mask(case: str, t: float, **kw) -> Callable:
    """``topk_mask`` of the case at internal temperature t (``_temperature.mask_kwargs``)."""
    return lambda x, n: softtopk.topk_mask(x, _k(n), **mask_kwargs(case, t, **kw))


def _perm(method: str, **kw) -> Callable:
    return lambda x, n: softtopk.topk_permutation(x, min(10, n), method=method, **kw)


def _network_available(method: str) -> bool:
    try:
        softtopk.topk_permutation(torch.randn(4), 2, method=method)
    except (ValueError, TypeError):
        return False
    return True


def _losses() -> dict[str, Callable]:
    try:
        from softtopk import losses
    except ImportError:
        return {}
    out = {}
    label = lambda x: torch.arange(x.shape[0]) % x.shape[-1]  # noqa: E731
    if hasattr(losses, "lml_loss"):
        out["LMLLoss (k=5)"] = lambda x, n: losses.lml_loss(x, label(x), 5, temperature=LML_T)
    if hasattr(losses, "topk_cross_entropy"):
        out["TopKCrossEntropyLoss (sinkhorn)"] = lambda x, n: losses.topk_cross_entropy(x, label(x))
    if hasattr(losses, "smooth_topk_hinge_loss"):
        out["SmoothTopKHingeLoss (k=5)"] = lambda x, n: losses.smooth_topk_hinge_loss(x, label(x), 5)
    if hasattr(losses, "cascade_topk_loss"):
        relevant = lambda x, n: torch.arange(_k(n)).expand(x.shape[0], _k(n))  # noqa: E731
        out["CascadeTopKLoss (k=K=n/100)"] = lambda x, n: losses.cascade_topk_loss(
            x, relevant(x, n), temperature=CASCADE_T
        )
    return out


#: the losses' temperatures: the sigmoid masks of lml_loss and cascade_topk_loss at internal t = 1 (their former
#: defaults) in the width convention; the other losses run at their defaults
LML_T = mask_kwargs("sigmoid", 1.0)["temperature"]
CASCADE_T = mask_kwargs("dftopk", 1.0)["temperature"]

#: case name -> f(x, n) returning a tensor (reduced to a scalar with a fixed random weight)
CASES: dict[str, Callable] = {
    "perturbed S=10": _mask("perturbed", 0.5, n_samples=10, generator=_gen()),  # noise sigma 0.5
    "perturbed S=100": _mask("perturbed", 0.5, n_samples=100, generator=_gen()),
    "gumbel_topk softmax (k=10)": lambda x, n: softtopk.gumbel_topk(x, min(10, n), generator=_gen()),
    "gumbel_topk sigmoid": lambda x, n: softtopk.gumbel_topk(x, _k(n), relaxation="sigmoid", generator=_gen()),
    # sigmoid((sigmoid(x) - 0.5) / 0.1)
    "threshold_mask": lambda x, n: softtopk.threshold_mask(x, 0.5, temperature=threshold_temperature(0.1)),
    # softtopk.topk: torch.topk's selection plus the soft weights there, differentiable w.r.t. every score
    "topk sigmoid (weights)": lambda x, n: softtopk.topk(x, _k(n), **mask_kwargs("sigmoid", 1.0)).weights,
    "topk sparse max_support=2k": lambda x, n: (
        softtopk.topk(x, _k(n), method="sparse", temperature=1.0, max_support=2 * _k(n)).weights
    ),
    "topk_permutation sinkhorn (k=10)": _perm("sinkhorn", epsilon=0.1),
    "topk_permutation odd_even (k=10)": _perm("odd_even", temperature=0.1),
    "topk_permutation bitonic (k=10)": _perm("bitonic", temperature=0.1),
}
#: cases that stop at a size (their cost grows faster than the rest)
MAX_N = {
    "perturbed S=100": 10**4,
    "topk_permutation odd_even (k=10)": 10**3,
    "topk_permutation bitonic (k=10)": 10**4,
    "TopKCrossEntropyLoss (sinkhorn)": 10**4,
}


def _size_cases(n: int, cases: dict[str, Callable]):
    """The forward+backward callables at size n (``topk`` first), the reset between runs, and x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, n, generator=gen).requires_grad_()
    k = _k(n)
    gk = torch.randn(BATCH, k, generator=gen)
    fns = {"topk": lambda: torch.topk(x, k).values.backward(gk)}
    for name, f in cases.items():
        if n > MAX_N.get(name, 10**9):
            continue
        with torch.no_grad():
            shape = f(x, n).shape  # a fixed random upstream gradient of the output's shape, made once
        w = torch.randn(shape, generator=gen)
        fns[name] = lambda f=f, w=w: (f(x, n) * w).sum().backward()

    def reset():
        x.grad = None

    return fns, reset, x


def bench(sizes, budget: float) -> list[dict]:
    cases = dict(CASES)
    for m in ("odd_even", "bitonic"):
        if not _network_available(m):
            print(f"# skipped topk_permutation {m}: not available in this softtopk", flush=True)
            cases.pop(f"topk_permutation {m} (k=10)")
    cases.update(_losses())
    rows = []
    for n in sizes:
        fns, reset, x = _size_cases(n, cases)
        t0 = time.perf_counter()
        peaks = peak_extra_bytes_each(fns, reset=reset)
        times = interleaved(fns, 100, 0, budget_s=budget, min_rounds=3, reset=reset)
        print(f"# n={fmt_n(n)}: {len(times['topk'])} rounds, {time.perf_counter() - t0:.1f} s", flush=True)
        base = median(times["topk"])
        for name, ts in times.items():
            rows.append(
                {
                    "n": n,
                    "case": name,
                    "median_ms": median(ts) * 1e3,
                    "ratio": median(ts) / base,
                    "bytes_per_element": peaks[name] / x.numel(),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    sizes = sorted({r["n"] for r in rows})
    at = {(r["case"], r["n"]): r for r in rows}
    out = [
        "| operator | " + " | ".join(f"n={fmt_n(n)}" for n in sizes) + " | bytes/elem (largest n run) |",
        "|:---|" + "---:|" * (len(sizes) + 1),
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = [f"{at[case, n]['ratio']:.1f}x" if (case, n) in at else "—" for n in sizes]
        top = max(n for n in sizes if (case, n) in at)
        out.append(f"| {case} | " + " | ".join(cells) + f" | {at[case, top]['bytes_per_element']:.0f} |")
    base = " · ".join(f"n={fmt_n(n)}: {at['topk', n]['median_ms']:.2f} ms" for n in sizes)
    return "\n".join(out) + f"\n\ntorch.topk forward+backward (k = n/100): {base}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.operators", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=parse_size, nargs="+")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, help="seconds of timed rounds per size (default 20, --quick 1)")
    p.add_argument("--readme", metavar="PATH", help="write the table between the OPS-BENCHMARK markers of PATH")
    args = p.parse_args(argv)
    sizes = args.sizes or (QUICK if args.quick else SIZES)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 20.0)
    t0 = time.perf_counter()
    text = table(bench(sizes, budget))
    print(text)
    print(f"# total time {time.perf_counter() - t0:.1f} s")
    if args.readme:
        note = (
            f"Forward+backward time / `torch.topk` forward+backward, batch {BATCH}, float32, "
            f"{torch.get_num_threads()} threads; peak extra bytes per element of x. "
            "Generated by `python -m benchmarks.operators --readme README.md`.\n\n"
        )
        replace_section(args.readme, note + text, README_START, README_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
