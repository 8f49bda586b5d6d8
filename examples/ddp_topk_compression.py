"""Top-k gradient compression for DistributedDataParallel: an MLP trained on scikit-learn's digits over several gloo
processes with ``softtopk.distributed.topk_compression_hook``, at compression ratios 1 (plain DDP), 0.1, 0.01 and
0.001.

Each rank trains the same MLP (64-256-256-10, 85,002 parameters) on its own shard of every global batch (64
examples, split by rank), and its gradients are exchanged by the hook (``TopKCompressionState(ratio, model=model)``):
each rank sends the ``⌈ratio · n⌉`` largest-magnitude entries of each parameter's gradient (plus the residual of
earlier steps, error feedback: Stich et al. 2018, "Sparsified SGD with memory"; Lin et al. 2018, "Deep Gradient
Compression") as (value, index) pairs of 8 bytes, against 4 bytes per float32 entry of the dense all-reduce; the
first 2 steps are dense (the hook's warm-up). One more row, 0.01 without error feedback, shows what the residual is
for. Reported per ratio: the final test accuracy, the bytes this rank contributed to the collectives of a step
(``state.sent_bytes``, after the warm-up) and their fraction of the dense all-reduce's, and the time per step.
SGD with momentum 0.9, lr 0.05, the same for every ratio.

Run: ``torchrun --standalone --nproc-per-node 4 -m examples.ddp_topk_compression`` (gloo on CPU, one torch thread
per process; ``--tiny``: seconds, 1 seed; ``--seeds N``; results in docs/examples.md). Without torchrun (no
``RANK`` in the environment) ``python -m examples.ddp_topk_compression [--procs 4]`` and ``main(argv)`` spawn the
processes themselves (``torch.multiprocessing.start_processes`` from a fork server that imports the dependencies
once, or by spawn where there is no fork server; gloo, a ``file://`` rendezvous in a temporary directory, so no port
can clash): the parent parses the arguments, rank 0 trains with a progress bar and hands its results back
through that directory, and the parent prints the table and saves the plot; a rank that fails ends the others and
``main`` raises its traceback. Under torchrun every rank parses the same arguments (only rank 0 shows help or
errors), runs the same collectives, and rank 0 alone prints and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import softtopk.distributed as sd

from . import _common

NAME = "ddp_topk_compression"
PRELOAD = ["softtopk.distributed", "sklearn.datasets", "sklearn.model_selection", "examples._common"]
WIDTHS = (64, 256, 256, 10)
BATCH = 64  # the global batch, split across the ranks
LR, MOMENTUM = 0.05, 0.9
WARMUP = 2  # dense steps before compression (the hook's default)
#: the rows of the table: (name, ratio, error feedback)
CONFIGS = (
    ("1 (plain DDP)", 1.0, True),
    ("0.1", 0.1, True),
    ("0.01", 0.01, True),
    ("0.001", 0.001, True),
    ("0.01, no error feedback", 0.01, False),
)
EARLY = 3  # the epoch of the table's early accuracy
COLUMNS = [
    ("acc", "test accuracy", ".3f"),
    (f"acc@{EARLY}", f"after {EARLY} epochs", ".3f"),
    ("bytes", "bytes sent / rank / step", ",.0f"),
    ("fraction", "fraction of dense", ".4f"),
    ("ms", "ms / step", ".1f"),
]


def parse_args(argv: Sequence[str] | None, *, quiet: bool = False) -> argparse.Namespace:
    """The examples' arguments plus ``--procs``, ``--epochs``; ``quiet`` (ranks ≠ 0 under torchrun) hides help and
    errors, which every rank meets alike since all parse the same argv."""

    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--procs", type=_positive, default=None, help="processes to spawn without torchrun "
                       "(default 4; under torchrun it must equal WORLD_SIZE if given)")  # fmt: skip
        p.add_argument("--epochs", type=_positive, default=None, help="training epochs (default 15; --tiny 3)")

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
            args = _common.parse_args(NAME, __doc__.split("\n\n")[0], argv, extra=extra)
    if args.epochs is None:
        args.epochs = 3 if args.tiny else 15
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Training on every rank
# --------------------------------------------------------------------------------------------------------------
def data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    as_t = torch.tensor
    return as_t(x_tr, dtype=torch.float32), as_t(y_tr), as_t(x_te, dtype=torch.float32), as_t(y_te)


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def train(ratio: float, error_feedback: bool, d, seed: int, epochs: int, bar) -> dict[str, float]:
    """One run on this rank: the same initial weights everywhere (DDP broadcasts rank 0's anyway), the same global
    batches (a generator seeded alike), each rank its slice ``rank::world`` of each."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = d
    torch.manual_seed(seed)
    model = DDP(mlp())
    state = sd.TopKCompressionState(ratio, error_feedback=error_feedback, warmup_steps=WARMUP, model=model)
    model.register_comm_hook(state, sd.topk_compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(seed)
    sent: list[int] = []
    steps, seconds, curve = 0, 0.0, {}
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        for batch in torch.randperm(len(y_tr), generator=gen).split(BATCH):
            mine = batch[rank::world]
            loss = F.cross_entropy(model(x_tr[mine]), y_tr[mine])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps > WARMUP:
                sent.append(state.sent_bytes)
        seconds += time.perf_counter() - start
        with torch.no_grad():  # the same weights on every rank
            curve[f"acc@{epoch}"] = (model.module(x_te).argmax(1) == y_te).float().mean().item()
        if bar is not None:
            bar.update()
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_sent = sum(sent) / len(sent)
    return {"acc": curve[f"acc@{epochs}"], "bytes": mean_sent, "fraction": mean_sent / dense,
            "ms": 1e3 * seconds / steps, "dense": dense, **curve}  # fmt: skip


def run(args: argparse.Namespace) -> _common.Results:
    """Every rank: every seed, every config (the same collectives in the same order on all ranks)."""
    rank = dist.get_rank()
    bar = _common.progress(args.seeds * len(CONFIGS) * args.epochs, "DDP top-k") if rank == 0 else None

    def one_seed(seed: int) -> dict[str, dict[str, float]]:
        d = data(seed)
        rows = {}
        for name, ratio, ef in CONFIGS:
            if bar is not None:
                bar.set_postfix_str(f"ratio {name}, seed {seed}")
            rows[name] = train(ratio, ef, d, seed, args.epochs, bar)
        return rows

    results = _common.run_seeds(args.seeds, one_seed)
    if bar is not None:
        bar.close()
    return results


# --------------------------------------------------------------------------------------------------------------
# Launching: torchrun, or processes spawned here
# --------------------------------------------------------------------------------------------------------------
def _init(**kwargs: Any) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120), **kwargs)


def _spawned(rank: int, world: int, tmp: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    _init(init_method=f"file://{Path(tmp, 'store')}", rank=rank, world_size=world)
    try:
        results = run(args)
        if rank == 0:
            torch.save(results, Path(tmp, "results.pt"))
        # every rank done before any tears its group down: a rank still exiting when its peer had destroyed
        # the group aborted in gloo ("terminate called") in 1 run of 4-15 under torchrun, 0 of 20 with this
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(args: argparse.Namespace) -> _common.Results:
    """``--procs`` ranks, started from a fork server that imported this module's dependencies once (where there is
    one: not on Windows; else by spawn): the ranks are fresh processes (unlike fork: no threads or locks of the
    caller), without each paying the imports. A rank that raises ends the others, and its traceback is raised here."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":  # not this module itself: run as __main__, the ranks re-run it under another name
        mp.get_context(method).set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="softtopk-ddp-") as tmp:
        mp.start_processes(_spawned, args=(args.procs, tmp, args), nprocs=args.procs, start_method=method)
        return torch.load(Path(tmp, "results.pt"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Under torchrun (``RANK`` set): this process is one rank; rank 0 returns the results, the others None.
    Otherwise: spawn ``--procs`` ranks (default 4) and return rank 0's results."""
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        args = parse_args(argv, quiet=rank != 0)
        if args.procs is not None and args.procs != world:
            raise SystemExit(
                f"{NAME}: --procs {args.procs} differs from torchrun's WORLD_SIZE {world}" if rank == 0 else 2
            )
        _init()
        try:
            with _common.Timer(NAME) if rank == 0 else contextlib.nullcontext():
                results = run(args)
                out = report(args, results, world) if rank == 0 else None
            # every rank done before any tears its group down: a rank still exiting when its peer had destroyed
            # the group aborted in gloo ("terminate called") in 1 run of 4-15 under torchrun, 0 of 20 with this
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return out
    args = parse_args(argv)
    args.procs = args.procs or 4
    with _common.Timer(NAME):
        results = _spawn(args)
        return report(args, results, args.procs)


# --------------------------------------------------------------------------------------------------------------
# The table and the plot (rank 0, or the spawning parent)
# --------------------------------------------------------------------------------------------------------------
def report(args: argparse.Namespace, results: _common.Results, world: int) -> dict[str, Any]:
    dense = results[CONFIGS[0][0]]["dense"][0]
    print(f"\n### top-k gradient compression, {world} processes, digits MLP ({int(dense) // 4:,} parameters)\n")
    print(_common.format_table(results, COLUMNS, first="ratio", n_seeds=args.seeds))
    print(f"\n({args.epochs} epochs, global batch {BATCH} ({BATCH // world} per rank), SGD lr {LR} momentum "
          f"{MOMENTUM}; the first {WARMUP} steps dense; bytes: what this rank contributed to the step's collectives, "
          f"dense = {int(dense):,} B; gloo over loopback, {world} processes, {torch.get_num_threads()} torch thread "
          "each)")  # fmt: skip
    if args.plot is not None:
        _plot(results, args.plot, world, args.epochs)
    return {"results": results, "world": world, "dense_bytes": dense, "epochs": args.epochs}


def _plot(results: _common.Results, path, world: int, epochs: int) -> None:
    fig, (ax_acc, ax_bytes, ax_curve) = _common.plt.subplots(1, 3, figsize=(16, 4.2))
    for ef, marker, label in ((True, "o-", "error feedback"), (False, "s", "no error feedback")):
        rows = [(ratio, results[name]) for name, ratio, e in CONFIGS if e == ef]
        ms = [_common.mean_std(m["acc"]) for _, m in rows]
        ratios = [r for r, _ in rows]
        ax_acc.errorbar(ratios, [m for m, _ in ms], yerr=[s for _, s in ms], fmt=marker, capsize=3, label=label)
    rows = [(ratio, results[name]) for name, ratio, ef in CONFIGS if ef]
    ax_bytes.loglog([r for r, _ in rows], [_common.mean(m["bytes"]) for _, m in rows], "o-", label="top-k hook")
    ax_bytes.axhline(_common.mean(results[CONFIGS[0][0]]["dense"]), color="gray", ls="--", label="dense all-reduce")
    for name, metrics in results.items():
        acc = [_common.mean(metrics[f"acc@{e}"]) for e in range(1, epochs + 1)]
        ax_curve.plot(range(1, epochs + 1), acc, "--" if "no error" in name else "-", label=f"ratio {name}")
    ax_acc.set(xscale="log", xlabel="compression ratio (fraction of each gradient sent)", ylabel="final test accuracy",
               title=f"digits MLP, {world} DDP processes (mean ± std over seeds)")  # fmt: skip
    ax_bytes.set(xlabel="compression ratio", ylabel="bytes sent per rank per step",
                 title="communication per step (after the warm-up)")  # fmt: skip
    ax_curve.set(xlabel="epoch", ylabel="test accuracy (mean over seeds)", title="learning curves", ylim=(0.5, 1.0))
    for ax in (ax_acc, ax_bytes, ax_curve):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
