"""The demo runs end to end (the benchmark CLI is tested in test_bench.py)."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    shown = ("hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum", "perturbed", "soft_rank", "bitonic", "Loss")
    shown += ("straight_through", "sinkhorn", "weights / k", "outside", "same temperature 0.5")
    for method in shown:
        assert method in out
