"""The demo and the benchmark CLIs run end to end in a tiny configuration (their numbers are not checked)."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    shown = ("hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum", "perturbed", "soft_rank", "bitonic", "Loss")
    shown += ("straight_through", "sinkhorn", "weights / k", "outside", "same temperature 0.5")
    for method in shown:
        assert method in out


def test_core_benchmark_tiny(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks import core

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BENCHMARK:START -->\nold\n<!-- BENCHMARK:END -->\noutro\n")
    plot, js = tmp_path / "bench.png", tmp_path / "bench.json"
    argv = ["--sizes", "100", "200", "--budget", "0.05", "--min-rounds", "2", "--max-rounds", "2", "--warmup", "0"]
    argv += ["--readme", str(readme), "--plot", str(plot), "--json", str(js)]
    assert core.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| sigmoid |" in text and "bench.png" in text
    assert plot.stat().st_size > 0 and js.stat().st_size > 0
    assert "ratio vs topk" in capsys.readouterr().out


def test_operator_benchmark_tiny(tmp_path, capsys):
    from benchmarks import operators

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- OPS-BENCHMARK:START -->\nSTALE\n<!-- OPS-BENCHMARK:END -->\nb\n")
    assert operators.main(["--sizes", "100", "--budget", "0.01", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "STALE" not in text
    cases = ("perturbed S=10", "gumbel_topk", "threshold_mask", "sinkhorn", "bitonic", "LMLLoss", "CascadeTopKLoss")
    for case in cases:
        assert case in text
