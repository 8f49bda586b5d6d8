"""Parity of the Triton kernels (:mod:`softtopk.kernels.triton_threshold`) with the torch reference of
:mod:`softtopk.threshold`: values and gradients w.r.t. x, k and t, for every family and DFTopK, at odd row lengths,
with ties, −inf padding, +inf entries, per-row k and t, k = 0 and k = n, half-precision inputs, the long-row (grid)
path, extreme scores; and the custom ops' registration (``torch.library.opcheck``).

On CPU the kernels run in Triton's interpreter (see _kernel_env.py): shapes are tiny.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'softtopk[gpu]'): kernel tests skipped")

from _kernel_env import kernel_env  # noqa: E402, F401  (the fixture, and TRITON_INTERPRET set before any kernel)

import softtopk  # noqa: E402
from softtopk import threshold  # noqa: E402
from softtopk.kernels import triton_threshold as tt  # noqa: E402

# CUDA when _kernel_env.py left the interpreter off (a GPU is present), else CPU through the interpreter
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")

# numpy's notes on inf/nan in both branches of a where, in the interpreter (not a result of the kernels)
pytestmark = [
    pytest.mark.usefixtures("kernel_env"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

FAMILIES = ("sigmoid", "lapsum", "sparse2", "sparse4/3")
TOL = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _torch_path():
    """The torch reference whatever softtopk's dispatch does: Triton disabled (the kernel_env fixture also sets
    ``threshold.BACKEND["threshold"] = "torch"``, which turns the numba kernel off)."""
    old = os.environ.get("SOFTTOPK_DISABLE_TRITON")
    os.environ["SOFTTOPK_DISABLE_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SOFTTOPK_DISABLE_TRITON"]
        else:
            os.environ["SOFTTOPK_DISABLE_TRITON"] = old


def _ref_mask(family, x, k, t):
    with _torch_path():
        return threshold.normalised_mask(family, x, k, t, tol=TOL, max_iter=50)


def _ref_dftopk(x, k, t):
    with _torch_path():
        return threshold.dftopk(x, k, t)


def _run(fn, x, k, t, g):
    """(y, gx, gk, gt) of fn(x, k, t) with the upstream gradient g (k's gradient None for integer k)."""
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    real_k = isinstance(k, torch.Tensor) and k.is_floating_point()
    k = k.detach().clone().requires_grad_() if real_k else k
    y = fn(x, k, t)
    y.backward(g)
    return y.detach(), x.grad, k.grad if real_k else None, t.grad


def _kernel_mask(family, max_iter=50):
    return lambda x, k, t: tt.threshold_mask(family, x, k, t, TOL, max_iter)


def _reference_mask(family):
    return lambda x, k, t: _ref_mask(family, x.float(), k, t)


def _close(a, b, atol, rtol=1e-3, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    a, b = a.cpu(), b.cpu()
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), (
        what,
        float((a.float() - b.float()).abs().max()),
    )


def _compare(family, x, k, t, g, atol=2e-5, gatol=2e-4):
    got = _run(_kernel_mask(family), x, k, t, g)
    ref = _run(_reference_mask(family), x, k, t, g)
    for name, a, b in zip(("y", "gx", "gk", "gt"), got, ref):
        _close(a, b, atol if name == "y" else gatol * max(1.0, float(b.abs().max())), what=name)
    return got


def _temps(family, rows):
    """Per-row temperatures at which several entries sit strictly inside (0, 1) (well-conditioned gradients)."""
    base = (0.3, 1.0, 0.1) if family in ("sigmoid", "lapsum") else (1.0, 2.0, 0.7)
    return torch.tensor([base[i % 3] for i in range(rows)]).reshape(rows, 1)


# --------------------------------------------------------------------------------------------------------------
# Normalised masks.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 7, 33, 1000])
def test_normalised_matches_reference(family, n):
    gen = _gen(n)
    x = torch.randn(4, n, generator=gen)
    k = torch.tensor([[0.5], [n / 3 + 0.25], [max(n - 1.5, 0.25)], [float(max(n // 2, 1))]]).clamp(max=n - 0.5)
    t = _temps(family, 4)
    g = torch.randn(4, n, generator=gen)
    y = _compare(family, x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), g.to(DEVICE))[0]
    assert y.dtype == torch.float32
    assert torch.allclose(y.sum(-1, keepdim=True), k.to(DEVICE), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_normalised_special_entries(family):
    """−inf padding (exactly 0), +inf entries (exactly 1, counted in k), ties, and the degenerate rows (k ≤ #(+inf):
    the +inf indicator; k ≥ #live: the live indicator; k = 0; k = n), one temperature for all rows (expanded)."""
    inf = math.inf
    x = torch.randn(6, 9, generator=_gen(1))
    x[0, 6:] = -inf  # padding
    x[1, 2], x[1, 5] = inf, inf  # k − 2 among the finite entries
    x[2, :4] = 0.25  # ties
    x[3, 1] = inf  # k = 1 ≤ #(+inf): the +inf indicator
    x[4, 7:] = -inf  # k = #live: the live indicator
    k = torch.tensor([[2.5], [3.0], [2.0], [1.0], [7.0], [0.0]])
    # one t for all rows (an expanded view); the sparse families' wide enough that S(τ) = k has no flat piece (where
    # the mask and its gradient are not unique)
    t = torch.tensor([[0.5 if family in ("sigmoid", "lapsum") else 3.0]]).expand(6, 1)
    g = torch.randn(6, 9, generator=_gen(2))
    y, gx, _, _ = _compare(family, x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), g.to(DEVICE))
    y, gx = y.cpu(), gx.cpu()
    assert bool((y[0, 6:] == 0).all()) and bool((y[1, [2, 5]] == 1).all())
    assert torch.equal(y[3], (x[3] == inf).float()) and torch.equal(y[4], (x[4] > -inf).float())
    assert bool((y[5] == 0).all()) and bool((gx[3:] == 0).all())
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(gx).all())
    full = tt.threshold_mask(family, x[:1].to(DEVICE), torch.tensor([[9.0]], device=DEVICE), t[:1].to(DEVICE), TOL, 50)
    assert torch.equal(full.cpu(), (x[:1] > -inf).float())  # k = n with padding: every live entry


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalised_half_inputs(family, dtype):
    """Half-precision scores are read as they are and computed in float32: the reference on x.float()."""
    x = torch.randn(3, 33, generator=_gen(3)).to(dtype)
    k = torch.tensor([[2.0], [10.5], [30.0]])
    t = _temps(family, 3)
    g = torch.randn(3, 33, generator=_gen(4))
    got = _run(_kernel_mask(family), x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), g.to(DEVICE))
    ref = _run(_reference_mask(family), x.float().to(DEVICE), k.to(DEVICE), t.to(DEVICE), g.to(DEVICE))
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    _close(got[0], ref[0], 2e-5, what="y")
    _close(got[1], ref[1], 2e-2 * float(ref[1].abs().max()), rtol=2e-2, what="gx")  # gx rounded to the half dtype
    _close(got[3], ref[3], 1e-3 * float(ref[3].abs().max()), what="gt")


@pytest.mark.parametrize("family", FAMILIES)
def test_normalised_long_rows(family, monkeypatch):
    """The grid path (stats pass, warm start on a subsample, host Newton loop over per-block partial sums, backward
    in two passes), forced at n = 300 by lowering the one-program limit to 64 entries."""
    monkeypatch.setattr(tt, "MAX_BLOCK", 64)
    monkeypatch.setattr(tt, "CHUNK", 64)
    monkeypatch.setattr(tt, "SUBSAMPLE", 32)
    x = torch.randn(4, 300, generator=_gen(5))
    x[0, 250:] = -math.inf
    x[1, 17] = math.inf
    x[3, 100:] = -math.inf
    k = torch.tensor([[3.5], [40.0], [150.25], [100.0]])  # row 3: k = #live, the exact live indicator
    t = _temps(family, 4)
    g = torch.randn(4, 300, generator=_gen(6))
    y = _compare(family, x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), g.to(DEVICE))[0].cpu()
    assert torch.equal(y[3], (x[3] > -math.inf).float()) and bool((y[0, 250:] == 0).all()) and y[1, 17] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_normalised_extreme_scores(family):
    """|x|/t near the float32 range (x = 1e30, t = 0.1; and 3e38 at t = 0.5) and offset scores at a tiny t: solved in
    the kernel (centred at a score near the threshold), finite, Σ y = k, as the reference (which goes to float64)."""
    base = torch.randn(4, 33, generator=_gen(7))
    x = torch.stack([1e30 * base[0], 1e4 + base[1], base[2], base[3]])
    x[2, 0], x[2, 1] = 3e38, -3e38
    k = torch.tensor([[4.0], [9.5], [3.0], [17.5]])
    t = torch.tensor([[0.1], [1e-3], [0.5], [1e-6]])  # row 3: |τ| too large for float32 in any frame but the polish's
    y = tt.threshold_mask(family, x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), TOL, 50).cpu()
    ref = _ref_mask(family, x, k, t)
    assert bool(torch.isfinite(y).all())
    assert torch.allclose(y.sum(-1, keepdim=True), k, atol=1e-4)
    _close(y, ref, 1e-4, what="y")


def test_normalised_long_rows_polish(monkeypatch):
    """The long-row path's polish (re-centred at the score nearest the threshold) at a tiny temperature."""
    monkeypatch.setattr(tt, "MAX_BLOCK", 64)
    monkeypatch.setattr(tt, "CHUNK", 64)
    monkeypatch.setattr(tt, "SUBSAMPLE", 32)
    x = torch.randn(1, 200, generator=_gen(19))
    k, t = torch.tensor([[17.5]]), torch.tensor([[1e-6]])
    for family in FAMILIES:
        y = tt.threshold_mask(family, x.to(DEVICE), k.to(DEVICE), t.to(DEVICE), TOL, 50).cpu()
        _close(y, _ref_mask(family, x, k, t), 1e-4, what=family)


def test_normalised_warns_without_convergence():
    x = torch.randn(2, 33, generator=_gen(8)).to(DEVICE)
    k, t = torch.tensor([[3.0], [7.0]], device=DEVICE), torch.tensor([[0.05]], device=DEVICE).expand(2, 1)
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        tt.threshold_mask("sparse4/3", x, k, t, 1e-9, 1)


def test_normalised_rejects_bad_input():
    x = torch.randn(2, 5, device=DEVICE)
    k, t = torch.ones(2, 1, device=DEVICE), torch.ones(2, 1, device=DEVICE)
    with pytest.raises(ValueError, match="family"):
        tt.threshold_mask("entmax", x, k, t, TOL, 50)
    with pytest.raises(TypeError, match="float64"):
        tt.threshold_mask("sigmoid", x.double(), k.double(), t.double(), TOL, 50)


# --------------------------------------------------------------------------------------------------------------
# DFTopK.
# --------------------------------------------------------------------------------------------------------------
def _dftopk_pair(x, k, t, g):
    got = _run(lambda x, k, t: tt.dftopk(x, k, t), x, k, t, g)
    ref = _run(_ref_dftopk, x, k, t, g)
    return got, ref


@pytest.mark.parametrize("n", [1, 7, 33, 1000])
def test_dftopk_matches_reference(n):
    gen = _gen(10 + n)
    x = torch.randn(3, n, generator=gen).to(DEVICE)
    t = torch.tensor([[0.3], [1.0], [0.1]], device=DEVICE)
    g = torch.randn(3, n, generator=gen).to(DEVICE)
    for k in {min(n, 1), n // 2, max(n - 1, 0)}:
        got, ref = _dftopk_pair(x, k, t, g)
        for name, a, b in zip(("y", "gx", "gk", "gt"), got, ref):
            if b is not None:
                _close(a, b, 1e-5 * max(1.0, float(b.abs().max())), what=f"{name} k={k}")
    kk = torch.tensor([[0], [n // 2], [n]], device=DEVICE)  # per row, with k = 0 and k = n
    got, ref = _dftopk_pair(x, kk, t, g)
    _close(got[0], ref[0], 1e-6, what="y")
    _close(got[1], ref[1], 1e-5, what="gx")
    _close(got[3], ref[3], 1e-5, what="gt")


def test_dftopk_int_k_and_ties():
    """An int k; ties at the k-th / (k+1)-th value (the mask equal; the gradient equal in its sum over the tied
    entries, since which of them carries −(Σ s)/2 is each implementation's own choice); −inf and +inf entries."""
    x = torch.randn(4, 12, generator=_gen(11))
    x[0, [2, 5, 8]] = 0.75  # a tie across ranks 3..5
    x[0, :2] = torch.tensor([3.0, 2.5])
    x[1, 9:] = -math.inf
    x[2, 4] = math.inf
    x[3] = 1.0  # every entry tied
    t = torch.full((4, 1), 0.2)
    g = torch.randn(4, 12, generator=_gen(12))
    got, ref = _dftopk_pair(x.to(DEVICE), 3, t.to(DEVICE), g.to(DEVICE))
    _close(got[0], ref[0], 1e-6, what="y")
    _close(got[3], ref[3], 1e-5, what="gt")
    gx, gr = got[1].cpu(), ref[1].cpu()
    tied = (x[0] == 0.75) | (x[3] == 1.0).all()  # row 0's tied entries
    _close(gx[0][~tied], gr[0][~tied], 1e-5, what="gx untied")
    _close(gx[0][tied].sum(), gr[0][tied].sum(), 1e-5, what="gx tied sum")
    _close(gx[1:3], gr[1:3], 1e-5, what="gx rows 1-2")
    _close(gx[3].sum(), gr[3].sum(), 1e-5, what="gx all tied")
    assert bool((got[0].cpu()[1, 9:] == 0).all()) and bool(torch.isfinite(gx).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dftopk_dtypes(dtype):
    x = torch.randn(2, 33, generator=_gen(13)).to(dtype)
    t = torch.tensor([[0.3]])
    g = torch.randn(2, 33, generator=_gen(14))
    got = _run(lambda x, k, t: tt.dftopk(x, k, t), x.to(DEVICE), 5, t.to(DEVICE), g.to(DEVICE))
    ref = _run(lambda x, k, t: _ref_dftopk(x.float(), k, t), x, 5, t, g)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    _close(got[0], ref[0], 1e-5, what="y")
    _close(got[1], ref[1], 2e-2 * float(ref[1].abs().max()), rtol=2e-2, what="gx")


def test_dftopk_long_rows(monkeypatch):
    """The grid path: four radix-histogram passes, two locate passes, the mask pass; ties and ±inf."""
    monkeypatch.setattr(tt, "MAX_BLOCK", 64)
    monkeypatch.setattr(tt, "CHUNK", 64)
    x = torch.randn(3, 300, generator=_gen(15))
    x[0, 200:] = -math.inf
    x[1, 3] = math.inf
    x[2, [10, 150, 290]] = 5.0  # the top three tied, k = 2: x_(2) = x_(3)
    t = torch.tensor([[0.3], [1.0], [0.5]])
    g = torch.randn(3, 300, generator=_gen(16))
    kk = torch.tensor([[20], [1], [2]])
    got, ref = _dftopk_pair(x.to(DEVICE), kk.to(DEVICE), t.to(DEVICE), g.to(DEVICE))
    _close(got[0], ref[0], 1e-6, what="y")
    _close(got[3], ref[3], 1e-5, what="gt")
    gx, gr = got[1].cpu(), ref[1].cpu()
    _close(gx[:2], gr[:2], 1e-5, what="gx")
    tied = x[2] == 5.0
    _close(gx[2][~tied], gr[2][~tied], 1e-5, what="gx untied")
    _close(gx[2][tied].sum(), gr[2][tied].sum(), 1e-5, what="gx tied sum")
    for kv in (0, 300):  # k = 0 and k = n through the radix path
        got, ref = _dftopk_pair(x.to(DEVICE), kv, t.to(DEVICE), g.to(DEVICE))
        _close(got[0], ref[0], 1e-6, what=f"y k={kv}")


# --------------------------------------------------------------------------------------------------------------
# The custom ops, the dispatch switch, the lazy import.
# --------------------------------------------------------------------------------------------------------------
def test_opcheck():
    x = torch.randn(2, 7, generator=_gen(17)).to(DEVICE).requires_grad_()
    k = torch.tensor([[2.0], [3.5]], device=DEVICE, requires_grad=True)
    t = torch.tensor([[0.5], [1.0]], device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's inf/nan notes from the interpreter
        torch.library.opcheck(torch.ops.softtopk.threshold_forward.default, (x, k, t, "sigmoid", TOL, 50))
        kk = torch.tensor([[2], [5]], device=DEVICE)
        torch.library.opcheck(torch.ops.softtopk.dftopk_forward.default, (x, kk, t))
        y, tau, c = torch.ops.softtopk.threshold_forward(x.detach(), k.detach(), t.detach(), "sigmoid", TOL, 50)
        g = torch.randn(2, 7, generator=_gen(20)).to(DEVICE)
        args = (g, y, x.detach(), t.detach(), tau, c, "sigmoid", True)
        torch.library.opcheck(torch.ops.softtopk.threshold_backward.default, args)
        y, tau, idx = torch.ops.softtopk.dftopk_forward(x.detach(), kk, t.detach())
        torch.library.opcheck(
            torch.ops.softtopk.dftopk_backward.default, (g, y, x.detach(), t.detach(), tau, idx, True)
        )


def test_compiles_with_custom_ops():
    """The ops are opaque calls in a torch.compile graph (aot_eager: the same tracing as inductor, no codegen)."""
    x = torch.randn(2, 9, generator=_gen(18)).to(DEVICE)
    k, t = torch.tensor([[2.0], [4.0]], device=DEVICE), torch.tensor([[0.5], [0.2]], device=DEVICE)

    def f(x):
        return tt.threshold_mask("lapsum", x, k, t, TOL, 50).pow(2).sum() + tt.dftopk(x, 3, t).sum()

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(xa).backward()
    torch.compile(f, backend="aot_eager", fullgraph=True)(xb).backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_available(monkeypatch):
    x = torch.zeros(2, device=DEVICE)
    assert tt.available(x)
    assert not tt.available(x.double())
    monkeypatch.setenv("SOFTTOPK_DISABLE_TRITON", "1")
    assert not tt.available(x)
    monkeypatch.delenv("SOFTTOPK_DISABLE_TRITON")
    monkeypatch.setenv("SOFTTOPK_TRITON_ON_CPU", "0")
    assert not tt.available(torch.zeros(2))  # CPU tensors only with the testing switch
    monkeypatch.setattr(tt, "_TRITON_OK", False)  # as without triton
    assert not tt.available(x)


def test_family_tables_match_the_reference():
    """The kernels' host code keeps its own φ⁻¹ and sample factors (it must not import softtopk.threshold, which
    dispatches to it: an import cycle); they are the reference's."""
    p = torch.tensor([1e-6, 0.1, 0.5, 0.9, 1 - 1e-6], dtype=torch.float64)
    for name, fam in threshold.FAMILIES.items():
        assert tt._SAMPLE_FACTOR[name] == fam.sample_factor
        assert torch.allclose(tt._phi_inv(name, p), fam.phi_inv(p), rtol=1e-12, atol=0)
    imports = [n for n in ast.walk(ast.parse(Path(tt.__file__).read_text())) if isinstance(n, ast.ImportFrom)]
    assert not [n.module for n in imports if n.module and "threshold" in n.module and n.level > 0]


def test_import_does_not_import_triton():
    """``import softtopk.kernels`` imports no triton; without triton every module imports (pytest's doctest
    collection imports them all), nothing is available, and a kernel call raises the install hint."""
    code = """
import sys
import softtopk, softtopk.kernels
assert 'triton' not in sys.modules, 'triton imported'
sys.modules['triton'] = sys.modules['triton.language'] = None  # as if not installed
import torch
import softtopk.kernels._triton_kernels as K
from softtopk.kernels import triton_threshold as tt
assert K.triton is None and not tt.available(torch.zeros(1))
try:
    tt.threshold_mask('sigmoid', torch.zeros(1, 3), torch.ones(1, 1), torch.ones(1, 1), 1e-5, 50)
except ImportError as e:
    assert "pip install 'softtopk[gpu]'" in str(e), e
else:
    raise SystemExit('no ImportError')
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SOFTTOPK_TRITON_ON_CPU")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("method", ["sigmoid", "soft", "sparse", "lapsum", "dftopk"])
def test_public_operators_dispatch_to_the_kernels(method, monkeypatch):
    """``softtopk.topk_mask`` takes the kernels for a tensor they accept (here CPU, through the testing switch), with
    the same values and gradients as the reference; ``SOFTTOPK_DISABLE_TRITON=1`` and ``vmap`` take the reference."""
    calls = []
    for name in ("threshold_mask", "dftopk"):
        real = getattr(threshold.kernels, name)
        monkeypatch.setattr(threshold.kernels, name, lambda *a, real=real: calls.append(1) or real(*a))
    x = torch.randn(3, 9, generator=_gen(40), device=DEVICE)
    g = torch.randn(3, 9, generator=_gen(41), device=DEVICE)

    def run(xx):
        xx = xx.clone().requires_grad_()
        y = softtopk.topk_mask(xx, 2, method=method, temperature=0.7)
        y.backward(g)
        return y.detach(), xx.grad

    y, gx = run(x)
    assert calls
    with _torch_path():
        y_ref, gx_ref = run(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-4)
    calls.clear()
    torch.func.vmap(lambda r: softtopk.topk_mask(r, 2, method=method, temperature=0.7))(x)
    assert not calls  # the custom ops have no batching rule: vmap takes the torch path
