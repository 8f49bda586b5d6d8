"""What the examples share: their arguments (``--tiny``, ``--seeds``, ``--plot``), the loop over seeds, a tqdm
progress bar, the mean ± std results table (printed as Markdown, ready for docs/examples.md) and saving the plot."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLOT_DIR = ROOT / "docs" / "examples"

#: results[config][metric] -> one value per seed
Results = dict[str, dict[str, list[float]]]


def parse_args(
    name: str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The arguments every example takes; ``extra`` adds an example's own.

    ``--tiny`` is the seconds-long run of the tests (one seed, no plot unless ``--plot`` is given); the default run
    averages 3 seeds and saves its plot to docs/examples/NAME.png.
    """
    parser = argparse.ArgumentParser(prog=f"python -m examples.{name}", description=description)
    parser.add_argument("--tiny", action="store_true", help="a run of seconds (the tests'): 1 seed, smaller data")
    parser.add_argument("--seeds", type=int, default=None, help="seeds averaged (default 3; 1 with --tiny)")
    parser.add_argument(
        "--plot", type=Path, default=None, help=f"where to save the plot (default docs/examples/{name}.png; "
        "--tiny saves none unless given)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the models are small, and on a shared "
        "machine one thread is faster than two that wait for each other)",
    )  # fmt: skip
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.seeds is None:
        args.seeds = 1 if args.tiny else 3
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.plot is None and not args.tiny:
        args.plot = PLOT_DIR / f"{name}.png"
    return args


def set_threads(n: int) -> None:
    """torch's thread count (softtopk's numba kernels run on the same count)."""
    torch.set_num_threads(n)


def progress(total: int, desc: str, unit: str = "epoch") -> tqdm:
    """One progress bar for all the training loops of a run (``bar.set_postfix_str`` names the current one)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=0.5)


def run_seeds(n_seeds: int, run: Callable[[int], dict[str, dict[str, float]]]) -> Results:
    """``run(seed)`` for seed = 0 … n_seeds − 1 (after ``torch.manual_seed(seed)``), each returning
    {config: {metric: value}}; collected into {config: {metric: [value per seed]}} in the configs' first order."""
    results: Results = {}
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        for config, metrics in run(seed).items():
            row = results.setdefault(config, {})
            for metric, value in metrics.items():
                row.setdefault(metric, []).append(float(value))
    return results


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_table(
    results: Results, columns: Sequence[tuple[str, str, str]], *, first: str = "", n_seeds: int | None = None
) -> str:
    """A Markdown table, one row per config, one column per (metric, header, format) as "mean ± std" over seeds
    (the mean alone for one seed); a missing metric shows as "—"."""
    lines = [f"| {first} | " + " | ".join(h for _, h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for config, metrics in results.items():
        cells = []
        for key, _, fmt in columns:
            if key not in metrics:
                cells.append("—")
                continue
            m, s = mean_std(metrics[key])
            cells.append(format(m, fmt) + (f" ± {format(s, fmt)}" if len(metrics[key]) > 1 else ""))
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    if n_seeds is not None:
        lines.append(f"\n(mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    return "\n".join(lines)


def save_figure(fig: plt.Figure, path: Path | None) -> None:
    """Save (when a path is given) and close the figure."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        print(f"plot saved to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    plt.close(fig)


class Timer:
    """Wall time of the whole run, printed at the end: ``with Timer("name"): ...``."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        print(f"\n{self.name}: {self.seconds:.0f} s wall time ({torch.get_num_threads()} torch threads)")
