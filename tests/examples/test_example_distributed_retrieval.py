"""examples/distributed_retrieval.py launched as users launch it, under torchrun with 2 gloo processes (--tiny): it
exits 0, its check against the single-process computation passes (and is printed), every training step prints its
time and bytes for both ways with equal gradients, the sharded way sends fewer bytes than the all-gather, and the
query tower learns (its embedding turns towards the teacher's)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
ROOT = Path(__file__).resolve().parents[2]


def test_distributed_retrieval_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "examples.distributed_retrieval", "--tiny"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    check = re.search(r"check at 10,000 items over 2 processes against one process: max \|Δ mask\| = (\S+),", out)
    assert check and float(check.group(1)) < 1e-5, out
    steps = re.findall(r"^\| (\d+) \| (\S+) \| (\d+) \| ([\d,]+) \| (\d+) \| ([\d,]+) \| (\S+) \|$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2], out
    for _, loss, _, sharded, _, gathered, diff in steps:
        assert float(loss) > 0 and float(diff) < 1e-3
        assert int(sharded.replace(",", "")) < int(gathered.replace(",", ""))
    # it learns: the student's query embedding turns towards the teacher's (cosine 0.17 -> 0.48 in this run)
    before = re.search(r"before training: .* cosine to the teacher's query (\S+)", out)
    after = re.search(r"after 3 steps: .* cosine to the teacher (\S+)", out)
    assert before and after and float(after.group(1)) > float(before.group(1)) + 0.1, out
    assert "| sharded `softtopk.distributed.topk_mask` |" in out and "(2 processes, 1 torch thread each)" in out
