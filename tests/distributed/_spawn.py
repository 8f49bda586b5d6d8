"""Runs a function on W gloo processes spawned from a test: ``spawn(world, fn, *args)`` calls ``fn(rank, world,
*args)`` on every rank and fails the test with every rank's traceback. ``fn`` must be a module-level function of a
test module (the children import it)."""

from __future__ import annotations

import datetime
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(world: int, fn, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        errors = Path(tmp) / "errors"
        errors.mkdir()
        try:
            mp.spawn(_rank_main, args=(world, str(Path(tmp) / "store"), str(errors), fn, args), nprocs=world)
        finally:  # the ranks' own tracebacks first (a timeout elsewhere is their consequence)
            found = sorted(errors.iterdir())
            assert not found, "\n".join(p.read_text() for p in found)


def _rank_main(rank, world, store, errors, fn, args):
    torch.set_num_threads(1)
    # a rank that fails leaves the others waiting in a collective: the timeout ends the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        fn(rank, world, *args)
    except BaseException:  # reported by the parent, with every rank's traceback
        Path(errors, f"rank{rank}").write_text(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.barrier()
        dist.destroy_process_group()
