"""Stochastic top-k operators: the perturbed optimizer and Gumbel top-k subset sampling.

- ``perturbed_mask`` (``topk_mask(..., method="perturbed")``): Berthet et al. 2020, "Learning with
  differentiable perturbed optimizers". Forward :math:`E[\\mathrm{hard}(x + \\sigma Z)]` by Monte Carlo, backward
  the perturbed-optimizer estimator, O(batch · n) memory (the noise is regenerated, not stored).
- ``gumbel_topk``: a relaxed k-hot sample of the Gumbel top-k subset distribution (Xie & Ermon 2019,
  "Reparameterizable subset sampling via continuous relaxations").
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._utils import (
    check_infinities,
    check_input,
    check_k,
    check_temperature,
    compute_dtype,
    move_back,
    move_last,
    normalize_dim,
    row_param,
)
from .baselines import hard_topk_mask
from .threshold import normalised_mask

__all__ = ["gumbel_topk", "perturbed_mask"]

NOISES = ("gaussian", "gumbel")
_SAMPLE_BLOCK = 1 << 20  # elements of noise drawn at once (samples × batch × n)


def _check_generator(generator: object, fn: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")


def _gumbel(shape, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """Standard Gumbel noise, −log E with E ~ Exp(1) (E clamped away from 0: finite samples)."""
    e = torch.empty(shape, dtype=dtype, device=device).exponential_(generator=gen)
    return e.clamp_min_(torch.finfo(dtype).tiny).log_().neg_()


def _noise_blocks(x: Tensor, n_samples: int, noise: str, seed: int):
    """The n_samples noise draws, in blocks of shape (s, *x.shape); the same sequence for the same seed."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    block = max(1, _SAMPLE_BLOCK // max(x.numel(), 1))
    done = 0
    while done < n_samples:
        s = min(block, n_samples - done)
        shape = (s,) + tuple(x.shape)
        if noise == "gaussian":
            yield torch.randn(shape, generator=gen, dtype=x.dtype, device=x.device)
        else:
            yield _gumbel(shape, gen, x.dtype, x.device)
        done += s


def _grad_log_density(z: Tensor, noise: str) -> Tensor:
    """∇ν(z) for the noise density μ(z) ∝ exp(−ν(z)): z (Gaussian), 1 − exp(−z) (Gumbel)."""
    return z if noise == "gaussian" else 1.0 - torch.exp(-z)


class _Perturbed(torch.autograd.Function):
    """y = E[hard_k(x + σZ)]; the estimator of Berthet et al. (2020, Prop. 3.1) for the vector-Jacobian product:

        ∂L/∂x = E[⟨g, hard_k(x + σZ)⟩ ∇ν(Z)] / σ
        ∂L/∂σ = E[⟨g, hard_k(x + σZ)⟩ (⟨Z, ∇ν(Z)⟩ − n)] / σ     (score function of the law of x + σZ)

    with the same noise as the forward pass (regenerated from its seed, never stored).
    """

    @staticmethod
    def forward(x, k, sigma, n_samples, noise, seed):
        y = torch.zeros_like(x)
        for z in _noise_blocks(x, n_samples, noise, seed):
            y += hard_topk_mask(torch.addcmul(x, sigma, z), k).sum(0)
        return y.div_(n_samples)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, k, sigma, n_samples, noise, seed = inputs
        ctx.save_for_backward(x, sigma, k if isinstance(k, Tensor) else None)
        ctx.k, ctx.n_samples, ctx.noise, ctx.seed = (None if isinstance(k, Tensor) else k), n_samples, noise, seed

    @staticmethod
    def backward(ctx, g):
        x, sigma, kt = ctx.saved_tensors
        k = kt if kt is not None else ctx.k
        need_x, need_sigma = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx = torch.zeros_like(x) if need_x else None
        gs = torch.zeros_like(sigma.expand(x.shape[:-1] + (1,))) if need_sigma else None
        n = x.shape[-1]
        for z in _noise_blocks(x, ctx.n_samples, ctx.noise, ctx.seed):
            h = hard_topk_mask(torch.addcmul(x, sigma, z), k)
            score = (h * g).sum(-1, keepdim=True)  # ⟨g, hard(x + σZ)⟩, (s, ..., 1)
            dnu = _grad_log_density(z, ctx.noise)
            if need_x:
                gx += (score * dnu).sum(0)
            if need_sigma:
                gs += (score * ((z * dnu).sum(-1, keepdim=True) - n)).sum(0)
        scale = sigma * ctx.n_samples
        if need_x:
            # padding (±inf scores) is always / never selected: its gradient is zero, not noise
            gx = torch.where(torch.isfinite(x), gx / scale, 0.0)
        if need_sigma:
            gs = gs / scale
        return gx, None, gs, None, None, None


def perturbed_mask(
    x: Tensor, k, sigma: Tensor, *, n_samples: int, noise: str, generator: torch.Generator | None
) -> Tensor:
    """The perturbed top-k mask of ``x`` (…, n) along the last dim; ``k`` an int or a long tensor (…, 1), ``sigma``
    (…, 1). Called by ``topk_mask(method="perturbed")``, which validates the arguments."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    return _Perturbed.apply(x, k, sigma, n_samples, noise, seed)


def parse_perturbed_options(n_samples: int = 100, noise: str = "gaussian", generator=None) -> dict:
    fn = "topk_mask"
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"{fn}: `n_samples` must be a positive int, got {n_samples!r}")
    if noise not in NOISES:
        raise ValueError(f"{fn}: unknown `noise`={noise!r}; choose one of {', '.join(NOISES)}")
    _check_generator(generator, fn)
    return {"n_samples": int(n_samples), "noise": noise, "generator": generator}


RELAXATIONS = ("softmax", "sigmoid")


def gumbel_topk(
    x: Tensor,
    k: int,
    *,
    temperature=1.0,
    hard: bool = False,
    relaxation: str = "softmax",
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A relaxed k-hot sample of the Gumbel top-k subset distribution of logits ``x`` (Xie & Ermon 2019).

    The hard sample is :math:`\mathrm{hard}_k(x + G)` with :math:`G` i.i.d. standard Gumbel: k draws from
    softmax(x) without replacement (Gumbel top-k trick). Its relaxation at temperature t:

    - ``relaxation="softmax"`` (the paper's): :math:`a^{(1)} = x + G`, :math:`p^{(j)} = \mathrm{softmax}(a^{(j)}/t)`,
      :math:`a^{(j+1)} = a^{(j)} + \log(1 - p^{(j)})`, output :math:`\sum_{j=1}^k p^{(j)}`. Nonnegative and sums
      to k, but an entry **can exceed 1** (e.g. n = k = 2). O(k · n) time and autograd memory per row.
    - ``relaxation="sigmoid"``: the LML mask of the perturbed logits, ``topk_mask(x + G, k, method="sigmoid",
      temperature=t)``: in [0, 1], sums to k, O(n). Same t → 0 limit.

    Both tend to the hard sample as t → 0. ``hard=True`` returns the hard sample in the forward pass with the
    relaxed sample's gradient (straight-through). ``generator`` makes the noise reproducible. ``-inf`` logits
    (padding) are never selected; a row with fewer than k finite logits raises.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([3.0, 1.0, 2.0, -1.0])
        >>> y = softtopk.gumbel_topk(x, 2, temperature=0.5, generator=torch.Generator().manual_seed(0))
        >>> round(float(y.sum()), 4)
        2.0
        >>> softtopk.gumbel_topk(x, 2, hard=True, generator=torch.Generator().manual_seed(0)).sum().item()
        2.0
    """
    fn = "gumbel_topk"
    finite = check_input(x, fn=fn)
    d = normalize_dim(x, dim, fn=fn)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{fn}: `k` must be an int, got {type(k).__name__}")
    check_k(k, x.shape[d], integer=True, fn=fn)
    k = int(k)
    check_temperature(temperature, fn=fn)
    if not isinstance(hard, bool):
        raise TypeError(f"{fn}: `hard` must be a bool, got {type(hard).__name__}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"{fn}: unknown `relaxation`={relaxation!r}; choose one of {', '.join(RELAXATIONS)}")
    _check_generator(generator, fn)
    cdtype = compute_dtype(x)
    xl = move_last(x, d).to(cdtype)
    if not finite:
        if bool((xl == float("inf")).any()):
            raise ValueError(f"{fn}: `x` contains +inf; logits must be finite or -inf (padding)")
        check_infinities(xl, k, fn=fn)
    if x.numel() == 0 or k == 0:
        return x * 0.0
    t = row_param(temperature, x, d, name="temperature", fn=fn, dtype=cdtype)
    gen = generator
    if gen is None:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,))))
    perturbed = xl + _gumbel(xl.shape, gen, cdtype, x.device)
    if relaxation == "sigmoid":
        y = normalised_mask("sigmoid", perturbed, torch.full_like(t, k), t)
    else:
        tiny = torch.finfo(cdtype).tiny
        a, p, y = perturbed, None, torch.zeros_like(perturbed)
        for _ in range(k):
            if p is not None:
                a = a + torch.log((1 - p).clamp_min(tiny))
            p = torch.softmax(a / t, dim=-1)
            y = y + p
    if hard:
        y = hard_topk_mask(perturbed.detach(), k) + (y - y.detach())
    return move_back(y.to(x.dtype), d)
