"""Stochastic top-k operators: the perturbed optimizer and Gumbel top-k subset sampling.

- ``perturbed_mask`` (``topk_mask(..., method="perturbed")``): Berthet et al. 2020, "Learning with
  differentiable perturbed optimizers". Forward :math:`E[\\mathrm{hard}(x + \\sigma Z)]` by Monte Carlo, backward
  the perturbed-optimizer estimator, O(batch · n) memory (the noise is regenerated, not stored).
- ``relaxed_subset`` (``gumbel_topk``): a relaxed k-hot sample of the Gumbel top-k subset distribution (Xie &
  Ermon 2019, "Reparameterizable subset sampling via continuous relaxations").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .hard import hard_topk_mask

__all__ = ["NOISES", "gumbel_noise", "perturbed_mask", "relaxed_subset"]

NOISES = ("gaussian", "gumbel")
_SAMPLE_BLOCK = 1 << 20  # elements of noise drawn at once (samples × batch × n)


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
    (…, 1) the noise scale. Called by ``topk_mask(method="perturbed")``, which validates the arguments."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    return _Perturbed.apply(x, k, sigma, n_samples, noise, seed)


def gumbel_noise(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """Standard Gumbel noise of ``shape``; a generator seeded from torch's global one when None."""
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return _gumbel(shape, generator, dtype, device)


def relaxed_subset(perturbed: Tensor, k: int | Tensor, t: Tensor) -> Tensor:
    r"""Xie & Ermon's relaxed k-hot sample from Gumbel-perturbed logits (..., n): :math:`\sum_{j<k} p^{(j)}` with
    :math:`p^{(j)} = \mathrm{softmax}(a^{(j)}/t)`, :math:`a^{(j+1)} = a^{(j)} + \log(1 - p^{(j)})`. ``k`` an int or
    a (..., 1) integer tensor (rows stop adding at their own k)."""
    steps = k if isinstance(k, int) else (int(k.max()) if k.numel() else 0)
    a, p, y = perturbed, None, torch.zeros_like(perturbed)
    out = perturbed == -math.inf  # padding, then the items taken whole
    for j in range(steps):
        if p is not None:
            # an item whose p rounds to 1 is taken whole and leaves the race (log(1 - p) clamped at log(tiny) would
            # let it win again once the logit gaps exceed -log(tiny)·t); the others get log(1 - p)
            taken = p >= 1
            out = out | taken
            a = a + torch.log1p(-torch.where(taken, 0.0, p))
        z = torch.where(out, -math.inf, a / t)
        # a row with nothing left has exhausted its k (it adds nothing more): a constant, not NaN
        z = torch.where(out.all(-1, keepdim=True), 0.0, z)
        p = torch.softmax(z, dim=-1)
        y = y + (p if isinstance(k, int) else p * (k > j).to(p.dtype))
    return y
