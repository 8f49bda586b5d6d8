"""softtopk-bench (benchmarks/suite.py): the CLI end to end in a tiny configuration, the exponent fit, the peer-skip
notice, the README markers, the in-house peers against softtopk's own masks, and the benchmarks' internal
temperatures against softtopk's width convention (benchmarks/_temperature.py)."""

import json
import math
import sys

import pytest
import torch
from benchmarks import suite
from benchmarks._temperature import mask_kwargs, threshold_temperature
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
    ref = softtopk.topk_mask(x, 7, method="soft", epsilon=0.1)
    assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(y.sum(-1), torch.full((3,), 7.0, dtype=x.dtype))
    # the bisection finds the same threshold as softtopk's sigmoid mask (internal t = temperature / 4)
    y = sigmoid_bisect_mask(x, 7, 0.3)
    ref = softtopk.topk_mask(x, 7, method="sigmoid", temperature=4 * 0.3)
    assert torch.allclose(y, ref, atol=1e-8)
    assert math.isclose(float(y.sum(-1)[0]), 7.0, abs_tol=1e-8)


# the inverse of each family's profile: z = (x - tau)/t from the mask value y (entries strictly inside (0, 1))
_INVERSE = {
    "sigmoid": torch.logit,
    "dftopk": torch.logit,
    "lapsum": lambda y: torch.where(y < 0.5, torch.log(2 * y), -torch.log(2 * (1 - y))),
    "sparse": lambda y: y,
    "sparse(p=4/3)": lambda y: y ** (1 / 3),
}


@pytest.mark.parametrize("case", list(_INVERSE))
def test_internal_temperature_gives_the_family_profile(case):
    # the benchmarks' mask at internal t is clip(phi((x - tau)/t)): x - t * phi^-1(y) is the same tau on every entry
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, generator=gen, dtype=torch.float64)
    t = 0.6
    method, opts = ("sparse", {"p": 4 / 3}) if case == "sparse(p=4/3)" else (case, {})
    y = softtopk.topk_mask(x, 6, **mask_kwargs(method, t, **opts))
    inside = (y > 1e-6) & (y < 1 - 1e-6)
    assert int(inside.sum(-1).min()) >= 3
    tau = torch.where(inside, x - t * _INVERSE[case](y.clamp(1e-12, 1 - 1e-12)), torch.nan)
    spread = (tau.nan_to_num(-torch.inf).amax(-1) - tau.nan_to_num(torch.inf).amin(-1)).max()
    assert float(spread) < 1e-6, case
    if case == "dftopk":  # tau is the midpoint of the k-th and (k+1)-th largest entries
        top = x.topk(7, dim=-1).values
        mid = (top[:, 5] + top[:, 6]) / 2
        assert torch.allclose(tau.nanmean(-1), mid, atol=1e-6)


def test_internal_temperature_straight_through_perturbed_threshold():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    # "straight_through": the hard mask forward, the sigmoid mask's gradient (same internal t) backward
    xs = x.clone().requires_grad_()
    y = softtopk.topk_mask(xs, 4, **mask_kwargs("straight_through", 0.2))
    (grad,) = torch.autograd.grad((y * w).sum(), xs)
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((softtopk.topk_mask(xr, 4, **mask_kwargs("sigmoid", 0.2)) * w).sum(), xr)
    assert torch.equal(y.detach(), softtopk.topk_mask(x, 4, method="hard")) and torch.allclose(grad, ref)
    # "perturbed" at internal t: Gaussian noise of sigma t; for two entries E[hard] = Phi((x0 - x1) / (t sqrt 2))
    pair = torch.tensor([0.3, 0.0], dtype=torch.float64)
    y = softtopk.topk_mask(
        pair, 1, **mask_kwargs("perturbed", 0.5, n_samples=200_000, generator=torch.Generator().manual_seed(0))
    )
    want = 0.5 * (1 + math.erf(0.3 / (0.5 * math.sqrt(2)) / math.sqrt(2)))
    assert abs(float(y[0]) - want) < 0.01
    # threshold_mask at internal t: sigmoid((sigmoid(x) - threshold) / t)
    y = softtopk.threshold_mask(x, 0.5, temperature=threshold_temperature(0.1))
    assert torch.allclose(y, torch.sigmoid((torch.sigmoid(x) - 0.5) / 0.1))
