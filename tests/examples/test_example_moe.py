"""examples/moe.py: every router gate learns both tasks in the ``--tiny`` run, the printed tables have their columns,
and the straight-through measurement tells the selected-experts gradient from the dense_backward one."""

from statistics import fmean as _mean

import pytest

pytestmark = pytest.mark.usefixtures("example_env")


def test_moe_learns(tmp_path, capsys):
    from examples import moe

    out = moe.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "### mixture of regimes" in printed and "### digits" in printed
    headers = ["test MSE", "test accuracy", "load max/mean", "dead experts", "experts reached by a token's gradient"]
    for header in [*headers, "gate-grad cosine vs dense_backward", "ms / step"]:
        assert header in printed, header
    assert (tmp_path / "plot.png").stat().st_size > 0
    regimes, digits = out["results"]["mixture of regimes"], out["results"]["digits"]
    trivial_mse = _mean(regimes["trivial predictor"]["loss"])
    trivial_acc = _mean(digits["trivial predictor"]["acc"])
    for gate in moe.GATES:
        mse, acc = _mean(regimes[gate]["loss"]), _mean(digits[gate]["acc"])
        assert mse < 0.8 * trivial_mse, f"{gate}: test MSE {mse:.3f} is not below 0.8 × the trivial {trivial_mse:.3f}"
        assert acc > trivial_acc + 0.5, f"{gate}: accuracy {acc:.3f} does not beat the trivial {trivial_acc:.3f} by 0.5"
        for results in (regimes, digits):
            assert _mean(results[gate]["ms"]) > 0 and 1.0 <= _mean(results[gate]["load"]) <= moe.N_EXPERTS
    for results in (regimes, digits):
        assert _mean(results["softmax top-k (hard)"]["reach"]) == pytest.approx(2.0)  # only the selected experts
        assert _mean(results["sparse"]["reach"]) <= 3.0 + 1e-9  # the support bound k + 1
        assert _mean(results["straight-through, dense_backward"]["cos"]) == pytest.approx(1.0)
        assert _mean(results["straight-through, selected experts"]["cos"]) < 0.999  # a truncated gradient
        assert "cos" not in results["dense: all 8 experts, softmax"]
