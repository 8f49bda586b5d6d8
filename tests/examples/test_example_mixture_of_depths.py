"""examples/mixture_of_depths.py learns in its ``--tiny`` run: every model (dense, MoD top-k soft and hard, MoD
threshold-p) predicts the copied tokens well below the unigram loss, the routed blocks process about the capacity,
and the table has its columns."""

from statistics import fmean as _mean

import pytest

pytestmark = pytest.mark.usefixtures("example_env")


def test_mixture_of_depths_learns(tmp_path, capsys):
    from examples import mixture_of_depths

    out = mixture_of_depths.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "### marker-copy task" in printed
    columns = ["test loss", "loss, copied tokens", "accuracy, copied tokens", "routed blocks: tokens processed"]
    columns += ["markers processed", "block compute vs dense", "ms / step", "causal decoding: loss, copied"]
    for column in columns:
        assert f" {column} |" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    results, unigram = out["results"], out["unigram"]
    assert list(results) == list(mixture_of_depths.MODELS)
    for name, row in results.items():
        loss = _mean(row["loss_pred"])
        assert loss < unigram - 0.3, f"{name}: loss on the copied tokens {loss:.3f} is not 0.3 below {unigram:.3f}"
        assert _mean(row["ms"]) > 0 and 0 < _mean(row["compute"]) <= 1
    for name in ("MoD top-k, soft (sigmoid)", "MoD top-k, hard + r_i (paper)"):
        assert _mean(results[name]["fraction"]) == pytest.approx(mixture_of_depths.CAPACITY)
        causal = _mean(results[name]["causal_loss_pred"])
        assert causal < unigram - 0.3, f"{name}: causal decoding loss {causal:.3f} is not 0.3 below {unigram:.3f}"
    assert _mean(results["dense"]["compute"]) == 1.0
    assert _mean(results["MoD top-k, soft (sigmoid)"]["compute"]) == pytest.approx(0.75)  # 2 blocks, one at 0.5
    assert 0.2 < _mean(results["MoD threshold-p"]["fraction"]) < 0.8  # the budget loss holds it near the capacity
