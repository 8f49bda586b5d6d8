"""How close each relaxation is to the hard top-k, and how its gradient agrees with the perturbed optimizer's.

On ``x = randn(rows, n)`` (float32, seeded), k = n/10, for every case with a mask and every temperature t (each
operator's own parameter):

* ``dist``: ‖y − h‖₁ / 2k, h the hard top-k mask: 0 for the hard mask, 1 for a mask disjoint from it;
* ``sum_err``: |Σᵢ yᵢ − k|; ``exact``: the fraction of entries exactly 0 or 1 (sparsity);
* ``cos``: the cosine between the gradient of ⟨g, y(x)⟩ (g a fixed random vector) and the perturbed optimizer's
  gradient of the same at noise σ = t (Berthet et al. 2020; Gaussian, ``ref_samples`` samples, the unperturbed value
  as control variate); ``ref_self_cos``, the cosine between its two halves, is the noise floor of the comparison.

Every metric is a mean over rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from .cases import Case
from .peers import first_line

if TYPE_CHECKING:
    from .run import Config

__all__ = ["hard_mask", "perturbed_reference", "quality"]


def hard_mask(x: Tensor, k: int) -> Tensor:
    """The exact 0/1 top-k mask along the last dimension."""
    return torch.zeros_like(x).scatter_(-1, torch.topk(x, k, dim=-1).indices, 1.0)


def perturbed_reference(x: Tensor, k: int, t: float, g: Tensor, samples: int, seed: int = 1234) -> tuple[Tensor, float]:
    """The perturbed-optimizer gradient of ⟨g, E[h(x + tZ)]⟩ in float64, and the cosine between its two halves."""
    x64, g64 = x.detach().double(), g.detach().double()
    base = (g64 * hard_mask(x64, k)).sum(-1, keepdim=True)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    chunk = max(1, (1 << 21) // x64.numel())
    halves = [torch.zeros_like(x64), torch.zeros_like(x64)]
    for half in range(2):
        done = 0
        while done < samples // 2:
            s = min(chunk, samples // 2 - done)
            z = torch.randn((s, *x64.shape), generator=gen, dtype=torch.float64, device=x.device)
            v = (g64 * hard_mask(x64 + t * z, k)).sum(-1, keepdim=True) - base
            halves[half] += (v * z).sum(0)
            done += s
    grad = (halves[0] + halves[1]) / (2 * (samples // 2) * t)
    return grad, cosine(halves[0], halves[1]) or 0.0


def cosine(a: Tensor, b: Tensor) -> float | None:
    """Mean over rows of the cosine of a and b, over the rows where both are nonzero and finite."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    ok = (na > 0) & (nb > 0) & torch.isfinite(na) & torch.isfinite(nb)
    return float(((a * b).sum(-1)[ok] / (na[ok] * nb[ok])).mean()) if bool(ok.any()) else None


def _metrics(case: Case, x: Tensor, k: int, t: float, g: Tensor, h: Tensor, ref: Tensor) -> dict[str, Any]:
    try:
        y, grad = case.mask_and_grad(x, k, t, g)
    except Exception as e:  # noqa: BLE001 - a peer failing at a temperature is a result
        return {"error": first_line(e)}
    y = y.to(x.dtype)
    if not bool(torch.isfinite(y).all()):
        return {"error": "non-finite mask"}
    return {
        "dist": float(((y - h).abs().sum(-1) / (2 * k)).mean()),
        "sum_err": float((y.sum(-1) - k).abs().mean()),
        "exact": float(((y == 0) | (y == 1)).double().mean()),
        "cos": cosine(grad, ref) if bool(torch.isfinite(grad).all()) else math.nan,
    }


def quality(cases: list[Case], cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The metrics of every case at every temperature of ``cfg``: {"setup": ..., "rows": [...]}."""
    rows, n = cfg.quality_rows, cfg.quality_n
    k = max(n // 10, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(rows, n, generator=gen).to(cfg.device)
    g = torch.randn(rows, n, generator=gen).to(cfg.device)
    h = hard_mask(x, k)
    out = []
    for t in cfg.temperatures:
        ref, self_cos = perturbed_reference(x, k, t, g, cfg.ref_samples)
        for case in cases:
            m = _metrics(case, x, k, t, g, h, ref)
            out.append({"case": case.name, "source": case.source, "temperature": t, "ref_self_cos": self_cos, **m})
        log(f"# quality t={t:g}: reference self-cosine {self_cos:.3f}")
    setup = {"rows": rows, "n": n, "k": k, "ref_samples": cfg.ref_samples, "temperatures": list(cfg.temperatures)}
    return {"setup": setup, "rows": out}
