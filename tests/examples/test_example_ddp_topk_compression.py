"""examples/ddp_topk_compression.py, its ``--tiny`` run on 2 gloo processes that ``main`` spawns itself (no torchrun):
the MLP learns at every compression ratio (well above chance), ratio 1 sends the dense all-reduce's bytes, a ratio r
sends 8 bytes per selected entry (⌈r · n⌉ per parameter: about 2r of the dense bytes), and the table and plot come
out."""

import math
from pathlib import Path
from statistics import fmean as _mean

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.usefixtures("example_env"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def test_ddp_topk_compression_learns_and_sends_2r(tmp_path: Path, capsys):
    from examples import ddp_topk_compression as ex

    out = ex.main(["--tiny", "--procs", "2", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert (
        "| ratio | test accuracy | after 3 epochs | bytes sent / rank / step | fraction of dense | ms / step |"
        in printed
    )
    assert (tmp_path / "plot.png").stat().st_size > 0
    results = out["results"]
    assert out["world"] == 2 and list(results) == [name for name, _, _ in ex.CONFIGS]
    for name, _, _ in ex.CONFIGS:
        assert f"| {name} |" in printed

    sizes = [p.numel() for p in ex.mlp().parameters()]
    dense = 4 * sum(sizes)  # float32 all-reduce
    assert out["dense_bytes"] == dense == 340_008
    for name, ratio, _ in ex.CONFIGS:
        metrics = results[name]
        sent = 8 * sum(math.ceil(ratio * n) for n in sizes) if ratio < 1 else dense
        assert metrics["bytes"] == [sent], f"{name}: {metrics['bytes']} bytes per step, expected {sent}"
        assert metrics["ms"][0] > 0
        acc = _mean(metrics["acc"])
        floor = 0.8 if ratio == 1 else 0.4  # chance: 0.1
        assert acc > floor, f"ratio {name}: test accuracy {acc:.3f} is not above {floor}"
    fraction = _mean(results["0.01"]["fraction"])
    assert abs(fraction - 2 * 0.01) < 0.001, f"ratio 0.01 sends {fraction:.4f} of the dense bytes, not about 0.02"
    assert _mean(results["0.1"]["fraction"]) == pytest.approx(0.2, abs=0.001)
