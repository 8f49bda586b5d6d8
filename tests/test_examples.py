"""The demo runs end to end, and every application example learns in its ``--tiny`` run (the benchmark CLI is tested
in test_bench.py). The examples are run in-process through their ``main(argv)``; each ``--tiny`` run takes seconds."""

import runpy
from pathlib import Path
from statistics import fmean as _mean

import pytest

pytestmark = pytest.mark.usefixtures("example_env")

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    shown = ("hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum", "perturbed", "soft_rank", "bitonic", "Loss")
    shown += ("straight_through", "sinkhorn", "weights / k", "outside", "same temperature 0.5")
    for method in shown:
        assert method in out


def test_topk_classification_learns(tmp_path, capsys):
    from examples import topk_classification

    out = topk_classification.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "### ambiguous digits" in printed and "macro top-5" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    digits, heavy = out["ambiguous digits"], out["heavy-tailed"]
    trivial = _mean(digits["trivial: 5 most frequent labels"]["top5"])
    for loss in ("cross-entropy", "top-5 CE, SOFT (sinkhorn)", "smooth top-5 hinge, balanced", "LML, k = 5"):
        top5 = _mean(digits[loss]["top5"])
        assert top5 > trivial + 0.25, f"{loss}: top-5 {top5:.3f} does not beat the trivial {trivial:.3f} by 0.25"
    trivial = _mean(heavy["trivial: 5 most frequent labels"]["macro5"])
    for loss in ("cross-entropy", "top-5 CE, SOFT (sinkhorn)", "smooth top-5 hinge, imbalanced"):
        macro = _mean(heavy[loss]["macro5"])
        assert macro > trivial + 0.1, f"{loss}: macro top-5 {macro:.3f} does not beat the trivial {trivial:.3f} by 0.1"


def test_knn_learns(tmp_path, capsys):
    from examples import knn

    results = knn.main(["--tiny", "--plot", str(tmp_path / "plot.png")])["results"]
    assert "exact 5-NN" in capsys.readouterr().out
    assert (tmp_path / "plot.png").stat().st_size > 0
    acc16 = _mean(results[16]["soft kNN loss, sigmoid"]["acc"])
    assert acc16 > 0.85, f"dim 16, sigmoid: accuracy {acc16:.3f} is not above 0.85 (chance: 0.1)"
    acc2, untrained = (_mean(results[2][name]["acc"]) for name in ("soft kNN loss, sigmoid", "untrained embedding"))
    assert acc2 > untrained + 0.2, f"dim 2: {acc2:.3f} does not beat the untrained embedding's {untrained:.3f} by 0.2"


def test_cascade_ranking_learns(tmp_path, capsys):
    from examples import cascade_ranking

    out = cascade_ranking.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "Recall@10@20" in printed and "time per training step" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    results = out["results"]
    random = _mean(results["random scores"]["recall"])
    for loss in ("joint cascade, dftopk", "listwise softmax CE (ListNet)"):
        recall = _mean(results[loss]["recall"])
        assert recall > random + 0.15, f"{loss}: Recall@10@20 {recall:.3f} does not beat random {random:.3f} by 0.15"
    assert "joint cascade, sparse" not in results and any("sparse" in note for note in out["notes"])
    assert all(t > 0 for times in out["efficiency"].values() for t in times.values())
