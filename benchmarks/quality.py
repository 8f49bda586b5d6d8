"""How good each relaxation is: distance to the hard mask, |sum y - k|, sparsity, gradient agreement.

For every case and temperature t, on ``x = randn(rows, n)`` (float32, seeded) with k = n / 10:

* ``dist``: ||y - h||_1 / (2k), h the hard top-k mask: 0 for the hard mask, 1 for a mask disjoint from it
  (averaged over rows);
* ``sum_err``: |sum_i y_i - k| (averaged over rows);
* ``exact``: the fraction of entries that are exactly 0 or 1 (sparsity);
* ``cos``: the cosine between the gradient of <g, y(x)> (g a fixed random vector) and the perturbed-optimizer
  gradient of the same at the same temperature (Berthet et al. 2020, Gaussian noise, ``ref_samples`` samples),
  averaged over rows. The reference is E[(<g, h(x + tZ)> - <g, h(x)>) Z] / t, the perturbed-optimizer estimator
  with the unperturbed value as control variate (same expectation, lower variance); ``ref_self_cos`` is the
  cosine between its two halves, the noise floor of the comparison.

:func:`mask_curves` computes every case's mask on one sorted input for the masks plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .peers import Case, first_line

__all__ = ["QualityRow", "hard_mask", "mask_curves", "perturbed_reference", "quality"]


@dataclass
class QualityRow:
    case: str
    source: str
    temperature: float
    dist: float | None
    sum_err: float | None
    exact: float | None
    cos: float | None
    ref_self_cos: float
    error: str | None = None


def hard_mask(x: Tensor, k: int) -> Tensor:
    """The exact 0/1 top-k mask along the last dimension."""
    return torch.zeros_like(x).scatter_(-1, torch.topk(x, k, dim=-1).indices, 1.0)


def perturbed_reference(x: Tensor, k: int, t: float, g: Tensor, samples: int, seed: int = 1234) -> tuple[Tensor, float]:
    """The perturbed-optimizer gradient of <g, E[h(x + tZ)]> (Gaussian Z, control variate) and its self-cosine.

    Computed in float64 in chunks of samples; returns (gradient (rows, n), cosine between the two halves).
    """
    x64, g64 = x.detach().double(), g.detach().double()
    rows, n = x64.shape
    base = (g64 * hard_mask(x64, k)).sum(-1)  # (rows,)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    chunk = max(1, (1 << 21) // (rows * n))
    halves = [torch.zeros_like(x64), torch.zeros_like(x64)]
    done = 0
    while done < samples:
        s = min(chunk, samples - done)
        z = torch.randn((s, rows, n), generator=gen, dtype=torch.float64, device=x.device)
        v = (g64 * hard_mask(x64 + t * z, k)).sum(-1) - base  # (s, rows)
        contrib = (v.unsqueeze(-1) * z).sum(0)
        # samples [0, samples/2) go to the first half, the rest to the second (chunks split at the boundary)
        first = max(0, min(s, samples // 2 - done))
        if first == s:
            halves[0] += contrib
        elif first == 0:
            halves[1] += contrib
        else:
            halves[0] += (v[:first].unsqueeze(-1) * z[:first]).sum(0)
            halves[1] += (v[first:].unsqueeze(-1) * z[first:]).sum(0)
        done += s
    grad = (halves[0] + halves[1]) / (samples * t)
    return grad, _cos(halves[0], halves[1]) or 0.0


def _cos(a: Tensor, b: Tensor) -> float | None:
    """Mean over rows of the cosine between a and b, over the rows where both are nonzero; None if there is none."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    ok = (na > 0) & (nb > 0) & torch.isfinite(na) & torch.isfinite(nb)
    if not bool(ok.any()):
        return None
    return float(((a * b).sum(-1)[ok] / (na[ok] * nb[ok])).mean())


def quality(
    cases: list[Case],
    temperatures: list[float],
    *,
    rows: int,
    n: int,
    k: int,
    ref_samples: int,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
    step: Callable[[], None] = lambda: None,
) -> list[QualityRow]:
    """The quality metrics of every case at every temperature (cases that fail get a row with ``error``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen).to(device)
    g = torch.randn(rows, n, generator=gen).to(device)
    h = hard_mask(x, k)
    out = []
    for t in temperatures:
        ref, self_cos = perturbed_reference(x, k, t, g, ref_samples)
        for case in cases:
            try:
                y, grad = case.mask_and_grad(x, k, t, g)
            except Exception as e:  # noqa: BLE001 - a peer failing at this temperature is a result, not a crash
                out.append(QualityRow(case.name, case.source, t, None, None, None, None, self_cos, first_line(e)))
                continue
            y = y.to(x.dtype)
            finite = bool(torch.isfinite(y).all())
            dist = float(((y - h).abs().sum(-1) / (2 * k)).mean()) if finite else math.nan
            sum_err = float((y.sum(-1) - k).abs().mean()) if finite else math.nan
            exact = float(((y == 0) | (y == 1)).double().mean())
            cos = _cos(grad, ref) if bool(torch.isfinite(grad).all()) else math.nan
            out.append(QualityRow(case.name, case.source, t, dist, sum_err, exact, cos, self_cos))
        log(f"# quality t={t:g}: reference self-cosine {self_cos:.3f}")
        step()
    return out


def mask_curves(
    cases: list[Case], temperatures: list[float], *, n: int, k: int, device: torch.device, seed: int = 0
) -> dict:
    """Every case's mask on one input sorted in decreasing order, at each temperature (for the masks plot)."""
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(1, n, generator=gen).sort(dim=-1, descending=True).values.to(device)
    g = torch.zeros_like(x)
    curves: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        curves[case.name] = {}
        for t in temperatures:
            try:
                y, _ = case.mask_and_grad(x, k, t, g)
                curves[case.name][f"{t:g}"] = [float(v) for v in y.reshape(-1).cpu()]
            except Exception:  # noqa: BLE001, S112 - the plot leaves the panel's curve out
                continue
    return {"x": [float(v) for v in x.reshape(-1).cpu()], "k": k, "temperatures": temperatures, "masks": curves}
