"""softtopk-bench (benchmarks/suite.py): the CLI end to end in a tiny configuration, the exponent fit, the peer-skip
notice, the README markers, and the in-house peers against softtopk's own masks."""

import json
import math
import sys

import pytest
import torch
from benchmarks import suite
from benchmarks.peers import sigmoid_bisect_mask, sinkhorn_unrolled_mask

import softtopk

TINY = ["--sizes", "100", "200", "--no-fixed-k", "--no-large", "--budget", "0.02", "--min-rounds", "2"]
TINY += ["--max-rounds", "2", "--temperatures", "0.1", "--quality-n", "40", "--quality-rows", "2"]
TINY += ["--ref-samples", "200", "--no-progress"]


def test_cli_tiny_writes_everything(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- SUITE:START -->\nold\n<!-- SUITE:END -->\noutro\n")
    out = tmp_path / "bench"
    argv = TINY + ["--only", "hard", "sigmoid", "sigmoid-bisect", "--out", str(out), "--readme", str(readme)]
    assert suite.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| sigmoid | softtopk |" in printed and "| sigmoid-bisect | in-house |" in printed
    for name in (
        "suite.json",
        "speed.csv",
        "quality.csv",
        "summary.md",
        "speed.png",
        "memory.png",
        "scaling.png",
        "quality.png",
        "masks.png",
    ):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "suite.json").read_text())
    assert {r["n"] for r in doc["speed"]} == {100, 200}
    topk = [r for r in doc["speed"] if r["case"] == "torch.topk"]
    assert all(r["ratio"] == 1.0 and r["rounds"] == 2 for r in topk)
    assert all(r["bytes_per_element"] is not None for r in doc["speed"])
    hard = next(q for q in doc["quality"] if q["case"] == "hard")
    assert hard["dist"] == 0.0 and hard["exact"] == 1.0 and hard["cos"] is None
    text = readme.read_text()
    assert text.startswith("intro\n<!-- SUITE:START -->\n") and text.endswith("<!-- SUITE:END -->\noutro\n")
    assert "old" not in text and "bench/speed.png" in text and "| sigmoid | softtopk |" in text


def test_subcommand_alone(tmp_path, capsys):
    assert suite.main(TINY + ["quality", "--only", "sigmoid", "--no-files"]) == 0
    printed = capsys.readouterr().out
    assert "**Quality**" in printed and "**Speed**" not in printed


def test_readme_without_markers_fails_before_running(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="SUITE:START"):
        suite.main(["--readme", str(readme)])


def test_unknown_subcommand_and_device():
    with pytest.raises(SystemExit):
        suite.main(["speeed"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            suite.main(["--device", "cuda"])


def test_peer_skip_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "entmax", None)  # `import entmax` now raises ImportError
    assert suite.main(TINY + ["speed", "--only", "entmax", "sigmoid", "--no-files"]) == 0
    printed = capsys.readouterr().out
    notices = [line for line in printed.splitlines() if line.startswith("# peer entmax skipped:")]
    assert len(notices) == 1 and "pip install" in notices[0]
    assert "entmax.sparsemax |" not in printed and "| sigmoid | softtopk |" in printed


def test_fit_exponent():
    # points are (n, milliseconds)
    lin = [(n, 3e-3 * n) for n in (10**2, 10**3, 10**4, 10**5, 10**6)]
    fit = suite.fit_exponent(lin)
    assert fit["exponent"] == pytest.approx(1.0) and (fit["n_min"], fit["n_max"]) == (10**4, 10**6)
    quad = [(n, 1e-6 * n**2) for n in (10**2, 10**3, 10**4)]
    assert suite.fit_exponent(quad)["exponent"] == pytest.approx(2.0)
    # a fixed 1 ms per-call overhead flattens the small sizes: only those taking >= 10 ms are fitted
    overhead = [(n, 1.0 + 1e-5 * n) for n in (10**2, 10**3, 10**4, 10**5, 10**6, 10**7)]
    fit = suite.fit_exponent(overhead)
    assert fit["n_min"] == 10**6 and fit["overhead_free"] and 0.9 < fit["exponent"] < 1.0
    assert suite.fit_exponent(overhead, last=6, min_ms=0.0)["exponent"] < 0.6
    assert suite.fit_exponent([(100, 1.0)]) is None
    assert suite.fit_exponent([(100, 1.0), (1000, 10.0)])["exponent"] == pytest.approx(1.0)


def test_inhouse_peers_match_softtopk():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    # converged Sinkhorn = SOFT's closed form (softtopk's "soft" is the converged two-anchor plan)
    y = sinkhorn_unrolled_mask(x, 7, 0.1, iters=3000)
    ref = softtopk.topk_mask(x, 7, method="soft", temperature=0.1)
    assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(y.sum(-1), torch.full((3,), 7.0, dtype=x.dtype))
    # the bisection finds the same threshold as softtopk's sigmoid mask
    y = sigmoid_bisect_mask(x, 7, 0.3)
    ref = softtopk.topk_mask(x, 7, method="sigmoid", temperature=0.3)
    assert torch.allclose(y, ref, atol=1e-8)
    assert math.isclose(float(y.sum(-1)[0]), 7.0, abs_tol=1e-8)
