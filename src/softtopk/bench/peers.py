"""The peers: other libraries' top-k relaxations (imported lazily) and naive implementations written here.

A peer that cannot be imported is skipped with a one-line notice saying how to install it. The in-house peers are
what a user would write without the library:

* :func:`unrolled_sinkhorn`: SOFT (Xie et al. 2020) as in the paper's code: log-domain Sinkhorn iterations from
  the scores to the anchors, autograd through every iteration (O(iterations · n) memory);
* :func:`sigmoid_bisect_mask`: bisection on τ for Σ sigmoid((x − τ)/t) = k, autograd through the iterations (the
  gradient reaches τ only through the initial bracket: not the implicit gradient of the constraint).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import Tensor

from .cases import Case, Fn, tags

__all__ = ["PEER_PACKAGES", "first_line", "peer_cases", "sigmoid_bisect_mask", "unrolled_sinkhorn"]

#: peer module -> how to install it (shown when it cannot be imported)
PEER_PACKAGES = {
    "torchsort": "pip install torchsort (builds a C++ extension against the installed torch: needs a compiler)",
    "entmax": "pip install 'softtopk[peers]'",
    "ott": "pip install 'softtopk[peers]' (ott-jax and jax)",
    "diffsort": "pip install 'softtopk[peers]'",
    "difftopk": "pip install 'softtopk[peers]'",
}
SINKHORN_ITERS = 200  # the SOFT code's default max_iter
BISECT_ITERS = 50  # float32 resolution of tau from a bracket of width ~ 10
PEERS = tags("peers", "quality")


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


@contextlib.contextmanager
def _flush_denormal() -> Iterator[None]:
    """Denormal floats flushed to zero inside (CPU), as the unrolled Sinkhorn needs to run at a useful speed."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def unrolled_sinkhorn(x: Tensor, k: int, eps: float, sorted_: bool = False, iters: int = SINKHORN_ITERS) -> Tensor:
    """SOFT by ``iters`` log-domain Sinkhorn iterations, differentiated by autograd through all of them.

    Entropic OT (ε = ``eps``) of the n scores (mass 1/n each) to anchors with the cost (x − a)² / max C (max C
    detached, as in the paper's code). ``sorted_=False``: the anchors (1, 0) with masses (k/n, (n − k)/n); returns
    the mask n P[0] (SOFT top-k). ``sorted_=True``: the anchors (k, …, 1, 0) with masses (1/n, …, 1/n,
    (n − k)/n); returns n P[:k] of shape (rows, k, n) (SOFT sorted top-k, as ``topk_permutation(method="sinkhorn")``).
    """
    n = x.shape[-1]
    j = k if sorted_ else 1
    anchors = torch.arange(j, -1, -1, dtype=x.dtype, device=x.device)
    top = [-math.log(n)] * j if sorted_ else [math.log(k / n)]
    log_nu = torch.tensor(top + [math.log((n - k) / n)], dtype=x.dtype, device=x.device).unsqueeze(-1)
    cost = (x.unsqueeze(-2) - anchors.unsqueeze(-1)) ** 2  # (rows, j + 1, n)
    cost = cost / cost.amax(dim=(-2, -1), keepdim=True).detach()
    f = torch.zeros_like(x).unsqueeze(-2)
    g = torch.zeros(x.shape[:-1] + (j + 1, 1), dtype=x.dtype, device=x.device)
    for _ in range(iters):
        f = -eps * math.log(n) - eps * torch.logsumexp((g - cost) / eps, dim=-2, keepdim=True)
        g = eps * log_nu - eps * torch.logsumexp((f - cost) / eps, dim=-1, keepdim=True)
    plan = torch.exp((f + g - cost) / eps) * n
    return plan[..., :j, :] if sorted_ else plan[..., 0, :]


def sigmoid_bisect_mask(x: Tensor, k: int, t: float, iters: int = BISECT_ITERS) -> Tensor:
    """sigmoid((x − τ)/t) with τ from ``iters`` bisection steps on Σ sigmoid((x_i − τ)/t) = k, from the bracket
    [min x − 20 t, max x + 20 t]; autograd through every step."""
    lo = x.amin(dim=-1, keepdim=True) - 20 * t
    hi = x.amax(dim=-1, keepdim=True) + 20 * t
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = torch.sigmoid((x - mid) / t).sum(dim=-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return torch.sigmoid((x - (lo + hi) / 2) / t)


def _unrolled_mask(x: Tensor, k: int, t: float) -> Tensor:
    with _flush_denormal():
        return unrolled_sinkhorn(x, k, t)


def _inhouse_cases() -> list[Case]:
    return [
        Case("sinkhorn-unrolled", "in-house", PEERS, mask=_unrolled_mask, temperature=0.1, kind="peer",
             note=f"SOFT top-k as in the paper's code: {SINKHORN_ITERS} log-domain Sinkhorn iterations, autograd "
             "through all of them; epsilon 0.1 (SOFT's default); denormals flushed to zero"),
        Case("sinkhorn-unrolled (sorted, k=10)", "in-house", tags("permutahedron"), fixed_k=10, kind="peer",
             call=lambda x, k: unrolled_sinkhorn(x, k, 0.1, sorted_=True),
             note=f"SOFT sorted top-k (k + 1 anchors), {SINKHORN_ITERS} iterations unrolled by autograd: what "
             "topk_permutation(method='sinkhorn') replaces with an implicit backward"),
        Case("sigmoid-bisect", "in-house", PEERS, mask=sigmoid_bisect_mask, kind="peer",
             note=f"the naive sigmoid mask: {BISECT_ITERS} bisection steps on tau, autograd through them; "
             "t is the sigmoid's own (width 4t)"),
    ]  # fmt: skip


def _import(name: str) -> tuple[Any, str | None]:
    """(module, None) or (None, why). Import-time prints and warnings of the peer are swallowed."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - a broken install is reported like a missing one
        return None, first_line(e)


def _torchsort_cases(ts: Any) -> list[Case]:
    def mask(x: Tensor, k: int, t: float) -> Tensor:
        return (ts.soft_rank(x, regularization_strength=t) - (x.shape[-1] - k)).clamp(0.0, 1.0)

    pt = tags("permutahedron")
    return [
        Case("torchsort", "torchsort", PEERS, mask=mask, temperature=1.0, order=1.1, kind="peer",
             note="clamp(soft_rank(x) - (n - k), 0, 1), regularization_strength = t (its default 1)"),
        Case("torchsort.soft_rank", "torchsort", pt, order=1.1, kind="peer",
             call=lambda x, k: ts.soft_rank(x, regularization_strength=1.0)),
        Case("torchsort.soft_sort", "torchsort", pt, order=1.1, kind="peer",
             call=lambda x, k: ts.soft_sort(x, regularization_strength=1.0)),
    ]  # fmt: skip


def _entmax_cases(em: Any) -> list[Case]:
    note = "k · {}(x / t): sums to k and is sparse, but entries can exceed 1 (a simplex, not a capped simplex)"
    return [
        Case("entmax.sparsemax", "entmax", PEERS, order=1.1, kind="peer", note=note.format("sparsemax"),
             mask=lambda x, k, t: k * em.sparsemax(x / t, dim=-1)),
        Case("entmax.entmax15", "entmax", PEERS, kind="peer", note=note.format("entmax_bisect(alpha=1.5)"),
             mask=lambda x, k, t: k * em.entmax_bisect(x / t, alpha=1.5, dim=-1)),
    ]  # fmt: skip


def _network_cases(diffsort: Any, difftopk: Any) -> list[Case]:
    networks = importlib.import_module("diffsort.networks")
    cache: dict[tuple[int, str], Any] = {}

    def network(x: Tensor) -> Any:
        key = (x.shape[-1], str(x.device))
        if key not in cache:
            cache.clear()  # one at a time: O(n² log² n) memory
            cache[key] = networks.get_sorting_network("bitonic", x.shape[-1], x.device)
        return cache[key]

    def ds(x: Tensor, k: int, t: float) -> Tensor:
        return diffsort.sort(network(x), x, steepness=1.0 / t)[1][..., -k:].sum(-1)

    def dt(x: Tensor, k: int, t: float) -> Tensor:
        return difftopk.functional.topk(network(x), x, k, steepness=1.0 / t)[1].sum(-1)

    note = "bitonic network, {} summed; steepness = 1/t (its default 10)"
    out = []
    if diffsort is not None:
        out.append(Case("diffsort.bitonic", "diffsort", PEERS, mask=ds, temperature=0.1, order=3.0, heavy=True,
                        kind="peer", note=note.format("(n, n) soft permutation, its k largest outputs")))
    if difftopk is not None:
        out.append(Case("difftopk.bitonic", "difftopk", PEERS, mask=dt, temperature=0.1, order=3.0, heavy=True,
                        kind="peer", note=note.format("dense (n, k) top-k permutation")))
    return out  # fmt: skip


def _ott_case(mods: dict[str, Any], x64: bool) -> Case:
    jax, jnp, soft_sort = mods["jax"], mods["jax.numpy"], mods["ott.tools.soft_sort"]
    # ott's default implicit backward hands lineax a singular system for the two-anchor problem; its documented
    # remedy is a small ridge, passed here. The forward is ott's default.
    implicit = mods["ott.solvers.linear.implicit_differentiation"].ImplicitDiff(
        solver_kwargs={"ridge_kernel": 1e-6, "ridge_identity": 1e-6}
    )
    dtype = jnp.float64 if x64 else jnp.float32

    def arrays(*ts: Tensor) -> list[Any]:
        with jax.enable_x64(x64):
            return [jnp.asarray(t.detach().cpu().double().numpy(), dtype=dtype) for t in ts]

    def value_and_vjp(xj: Any, gj: Any, eps: Any, k: int) -> Any:
        y, vjp = jax.vjp(lambda z: soft_sort.topk_mask(z, k=k, epsilon=eps, implicit_diff=implicit), xj)
        return y, vjp(gj)[0]

    compiled: dict[tuple, Any] = {}

    def run(x: Tensor, k: int, t: float, g: Tensor) -> tuple[Any, Any]:
        xj, gj = arrays(x, g)
        key = (tuple(x.shape), k)
        with jax.enable_x64(x64):
            eps = jnp.asarray(t, dtype=dtype)
            if key not in compiled:  # epsilon traced: one compilation per shape
                compiled[key] = jax.jit(value_and_vjp, static_argnums=3).lower(xj, gj, eps, k).compile()
            return jax.block_until_ready(compiled[key](xj, gj, eps))

    def build(x: Tensor, k: int, g: Tensor) -> Fn:
        run(x, k, 1e-2, g)  # compiled here, outside the timing
        return lambda: run(x, k, 1e-2, g)

    def grad(x: Tensor, k: int, t: float, g: Tensor) -> tuple[Tensor, Tensor]:
        conv = lambda a: torch.from_numpy(jax.device_get(a).astype("float64")).to(x.dtype)  # noqa: E731
        return tuple(conv(a) for a in run(x, k, t, g))  # type: ignore[return-value]

    bits = "float64" if x64 else "float32"
    return Case(f"ott-jax {bits}", "ott-jax", PEERS, temperature=1e-2, memory_visible=False, build=build,
                grad=grad, heavy=True, kind="peer",
                note=f"ott.tools.soft_sort.topk_mask in {bits}, jit-compiled forward and vector-Jacobian product "
                "(compiled outside the timing), epsilon = t (its default 1e-2), implicit backward with ridge 1e-6; "
                "the input is converted from torch in every call; no memory figure (JAX allocations)")  # fmt: skip


def _ott_cases(notices: list[str], device: torch.device) -> list[Case]:
    mods = {}
    for name in ("jax", "jax.numpy", "ott.tools.soft_sort", "ott.solvers.linear.implicit_differentiation"):
        mods[name], why = _import(name)
        if why is not None:
            notices.append(f"peer ott-jax skipped: cannot import {name} ({why}); {PEER_PACKAGES['ott']}")
            return []
    if device.type != "cpu" and mods["jax"].default_backend() == "cpu":
        notices.append(f"peer ott-jax skipped: JAX has no {device.type} backend here")
        return []
    return [_ott_case(mods, True), _ott_case(mods, False)]


def peer_cases(device: torch.device, notices: list[str], wanted: Callable[[str], bool]) -> list[Case]:
    """Every peer that imports here (``wanted(source)`` false: not even imported), the in-house ones included;
    a notice for each one skipped."""

    def peer(name: str) -> Any:
        module, why = _import(name) if wanted(name) else (None, None)
        if why is not None:
            notices.append(f"peer {name} skipped: cannot import it ({why}); {PEER_PACKAGES[name]}")
        return module

    cases = _inhouse_cases()
    if (ts := peer("torchsort")) is not None:
        cases += _torchsort_cases(ts)
    if (em := peer("entmax")) is not None:
        cases += _entmax_cases(em)
    if wanted("ott-jax"):
        cases += _ott_cases(notices, device)
    diffsort, difftopk = peer("diffsort"), peer("difftopk")
    if difftopk is not None and diffsort is None:
        notices.append("peer difftopk skipped: its sorting networks come from diffsort, which is missing")
        difftopk = None
    if diffsort is not None or difftopk is not None:
        cases += _network_cases(diffsort, difftopk)
    return cases
