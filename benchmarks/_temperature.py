"""The benchmarks' temperatures -> softtopk's ``temperature=`` (the width convention).

The benchmarks specify every softtopk mask by its family's *internal* temperature t: the t of
sigmoid((x - tau)/t) (sigmoid, dftopk, ``threshold_mask``), the Laplace scale t (lapsum), the t of
clip(phi((x - tau)/t)) (sparse), the noise sigma (perturbed). That is the convention the peers and references
they are compared with use (the sigmoid bisection, entmax's x/t, the perturbed-optimizer reference at sigma = t,
...), and the one of every number measured before softtopk's ``temperature`` became the width of the transition on
the score axis (1/temperature = the mask's slope at y = 1/2). softtopk's own ``temperature`` is t / factor, with
the factors of the API table:

=====================  ===========================
family                 factor (internal t = T · factor)
=====================  ===========================
sigmoid, dftopk        1/4
lapsum                 1/2
sparse p=2             1
sparse p=4/3           3 · 2^(-2/3)
perturbed gaussian     1/sqrt(2 pi)
perturbed gumbel       log(2)/2
threshold_mask         1/4
=====================  ===========================

Two benchmark cases are not a (method, temperature) pair of ``topk_mask`` any more: ``"straight_through"`` is
``method="sigmoid", straight_through=True`` (backward: the sigmoid mask's gradient at the same t), and
``"soft"`` (SOFT top-k with epsilon = t, relative to max C) is ``method="soft", epsilon=t``; ``"hard"`` takes no
temperature.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FACTORS", "mask_kwargs", "threshold_temperature", "width"]

#: family -> internal temperature / ``temperature=``
FACTORS: dict[str, float] = {
    "sigmoid": 0.25,
    "dftopk": 0.25,
    "lapsum": 0.5,
    "sparse": 1.0,
    "sparse(p=4/3)": 3 * 2 ** (-2 / 3),
    "perturbed": 1 / math.sqrt(2 * math.pi),
    "perturbed(gumbel)": math.log(2) / 2,
    "threshold_mask": 0.25,
}


def _family(method: str, options: dict[str, Any]) -> str:
    if method == "sparse" and not math.isclose(float(options.get("p", 2)), 2.0):
        return "sparse(p=4/3)"
    if method == "perturbed" and options.get("noise", "gaussian") == "gumbel":
        return "perturbed(gumbel)"
    return method


def width(method: str, t: Any, **options: Any) -> Any:
    """``temperature=`` of ``topk_mask(method=method, **options)`` whose internal temperature is ``t``."""
    return t / FACTORS[_family(method, options)]


def threshold_temperature(t: Any) -> Any:
    """``temperature=`` of ``threshold_mask`` whose sigmoid((s - threshold)/t) has internal temperature ``t``."""
    return t / FACTORS["threshold_mask"]


def mask_kwargs(case: str, t: Any, **options: Any) -> dict[str, Any]:
    """Keyword arguments of ``softtopk.topk_mask`` (besides x and k) for the benchmark case ``case`` at internal
    temperature ``t``: the operator the benchmarks measured as ``topk_mask(method=case, temperature=t)`` before the
    width convention. ``case`` is a method name or ``"straight_through"``."""
    if case == "hard":
        return {"method": "hard", **options}
    if case == "straight_through":
        return {"method": "sigmoid", "straight_through": True, "temperature": width("sigmoid", t), **options}
    if case == "soft":
        return {"method": "soft", "epsilon": t, **options}
    return {"method": case, "temperature": width(case, t, **options), **options}
