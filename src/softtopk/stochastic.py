"""Stochastic top-k operators.

``gumbel_topk``: relaxed Gumbel top-k subset sampling (Xie & Ermon 2019, "Reparameterizable subset
sampling via continuous relaxations").
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._utils import check_input, check_k, check_temperature, move_back, move_last, normalize_dim, row_param
from .baselines import hard_topk_mask

__all__ = ["gumbel_topk"]


def gumbel_topk(x: Tensor, k: int, *, temperature=1.0, hard: bool = False, dim: int = -1, generator=None) -> Tensor:
    r"""Relaxed k-subset sample from logits ``x`` (Xie & Ermon 2019).

    With :math:`\hat x = x + G`, :math:`G` i.i.d. Gumbel(0, 1), :math:`a^{(1)} = \hat x` and
    :math:`a^{(j+1)} = a^{(j)} + \log(1 - p^{(j)})`, :math:`p^{(j)} = \mathrm{softmax}(a^{(j)}/t)`, the output is
    :math:`\sum_{j=1}^k p^{(j)}`: entries summing to k
    (in [0, 1] at temperature 1; the paper's update can exceed 1 for t < 1). ``hard=True`` returns the k-hot mask of
    :math:`\hat x` in the forward pass with the relaxed sample's gradient (straight-through).
    O(k·n) time and memory per row (autograd keeps each round). ``generator`` makes the noise reproducible.
    """
    fn = "gumbel_topk"
    check_input(x, fn=fn)
    d = normalize_dim(x, dim, fn=fn)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{fn}: `k` must be an int, got {type(k).__name__}")
    check_k(k, x.shape[d], integer=True, fn=fn)
    check_temperature(temperature, fn=fn)
    if not isinstance(hard, bool):
        raise TypeError(f"{fn}: `hard` must be a bool, got {type(hard).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    cdtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xl = move_last(x, d).to(cdtype)
    t = row_param(temperature, x, d, name="temperature", fn=fn, dtype=cdtype)
    u = torch.rand(xl.shape, generator=generator, dtype=cdtype, device=x.device)
    tiny = torch.finfo(cdtype).tiny
    g = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))
    a = xl + g
    y = torch.zeros_like(a)
    p = torch.zeros_like(a)
    for _ in range(int(k)):
        a = a + torch.log((1 - p).clamp_min(tiny))
        p = torch.softmax(a / t, dim=-1)
        y = y + p
    if hard:
        h = hard_topk_mask((xl + g).detach(), int(k))
        y = h + (y - y.detach())
    return move_back(y.to(x.dtype), d)
