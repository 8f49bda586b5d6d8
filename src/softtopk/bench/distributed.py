"""``softtopk-bench --tag distributed``: the sharded top-k mask against all-gather-then-mask, on gloo processes.

Spawns ``world`` processes (gloo, CPU, one torch thread each) that each hold a (rows, n / world) shard of float32
scores, and times per call, forward + backward with a fixed upstream gradient:

* **sharded**: :func:`softtopk.distributed.topk_mask` on the shard (threshold methods: O(rows) scalars exchanged per
  Newton step; DFTopK: each rank's top k + 1);
* **all-gather**: what users do without it: all-gather the shards, then every rank computes
  :func:`softtopk.topk_mask` on the full (rows, n) tensor and backpropagates the full (replicated) loss, keeping the
  gradient of its own shard.

Both give every rank the same mask shard and the same gradient of its shard (checked at the warm-up: the largest
difference is recorded). A call is timed from a barrier to a barrier (the slowest rank's finish), the two cases
interleaved round by round in alternating order after one warm-up call each; the median is reported. Bytes are the
payloads this rank contributed to collectives (as :func:`softtopk.distributed.traffic` counts them: an all-gather
or all-reduce of b bytes counts b, whatever the backend moves on the wire).
"""

from __future__ import annotations

import datetime
import json
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["DistConfig", "measure", "table"]

#: the upstream-gradient and score seeds are derived from this and n
_SEED = 0


@dataclass
class DistConfig:
    """What the distributed benchmark measures (the defaults: the README's table)."""

    world: int = 4
    sizes: tuple[int, ...] = (10**6, 10**7)
    rows: int = 4
    k: int = 1000
    temperature: float = 0.1
    methods: tuple[str, ...] = ("sigmoid", "dftopk")
    rounds: int = 5
    timeout_s: float = 600.0  # a collective waits this long for a rank that failed

    @classmethod
    def quick(cls) -> DistConfig:
        """Seconds: 2 processes, n = 1e4, k = 100, 3 rounds."""
        return cls(world=2, sizes=(10**4,), k=100, rounds=3, timeout_s=60.0)


def measure(cfg: DistConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Spawn ``cfg.world`` gloo processes and measure every (n, method); returns {"setup": ..., "rows": [...]}."""
    import torch.multiprocessing as mp

    for n in cfg.sizes:
        if n % cfg.world or n // cfg.world < cfg.k + 1:
            raise ValueError(f"softtopk-bench distributed: n={n} must be a multiple of world={cfg.world} with "
                             f"shards longer than k={cfg.k}")  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out, errors = Path(tmp) / "rows.json", Path(tmp) / "errors"
        errors.mkdir()
        try:
            mp.spawn(_rank_main, args=(cfg, str(Path(tmp) / "store"), str(out), str(errors)), nprocs=cfg.world)
        except Exception as e:  # the ranks' own tracebacks say more than the spawn error
            found = "\n".join(p.read_text() for p in sorted(errors.iterdir()))
            raise RuntimeError(f"softtopk-bench distributed: a rank failed:\n{found or e}") from e
        rows = json.loads(out.read_text())
    for r in rows:
        log(f"# distributed n={r['n']:.0e} {r['method']}: sharded {r['sharded_ms']:.1f} ms, all-gather "
            f"{r['allgather_ms']:.1f} ms, {r['sharded_bytes']} vs {r['allgather_bytes']} bytes/rank")  # fmt: skip
    setup = {**asdict(cfg), "dtype": "float32", "backend": "gloo", "threads_per_process": 1,
             "wall_s": time.perf_counter() - t0}  # fmt: skip
    return {"setup": setup, "rows": rows}


def _rank_main(rank: int, cfg: DistConfig, store: str, out: str, errors: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=cfg.world, timeout=timeout)
    try:
        rows = [_measure_one(rank, cfg, n, method) for n in cfg.sizes for method in cfg.methods]
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        # every rank done before any tears its group down: a rank still exiting when its peer had destroyed
        # the group aborted in gloo ("terminate called") in 1 run of 4-15 under torchrun, 0 of 20 with this
        dist.barrier()
    except BaseException:
        Path(errors, f"rank{rank}").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _measure_one(rank: int, cfg: DistConfig, n: int, method: str) -> dict[str, Any]:
    import torch.distributed as dist

    import softtopk
    import softtopk.distributed as sd

    world, rows, k, t = cfg.world, cfg.rows, cfg.k, cfg.temperature
    m = n // world
    gen = torch.Generator().manual_seed(_SEED + n)
    g_full = torch.randn(rows, n, generator=gen)  # the same upstream gradient on every rank
    g_own = g_full[:, rank * m : (rank + 1) * m].contiguous()
    x = torch.randn(rows, m, generator=torch.Generator().manual_seed(_SEED + n + 1 + rank)).requires_grad_()

    def sharded() -> tuple[torch.Tensor, torch.Tensor, int, int]:
        x.grad = None
        with sd.traffic() as sent:
            y = sd.topk_mask(x, k, method=method, temperature=t)
            y.backward(g_own)
        assert x.grad is not None
        return y.detach(), x.grad, sent.bytes, sent.calls

    def gathered() -> tuple[torch.Tensor, torch.Tensor, int, int]:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach())
        full = torch.cat(parts, -1).requires_grad_()
        y = softtopk.topk_mask(full, k, method=method, temperature=t)
        y.backward(g_full)  # the replicated loss <g, y>: the gradient of this shard is local
        own = slice(rank * m, (rank + 1) * m)
        assert full.grad is not None
        return y.detach()[:, own], full.grad[:, own], x.numel() * x.element_size(), 1

    fns = {"sharded": sharded, "allgather": gathered}
    first = {name: _timed(fn) for name, fn in fns.items()}  # the warm-up, and the check that both agree
    (ys, gs, sb, sc), (yg, gg, gb, gc) = first["sharded"][1], first["allgather"][1]
    diff = torch.tensor([float((ys - yg).abs().max()), float((gs - gg).abs().max()), float(gg.abs().max())],
                        dtype=torch.float64)  # fmt: skip
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(cfg.rounds):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(_timed(fns[name])[0])
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    return {"n": n, "method": method, "rows": rows, "k": k, "temperature": t, "world": world,
            "sharded_ms": med["sharded"] * 1e3, "allgather_ms": med["allgather"] * 1e3,
            "ratio": med["sharded"] / med["allgather"], "sharded_bytes": sb, "sharded_calls": sc,
            "allgather_bytes": gb, "allgather_calls": gc, "rounds": cfg.rounds,
            "first_call_ms": {name: first[name][0] * 1e3 for name in fns},
            "sharded_ms_all": [s * 1e3 for s in times["sharded"]],
            "allgather_ms_all": [s * 1e3 for s in times["allgather"]],
            "max_abs_diff_mask": float(diff[0]), "max_abs_diff_grad": float(diff[1]),
            "max_abs_grad": float(diff[2])}  # fmt: skip


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds from a barrier before the call to a barrier after it (the slowest rank's finish), and its result."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - t0, result


def _bytes(b: int) -> str:
    for unit, size in (("MB", 10**6), ("kB", 10**3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def table(part: dict[str, Any]) -> list[str]:
    """The Markdown table of a run's ``doc["distributed"]``, and a line on what was checked."""
    lines = ["| n | method | sharded ms | all-gather ms | ratio | sharded bytes/rank | all-gather bytes/rank |",
             "|---:|:---|---:|---:|---:|---:|---:|"]  # fmt: skip
    from .cases import fmt_n

    for r in part["rows"]:
        lines.append(f"| {fmt_n(r['n'])} | {r['method']} | {r['sharded_ms']:.1f} | {r['allgather_ms']:.1f} | "
                     f"{r['ratio']:.2f}× | {_bytes(r['sharded_bytes'])} ({r['sharded_calls']} collectives) | "
                     f"{_bytes(r['allgather_bytes'])} |")  # fmt: skip
    mask = max(r["max_abs_diff_mask"] for r in part["rows"])
    grad = max(r["max_abs_diff_grad"] / max(r.get("max_abs_grad", 1.0), 1e-30) for r in part["rows"])
    return lines + ["", "Both ways give every rank the same mask shard and gradient, up to float32 rounding and the "
                    f"solver's tolerance: largest difference {mask:.1e} in the mask, {grad:.1e} of the largest "
                    "gradient entry in the gradient."]  # fmt: skip
