"""examples/pruning.py: in its ``--tiny`` run every pruned model learns (well above chance at 90 % sparsity) and
the fraction of zero weights at test time is the target, up to the rounding of k per layer."""

from pathlib import Path
from statistics import fmean as _mean

import pytest

pytestmark = pytest.mark.usefixtures("example_env")


def test_pruning_learns_at_exact_sparsity(tmp_path: Path, capsys):
    from examples import pruning

    out = pruning.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "zero weights" in printed and "seconds per training epoch" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    results, sparsities = out["results"], out["sparsities"]
    assert 0.9 in sparsities
    n_weights = sum(a * b for a, b in zip(pruning.WIDTHS[:-1], pruning.WIDTHS[1:]))
    dense = _mean(results["dense (reference)"]["acc0.9"])
    assert dense > 0.9, f"dense model: accuracy {dense:.3f}"
    for name, metrics in results.items():
        if name.startswith("dense"):
            continue
        for s in sparsities:
            zeros = _mean(metrics[f"zeros{s}"])
            # k = round((1 - s) n) per layer: off the target by at most half a weight per layer
            assert abs(zeros - s) <= 1.5 / n_weights, f"{name} at {s}: {zeros:.6f} zero weights, target {s}"
        acc = _mean(metrics["acc0.9"])
        floor = 0.3 if name.startswith("one-shot, no fine-tune") else 0.8  # chance: 0.1
        assert acc > floor, f"{name} at 90 % sparsity: test accuracy {acc:.3f} is not above {floor}"
    soft, hard = (_mean(results[n]["acc0.98"]) for n in (pruning.SOFT_NAME, "hard top-k in training"))
    assert soft > 0.2, f"soft top-k at 98 %: accuracy {soft:.3f} (hard top-k in training: {hard:.3f})"
