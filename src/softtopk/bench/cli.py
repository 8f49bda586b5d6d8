"""The command line: ``softtopk-bench`` (or ``python -m softtopk.bench``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .cases import EXTRA_TAGS, TAGS
from .plots import write_plots
from .report import render, write_sections
from .run import Config, run

__all__ = ["main"]

EPILOG = """tags: core (the threshold family, batch 32 × n = 1e2..1e6), apps (the shapes applications use), peers
(other libraries and naive implementations), operators (stochastic, permutations, losses), permutahedron (soft
sort/rank), quality (distance to the hard top-k, gradient agreement); distributed (not in the default: the sharded
top-k mask against all-gather-then-mask on 4 gloo processes, n = 1e6 and 1e7; --quick: 2 processes, n = 1e4); gpu (not
in the default; needs --device cuda: the Triton kernels against torch.topk and the torch path). Examples:

  softtopk-bench --quick                        # seconds: small sizes, nothing written
  softtopk-bench --tag apps core                # two tables; JSON and plots in docs/benchmarks/
  softtopk-bench --tag distributed --no-files   # the sharded top-k on 4 processes (minutes)
  softtopk-bench --tag gpu --device cuda --no-files   # the Triton kernels on a GPU
  softtopk-bench --write README.md docs/benchmarks.md       # everything, and every marked section
  softtopk-bench --from-json docs/benchmarks/results.json --write README.md   # the tables again, no measuring
"""


def default_out() -> Path:
    """docs/benchmarks of the source checkout this package lives in, else ./softtopk-bench."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "docs").is_dir():
        return root / "docs" / "benchmarks"
    return Path.cwd() / "softtopk-bench"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softtopk-bench", epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter,
                                description="Speed, memory and quality of softtopk's operators.")  # fmt: skip
    p.add_argument("--tag", nargs="+", choices=TAGS + EXTRA_TAGS + ("gpu",), default=list(TAGS),
                   help="what to measure (default: all but distributed and gpu)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="grid sizes up to 1e3, short budgets, a small quality run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--only", nargs="+", metavar="NAME", help="case names or sources (torch.topk always runs)")
    p.add_argument("--budget", type=float, help="seconds of interleaved rounds per shape (default: 2..10 by size)")
    p.add_argument("--max-call-s", type=float, help="stop a case where one call exceeds this (default 10; quick 1)")
    p.add_argument("--max-mem-gb", type=float, default=6.0, help="stop a case above this predicted peak (GiB)")
    p.add_argument("--out", metavar="DIR", help="where results.json and the plots go (default: docs/benchmarks "
                   "of the checkout; --quick: nowhere)")  # fmt: skip
    p.add_argument("--no-files", action="store_true", help="write no results.json and no plots")
    p.add_argument("--from-json", metavar="PATH", help="measure nothing: the tables (and --write) from a results.json")
    p.add_argument("--write", nargs="+", default=[], metavar="FILE", help="rewrite the <!-- bench:NAME --> sections")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="a progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def config(args: argparse.Namespace, p: argparse.ArgumentParser) -> Config:
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {device}: only cpu and cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available (torch {torch.__version__})")
    if "gpu" in args.tag and device.type != "cuda":
        p.error("--tag gpu: the Triton kernels' benchmark needs --device cuda (and a GPU)")
    quick: dict[str, Any] = dict(temperatures=(0.03, 0.3), quality_rows=4, quality_n=100, ref_samples=4000,
                                 slow_s=0.25, min_rounds=2)  # fmt: skip
    return Config(tags=tuple(args.tag), quick=args.quick, device=device, only=args.only, budget_s=args.budget,
                  max_call_s=args.max_call_s or (1.0 if args.quick else 10.0), max_mem_gb=args.max_mem_gb,
                  seed=args.seed, **(quick if args.quick else {}))  # fmt: skip


class _Progress:
    """A tqdm bar whose log lines go through ``tqdm.write`` (plain prints without tqdm or when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="shape", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)


def measure(cfg: Config, progress: bool | None) -> dict[str, Any]:
    from .run import plan, select_cases

    total = len(plan(cfg, select_cases(cfg, []))) + ("quality" in cfg.tags)
    bar = _Progress(total, sys.stderr.isatty() and not cfg.quick if progress is None else progress)
    try:
        doc = run(cfg, bar.log, bar.step)
    finally:
        if bar.bar is not None:
            bar.bar.close()
    if "distributed" in cfg.tags:  # its own processes, after the rest (see softtopk.bench.distributed)
        from .distributed import DistConfig
        from .distributed import measure as measure_distributed

        doc["distributed"] = measure_distributed(DistConfig.quick() if cfg.quick else DistConfig(), bar.log)
        doc["total_s"] += doc["distributed"]["setup"]["wall_s"]
    if "gpu" in cfg.tags:  # the Triton kernels (see softtopk.bench.gpu)
        from .gpu import GpuConfig
        from .gpu import measure as measure_gpu

        doc["gpu"] = measure_gpu(GpuConfig.quick() if cfg.quick else GpuConfig(), cfg.device, bar.log)
        doc["total_s"] += doc["gpu"]["setup"]["wall_s"]
    return doc


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for path in args.write:  # fail before a long run, not after
        if not Path(path).is_file() or "<!-- bench:" not in Path(path).read_text():
            p.error(f"--write {path}: no such file, or no <!-- bench:NAME --> section in it")
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        out = None if args.no_files else Path(args.out or Path(args.from_json).parent)
    else:
        cfg = config(args, p)
        doc = measure(cfg, args.progress)
        out = None if args.no_files or (cfg.quick and not args.out) else Path(args.out or default_out())
    for name, text in render(doc).items():
        print(f"\n## {name}\n\n{text}")
    if doc.get("gpu"):
        from .gpu import table as gpu_table

        print("\n## gpu\n\n" + "\n".join(gpu_table(doc["gpu"])))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not args.from_json:
            (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        written = ([out / "results.json"] if not args.from_json else []) + write_plots(doc, out)
        print(f"\n# wrote in {out}: " + ", ".join(p.name for p in written))
    for path in args.write:
        for notice in write_sections(path, doc, out or default_out()):
            print(f"# {notice}")
        print(f"# rewrote the sections of {path}")
    if "total_s" in doc and not args.from_json:
        print(f"# total {doc['total_s']:.1f} s")
    return 0

