"""Candidate selection over a catalogue sharded across processes: a query tower trained with a soft top-k loss over
the whole catalogue, with ``softtopk.distributed.topk_mask``, against all-gather-then-``softtopk.topk_mask``.

Each rank holds the embeddings of its shard of the catalogue (default 10 million items of dimension 16 in total,
float32: 160 MB per rank at 4 ranks) and the same small query tower (an MLP, its gradients all-reduced as DDP
would). A query's relevant items are the top 10 of the catalogue under a hidden "teacher" tower (found with
``softtopk.distributed.topk``, which exchanges each rank's local top 10 only). The student's scores are
``query · items`` on each shard; the loss is ``-mean log y`` at the relevant items, y the soft top-k mask (k = 100,
sigmoid) of the scores over the **whole** catalogue: each rank computes its shard of y, exchanging a few scalars
per row per Newton step. The naive baseline all-gathers the full score rows and lets every rank compute the mask.

Per step the script prints the loss, and for both ways the time of forward + backward and the bytes this rank
sent (collective payloads this rank contributed, as ``softtopk.distributed.traffic`` counts them: an all-gather or
all-reduce of b bytes counts b), and the largest difference between the two ways' parameter gradients. Before
training it checks at a smaller catalogue (1e5 items) that the sharded mask, loss and gradients equal the
single-process computation on the concatenated catalogue (float32: the mask to 1e-5 absolute, the loss to 1e-5
relative, the tower's gradients to 1e-4 of their largest entry).

Run: ``torchrun --standalone --nproc-per-node 4 -m examples.distributed_retrieval`` (gloo, CPU, one torch thread
per process; ``--tiny``: 2e4 items, 3 steps, seconds). Without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

import softtopk
import softtopk.distributed as sd

FEATURES = 32  # a query's raw features
RELEVANT = 10  # relevant items per query: the teacher's top 10
CHECK_ITEMS = 100_000
CHECK_TOL = 1e-5  # the mask's max abs difference, and the loss's relative one (float32)
CHECK_SOLVER_TOL = 1e-6  # the check's solver tolerance (relative to k), for both ways: float32 reaches it
GRAD_TOL = 1e-4  # the gradients' relative to their largest entry: float32 sums over 1e5 items in another order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node 4 -m examples.distributed_retrieval",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="seconds (the test's): 2e4 items, 3 steps, check at 1e4")
    p.add_argument("--items", type=int, default=None, help="catalogue size, all ranks together (default 1e7)")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension (default 16)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 16; --tiny 3)")
    p.add_argument("--queries", type=int, default=2, help="queries per step (default 2)")
    p.add_argument("--k", type=int, default=100, help="the top-k of the loss (default 100)")
    p.add_argument("--temperature", type=float, default=0.05, help="of the sigmoid mask, in score (cosine) units")
    p.add_argument("--tol", type=float, default=None, help="the threshold solver's tolerance (default: softtopk's)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = p.parse_args(argv)
    args.items = args.items or (20_000 if args.tiny else 10_000_000)
    args.steps = args.steps or (3 if args.tiny else 16)
    args.check_items = 10_000 if args.tiny else CHECK_ITEMS
    for name in ("items", "dim", "steps", "queries", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------------------------------------------
# The catalogue, the towers, the two ways of computing the loss
# --------------------------------------------------------------------------------------------------------------
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's shard: n split as evenly as possible, the first ranks one longer."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def catalogue_shard(n: int, dim: int, rank: int, world: int, seed: int) -> Tensor:
    """This rank's item embeddings (n_r, dim), unit norm; the full catalogue never exists in one process."""
    start, stop = shard_range(n, rank, world)
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    items = torch.randn(stop - start, dim, generator=gen)
    return items.div_(items.norm(dim=-1, keepdim=True))  # in place: one copy of the shard in memory


class Normalize(nn.Module):
    """Unit-norm query embeddings: the scores are cosines, in [-1, 1], so that the temperature keeps its meaning."""

    def forward(self, q: Tensor) -> Tensor:
        return q / q.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def tower(dim: int, seed: int) -> nn.Module:
    """The query tower: the same initial weights on every rank (same seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, dim), Normalize())


def relevant_items(teacher: nn.Module, feats: Tensor, items: Tensor) -> Tensor:
    """The global indices (B, RELEVANT) of each query's relevant items: the teacher's top RELEVANT over all shards."""
    with torch.no_grad():
        return sd.topk(teacher(feats) @ items.T, RELEVANT, method="hard").indices


def relevant_mask(rel: Tensor, start: int, stop: int) -> Tensor:
    """(B, n_r) booleans: which of this shard's items are relevant to each query."""
    mask = torch.zeros(rel.shape[0], stop - start, dtype=torch.bool)
    own = (rel >= start) & (rel < stop)
    rows = torch.arange(rel.shape[0]).unsqueeze(1).expand_as(rel)
    mask[rows[own], rel[own] - start] = True
    return mask


def nll(y: Tensor, mask: Tensor, count: int) -> Tensor:
    """-Σ log y over the relevant entries, divided by their total number over all shards."""
    return -torch.log(y[mask].clamp(min=1e-12)).sum() / count


def sharded_step(model: nn.Module, feats: Tensor, items: Tensor, rel: Tensor, span: tuple[int, int], args):
    """This rank's part of the loss (the global loss is the sum over ranks) with the sharded mask, backward;
    returns (this rank's loss, this shard's y)."""
    scores = model(feats) @ items.T
    y = sd.topk_mask(scores, args.k, method="sigmoid", temperature=args.temperature, tol=args.tol)
    loss = nll(y, relevant_mask(rel, *span), rel.numel())
    loss.backward()
    return loss.detach(), y.detach()


def allgather_step(model: nn.Module, feats: Tensor, items: Tensor, rel: Tensor, span: tuple[int, int], args):
    """The naive way: all-gather the score rows, every rank computes the mask and the full loss (replicated), and
    backpropagates the gradient of its own slice of the scores. Returns (the full loss divided by the number of
    ranks, so that the sum over ranks is the loss as in `sharded_step`; this shard's y; bytes sent)."""
    world = dist.get_world_size()
    scores = model(feats) @ items.T
    spans = [shard_range(args.items, r, world) for r in range(world)]
    width = max(b - a for a, b in spans)
    own = torch.cat([scores.detach(), scores.new_full((scores.shape[0], width - scores.shape[1]), -math.inf)], -1)
    parts = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(parts, own)
    full = torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, spans)], -1).requires_grad_()
    del parts
    y = softtopk.topk_mask(full, args.k, method="sigmoid", temperature=args.temperature, tol=args.tol)
    loss = -torch.log(y.gather(-1, rel).clamp(min=1e-12)).sum() / rel.numel()  # as `nll` on the full row
    loss.backward()
    scores.backward(full.grad[:, span[0] : span[1]])
    return loss.detach() / world, y.detach()[:, span[0] : span[1]], own.numel() * own.element_size()


def all_reduce_grads(model: nn.Module) -> int:
    """Sum the ranks' parameter gradients (the global loss is the sum of the ranks' losses); bytes sent."""
    flat = grads(model)
    dist.all_reduce(flat)
    set_grads(model, flat)
    return flat.numel() * flat.element_size()


def grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def set_grads(model: nn.Module, flat: Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def peak_rss_gb() -> float:
    """The largest peak resident memory of the ranks' processes so far, GB (Linux: ru_maxrss in kB)."""
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def timed(fn: Callable[..., Any], *fn_args: Any) -> tuple[float, Any]:
    """Seconds from a barrier to a barrier (the slowest rank's finish), and ``fn(*fn_args)``."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn(*fn_args)
    dist.barrier()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------------------------
# The check against one process, the training, the launch
# --------------------------------------------------------------------------------------------------------------
def check_single_process(args, rank: int, world: int) -> dict[str, float]:
    """At ``args.check_items`` items: the sharded mask, loss and gradients against ``softtopk.topk_mask`` on the
    concatenated catalogue in one process (every rank builds the small full catalogue and compares its shard)."""
    n = args.check_items
    full = torch.cat([catalogue_shard(n, args.dim, r, world, args.seed + 1) for r in range(world)])
    span = shard_range(n, rank, world)
    model, teacher = tower(args.dim, args.seed), tower(args.dim, args.seed + 7)
    feats = torch.randn(args.queries, FEATURES, generator=torch.Generator().manual_seed(args.seed + 3))
    with torch.no_grad():
        rel = torch.topk(teacher(feats) @ full.T, RELEVANT).indices
    # both solved to the same tight tolerance: the float32 default (1e-5 · k on Σy) alone moves y by ~1e-5
    y_ref = softtopk.topk_mask(model(feats) @ full.T, args.k, method="sigmoid", temperature=args.temperature,
                               tol=CHECK_SOLVER_TOL)  # fmt: skip
    loss_ref = nll(y_ref, relevant_mask(rel, 0, n), rel.numel())
    loss_ref.backward()
    loss_ref, g_ref = loss_ref.detach(), grads(model)
    model.zero_grad()
    small = argparse.Namespace(**{**vars(args), "items": n, "tol": CHECK_SOLVER_TOL})
    loss, y = sharded_step(model, feats, full[span[0] : span[1]], rel, span, small)
    all_reduce_grads(model)
    dist.all_reduce(loss)
    diffs = torch.tensor([float((y - y_ref.detach()[:, span[0] : span[1]]).abs().max()) if y.numel() else 0.0,
                          float((loss - loss_ref).abs()), float((grads(model) - g_ref).abs().max()),
                          float(g_ref.abs().max())], dtype=torch.float64)  # fmt: skip
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    return {"items": n, "mask": float(diffs[0]), "loss": float(diffs[1]), "grad": float(diffs[2]),
            "grad_scale": float(diffs[3]), "loss_value": float(loss_ref)}  # fmt: skip


def alignment(model: nn.Module, teacher: nn.Module, feats: Tensor) -> float:
    """Mean cosine between the student's and the teacher's query embeddings (both unit norm): 1 = the same ranking."""
    with torch.no_grad():
        return float((model(feats) * teacher(feats)).sum(-1).mean())


def recall(model: nn.Module, feats: Tensor, items: Tensor, rel: Tensor, k: int, chunk: int) -> float:
    """Fraction of the relevant items in the hard top-k of the student's scores over the whole catalogue (``chunk``
    queries at a time: a (queries, shard) score matrix is the largest tensor of a step)."""
    with torch.no_grad():
        top = torch.cat([sd.topk(model(f) @ items.T, k, method="hard").indices for f in feats.split(chunk)])
    return float((top.unsqueeze(-1) == rel.unsqueeze(-2)).any(-2).float().mean())


def train(args, rank: int, world: int, say: Callable[[str], None]) -> dict[str, Any]:
    span = shard_range(args.items, rank, world)
    items = catalogue_shard(args.items, args.dim, rank, world, args.seed)
    model, teacher = tower(args.dim, args.seed), tower(args.dim, args.seed + 7)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 5)  # the same queries on every rank
    test_feats = torch.randn(16, FEATURES, generator=gen)
    test_rel = torch.cat([relevant_items(teacher, f, items) for f in test_feats.split(args.queries)])
    before = recall(model, test_feats, items, test_rel, args.k, args.queries), alignment(model, teacher, test_feats)
    say(f"16 test queries before training: recall@{args.k} of their {RELEVANT} relevant items {before[0]:.3f}, "
        f"cosine to the teacher's query {before[1]:.3f}\n")  # fmt: skip
    say("| step | loss | sharded ms | sharded bytes/rank | all-gather ms | all-gather bytes/rank | max |Δ grad| |")
    say("|---:|---:|---:|---:|---:|---:|---:|")
    log: list[dict[str, float]] = []
    peaks: list[float] = []
    for step in range(args.steps):
        feats = torch.randn(args.queries, FEATURES, generator=gen)
        rel = relevant_items(teacher, feats, items)
        model.zero_grad()
        with sd.traffic() as sent:
            t_shard, (loss, _) = timed(sharded_step, model, feats, items, rel, span, args)
        b_shard = sent.bytes + all_reduce_grads(model)
        g_shard = grads(model)
        peaks = peaks or [peak_rss_gb()]  # after the first sharded step, before any all-gather
        model.zero_grad()
        t_base, (_, _, b_base) = timed(allgather_step, model, feats, items, rel, span, args)
        b_base += all_reduce_grads(model)
        diff = torch.tensor(float((g_shard - grads(model)).abs().max()))
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        dist.all_reduce(loss)
        set_grads(model, g_shard)  # the step follows the sharded loss (the two differ by the solver's tolerance)
        opt.step()
        log.append({"loss": float(loss), "sharded_s": t_shard, "sharded_bytes": b_shard, "allgather_s": t_base,
                    "allgather_bytes": b_base, "grad_diff": float(diff)})  # fmt: skip
        say(f"| {step} | {float(loss):.3f} | {t_shard * 1e3:.0f} | {b_shard:,} | {t_base * 1e3:.0f} | {b_base:,} "
            f"| {float(diff):.1e} |")  # fmt: skip
    peaks.append(peak_rss_gb())
    say(
        f"\npeak memory of a process (largest over the ranks): {peaks[0]:.2f} GB after the first sharded step, "
        f"{peaks[1]:.2f} GB at the end (the all-gather way holds the full score rows and their mask)"
    )
    after = recall(model, test_feats, items, test_rel, args.k, args.queries), alignment(model, teacher, test_feats)
    say(f"\nafter {args.steps} steps: recall@{args.k} {after[0]:.3f}, cosine to the teacher {after[1]:.3f}")
    grad_bytes = 4 * sum(p.numel() for p in model.parameters())
    return {"steps": log, "grad_bytes": grad_bytes, "peak_gb": peaks, "recall_before": before[0],
            "recall_after": after[0], "cosine_before": before[1], "cosine_after": after[1]}  # fmt: skip


def summary(args, world: int, res: dict[str, Any]) -> str:
    """The Markdown table of the run: median time and bytes per step, both ways."""
    steps = res["steps"]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    return "\n".join([
        "| way | ms / step (median) | bytes sent / rank / step | loss first → last |",
        "|---|---:|---:|---:|",
        f"| sharded `softtopk.distributed.topk_mask` | {med('sharded_s') * 1e3:.0f} | {med('sharded_bytes'):,.0f} "
        f"| {steps[0]['loss']:.3f} → {steps[-1]['loss']:.3f} |",
        f"| all-gather + `softtopk.topk_mask` | {med('allgather_s') * 1e3:.0f} | {med('allgather_bytes'):,.0f} | "
        "(same gradients) |",
        "",
        f"({args.items:,} items of dim {args.dim} over {world} processes, {args.queries} queries per step, "
        f"k = {args.k}, sigmoid at temperature {args.temperature:g}, float32; recall@{args.k} of the {RELEVANT} "
        f"relevant items on 16 test queries {res['recall_before']:.3f} → {res['recall_after']:.3f}, cosine to the "
        f"teacher's query {res['cosine_before']:.3f} → {res['cosine_after']:.3f}; "
        f"largest |Δ grad| between the two ways {max(s['grad_diff'] for s in steps):.1e}; the bytes include the "
        f"{res['grad_bytes']:,} B all-reduce of the tower's gradients, the same for both ways)",
    ])  # fmt: skip


def _init() -> bool:
    """Join the process group of torchrun (env://), or make a one-process group; True if this call made it."""
    if dist.is_initialized():
        return False
    timeout = datetime.timedelta(seconds=300)
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="softtopk-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    made = _init()
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        say = print if rank == 0 else (lambda line: None)
        t0 = time.perf_counter()
        check = check_single_process(args, rank, world)
        say(f"check at {check['items']:,} items over {world} processes against one process: max |Δ mask| = "
            f"{check['mask']:.1e}, |Δ loss| = {check['loss']:.1e}, max |Δ grad| = {check['grad']:.1e} (largest "
            f"gradient entry {check['grad_scale']:.2g})")  # fmt: skip
        assert check["mask"] < CHECK_TOL, f"the sharded mask differs from the single-process one by {check['mask']}"
        assert check["loss"] < CHECK_TOL * max(1.0, check["loss_value"]), check
        assert check["grad"] < GRAD_TOL * max(1.0, check["grad_scale"]), check
        res = train(args, rank, world, say)
        table = summary(args, world, res)
        say("\n" + table)
        say(f"\ndistributed_retrieval: {time.perf_counter() - t0:.0f} s wall time ({world} processes, "
            f"{torch.get_num_threads()} torch thread each)")  # fmt: skip
        # every rank done before any tears its group down: a rank still exiting when its peer had destroyed
        # the group aborted in gloo ("terminate called") in 1 run of 4-15 under torchrun, 0 of 20 with this
        dist.barrier()
        return {"check": check, **res, "table": table, "world": world}
    finally:
        if made:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
