r"""SOFT sorted top-k (Xie et al. 2020, "Differentiable top-k with optimal transport"): entropic OT to k + 1 anchors.

The n scores, each of mass 1/n, are transported to the k + 1 anchors :math:`a = (k, k-1, \dots, 1, 0)`; the
anchors k, …, 1 take mass 1/n each and anchor 0 takes the rest, (n − k)/n. With the cost
:math:`C_{ji} = (x_i - a_j)^2 / \max C` and entropic regularisation ε, the plan

.. math::
    P = \arg\min_{P \ge 0,\ P^\top 1 = \mu,\ P 1 = \nu} \langle C, P\rangle
        + \varepsilon \sum_{ji} P_{ji} (\log P_{ji} - 1)

is :math:`P_{ji} = \exp((f_i + g_j - C_{ji})/\varepsilon)` and, in squared cost on a line, transports the largest
score to anchor k, the second largest to anchor k − 1, and so on, softly. Row j of :math:`\Gamma = n P_{0:k}` is
the soft indicator of the (j + 1)-th largest score: each row sums to 1, each column to at most 1.

The plan is found by log-domain Sinkhorn iterations and differentiated *implicitly*: no iteration is recorded,
the backward solves one (k + 1) × (k + 1) linear system per row (derivation at :class:`_SinkhornPlan`), so time
is O(n k²) and memory O(n k) whatever the number of iterations. The public entry point is
:func:`softtopk.topk_permutation` with ``method="sinkhorn"``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._prepare import SOLVERS, can_read_data

__all__ = ["SINKHORN_MAX_ITER", "sinkhorn_plan", "sorted_topk_plan"]

#: Sinkhorn iterations at most (eager mode stops at convergence).
SINKHORN_MAX_ITER = SOLVERS["sinkhorn"]["max_iter"]


#: Sinkhorn iterations before the solver switches to Newton steps on the anchor potentials (eager mode).
NEWTON_AFTER = 100


def _anchor_plan(beta: Tensor, ce: Tensor, log_n: float) -> Tensor:
    """The plan whose score marginals are exact (1/n each) for the anchor potentials ``beta`` (R, J, 1)."""
    return torch.exp(beta - ce - torch.logsumexp(beta - ce, dim=-2, keepdim=True) - log_n)


def _merits(beta: Tensor, ce: Tensor, nu: Tensor) -> tuple[Tensor, Tensor]:
    """(F(β), ‖ν − P1‖₁) per row, shapes (R, 1, 1): the semi-dual (accumulated in float64) and the residual."""
    n = ce.shape[-1]
    lse = torch.logsumexp(beta - ce, dim=-2, keepdim=True)
    col = torch.exp(beta - ce - lse - math.log(n)).sum(-1, keepdim=True)
    f = (nu.double() * beta.double()).sum(-2, keepdim=True) - lse.double().mean(-1, keepdim=True)
    return f, (nu - col).abs().sum(-2, keepdim=True)


def _newton(beta: Tensor, ce: Tensor, log_nu: Tensor, tol: float, steps: int) -> tuple[Tensor, int]:
    r"""Newton ascent on the semi-dual :math:`F(\beta) = \langle\nu, \beta\rangle - \frac1n\sum_i
    \log\sum_j e^{\beta_j - C_{ji}}`, concave in the J anchor potentials: gradient :math:`\nu - P1`, Hessian
    :math:`-(\mathrm{diag}(P1) - n P P^\top)` (the Schur complement of the backward). Each row backtracks its
    step: Armijo on F, or, once the predicted gain is below the resolution of F, a decrease of the residual
    ‖ν − P1‖₁. A row that can do neither stops. At most ``steps`` steps; returns β and the steps taken."""
    rows, njs, n = ce.shape
    log_n = math.log(n)
    nu = log_nu.exp().expand(rows, njs, 1)
    eye = torch.eye(njs, dtype=ce.dtype, device=ce.device)
    active = torch.ones((rows, 1, 1), dtype=torch.bool, device=ce.device)
    step = 0
    while step < steps:
        plan = _anchor_plan(beta, ce, log_n)
        col = plan.sum(-1, keepdim=True)
        resid = nu - col  # (R, J, 1): the gradient of F
        active = active & (resid.abs().amax(-2, keepdim=True) * n > 0.5 * tol)
        if not bool(active.any()):
            break
        step += 1
        cbar = col.mean(-2, keepdim=True)
        hess = torch.diag_embed(col.squeeze(-1)) - n * (plan @ plan.transpose(-1, -2))
        hess = hess + cbar + 1e3 * torch.finfo(ce.dtype).eps * cbar * eye
        direction = torch.linalg.solve_ex(hess, resid)[0]
        direction = torch.where(torch.isfinite(direction), direction, torch.zeros_like(direction))
        slope = (resid * direction).sum(-2, keepdim=True).double()  # > 0: an ascent direction
        f0, r0 = _merits(beta, ce, nu)
        flat = slope <= 64 * torch.finfo(torch.float64).eps * (f0.abs() + 1.0)  # F cannot resolve the gain
        tau = torch.ones((rows, 1, 1), dtype=torch.float64, device=ce.device)
        ok = torch.zeros_like(active)
        for _ in range(30):
            f1, r1 = _merits(beta + tau.to(ce.dtype) * direction, ce, nu)
            ok = torch.where(flat, r1 < r0, (f1 >= f0 + 1e-4 * tau * slope) & (slope > 0))
            if bool((ok | ~active).all()):
                break
            tau = torch.where(ok, tau, 0.5 * tau)
        active = active & ok
        beta = torch.where(active, beta + tau.to(ce.dtype) * direction, beta)
    return beta, step


def _newton_continuation(beta: Tensor, ce: Tensor, log_nu: Tensor, tol: float, steps: int) -> tuple[Tensor, int]:
    """:func:`_newton` with ε-scaling: solve at ε·2^m, m = M, …, 1, 0, each stage warm-started from the last
    (β doubles when ε halves), with M such that the largest cost of the first stage is at most 32 (a plan soft
    enough for Newton). Intermediate stages stop at a loose tolerance."""
    top = float(ce.amax()) if ce.numel() else 0.0
    stages = max(0, math.ceil(math.log2(top / 32.0))) if top > 32.0 else 0
    beta = beta / 2.0**stages
    used = 0
    for m in range(stages, -1, -1):
        scale = 2.0**m
        beta, taken = _newton(beta, ce / scale, log_nu, tol if m == 0 else max(tol, 1e-3), steps - used)
        used += taken
        if m:
            beta = beta * 2.0
    return beta, used


def _sinkhorn(ce: Tensor, log_nu: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int, float]:
    """Sinkhorn on a (R, J, n) cost ``ce`` (already divided by ε), uniform mass 1/n on the n scores, ``log_nu``
    (R or 1, J, 1) on the anchors. Returns the plan, the iterations run and the final error
    max_i |n (P 1)_i − 1| (the anchor marginals ν are exact after every iteration).

    Eager mode: log-stabilised scaling iterations (Schmitzer 2019): the plan is u ∘ K ∘ v with the kernel
    K = exp(α ⊕ β − C/ε) centred on the current log-potentials, so an iteration is two batched mat-vecs instead of
    two log-sum-exps; (u, v) are absorbed into (α, β) and K recomputed whenever they leave [e^-L, e^L]. If some
    row has not converged after ``NEWTON_AFTER`` iterations, the solve is finished in float64 by Newton steps on
    the anchor potentials with ε-scaling (:func:`_newton_continuation`), counted against ``max_iter``, then one
    Sinkhorn update. Under ``torch.compile`` or ``vmap``: plain log-domain iterations, ``max_iter`` of them."""
    rows, _, n = ce.shape
    eager = can_read_data(ce)
    log_n = math.log(n)
    beta = torch.zeros(ce.shape[:-1] + (1,), dtype=ce.dtype, device=ce.device)
    alpha = -log_n - torch.logsumexp(beta - ce, dim=-2, keepdim=True)  # (R, 1, n)
    beta = log_nu - torch.logsumexp(alpha - ce, dim=-1, keepdim=True)  # (R, J, 1)
    if not eager:
        for _ in range(max_iter - 1):
            alpha = -log_n - torch.logsumexp(beta - ce, dim=-2, keepdim=True)
            beta = log_nu - torch.logsumexp(alpha - ce, dim=-1, keepdim=True)
        return torch.exp(alpha + beta - ce), max_iter, math.nan
    nu = log_nu.exp()
    bound = 10.0 if ce.dtype in (torch.float32, torch.float16, torch.bfloat16) else 50.0
    kern = torch.exp(alpha + beta - ce)  # its anchor sums are ν: no column underflows
    u = torch.ones_like(alpha)
    v = torch.ones_like(beta)
    budget = min(max_iter, NEWTON_AFTER)
    err = math.inf
    it = 1
    while True:
        r = v.transpose(-1, -2) @ kern  # (R, 1, n): Σ_j v_j K_ji
        err = float((u * r * n - 1.0).abs().amax())
        if err <= tol or it >= budget:
            break
        it += 1
        u = (1.0 / n) / r
        v = nu / (kern @ u.transpose(-1, -2))  # (R, J, 1): the anchor marginals are exact again
        lu, lv = u.log(), v.log()
        if max(float(lu.abs().amax()), float(lv.abs().amax())) > bound:
            alpha, beta = alpha + lu, beta + lv
            kern = torch.exp(alpha + beta - ce)
            u, v = torch.ones_like(u), torch.ones_like(v)
    alpha, beta = alpha + u.log(), beta + v.log()
    if err <= tol or max_iter <= budget:
        return kern.mul_(u).mul_(v), it, err
    # Newton in float64: with potentials of size |C|/ε, float32 cannot resolve the marginals at small ε
    dtype = ce.dtype
    ce, log_nu = ce.double(), log_nu.double()
    beta, steps = _newton_continuation(beta.double(), ce, log_nu, tol, max_iter - budget)
    it += steps
    alpha = -log_n - torch.logsumexp(beta - ce, dim=-2, keepdim=True)
    beta = log_nu - torch.logsumexp(alpha - ce, dim=-1, keepdim=True)
    lse = torch.logsumexp(beta - ce, dim=-2, keepdim=True)
    err = float((alpha + lse + log_n).exp_().sub_(1.0).abs_().amax())
    return torch.exp(alpha + beta - ce).to(dtype), it, err


class _SinkhornPlan(torch.autograd.Function):
    @staticmethod
    def forward(ce, log_nu, tol, max_iter):
        plan, it, err = _sinkhorn(ce, log_nu, tol, max_iter)
        if can_read_data(ce) and not err <= tol:
            warnings.warn(
                f"topk_permutation(method='sinkhorn'): Sinkhorn stopped after max_iter={max_iter} iterations with a "
                f"marginal error max_i |n (P 1)_i - 1| = {err:.3g} > tol = {tol:.3g}; raise max_iter or epsilon",
                RuntimeWarning,
                stacklevel=4,
            )
        return plan

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # Implicit differentiation of the converged plan P = exp(f ⊕ g − Ce) (scores i, anchors j, ε folded
        # into Ce). Perturbing Ce: dP = P ∘ (df ⊕ dg − dCe) with the marginals kept, i.e. the linear system
        #     K [df; dg] = [(P∘dCe)ᵀ1 ; (P∘dCe)1],   K = [[diag(μ), Pᵀ], [P, diag(ν)]].
        # For a loss L with G = ∂L/∂P and H = G∘P, a = Hᵀ1 (per score), b = H1 (per anchor):
        #     dL = ⟨a, df⟩ + ⟨b, dg⟩ − ⟨H, dCe⟩ = Σ_ji P_ji (α_i + β_j − G_ji) dCe_ji,  K [α; β] = [a; b].
        # K is singular along (1, −1) only and [a; b] is orthogonal to it. Eliminating α = (a − Pᵀβ)/μ leaves the
        # (J × J) Schur complement  S β = b − P (a/μ),  S = diag(ν) − P diag(1/μ) Pᵀ,  S 1 = 0; S + ν̄ 11ᵀ is
        # positive definite and gives the solution with 1ᵀβ = 0. So  ∂L/∂Ce = P ∘ (α ⊕ β − G).  O(n J²) time.
        (plan,) = ctx.saved_tensors
        g = grad
        h = g * plan
        a = h.sum(-2)  # (R, n)
        b = h.sum(-1)  # (R, J)
        mu = plan.sum(-2)
        nu = plan.sum(-1)
        scaled = plan / mu.unsqueeze(-2)
        schur = torch.diag_embed(nu) - scaled @ plan.transpose(-1, -2)
        nbar = nu.mean(-1, keepdim=True).unsqueeze(-1)
        ridge = torch.finfo(plan.dtype).eps * nbar
        eye = torch.eye(nu.shape[-1], dtype=plan.dtype, device=plan.device)
        schur = schur + nbar + ridge * eye
        rhs = b - (scaled @ a.unsqueeze(-1)).squeeze(-1)
        beta = torch.linalg.solve(schur, rhs.unsqueeze(-1))  # (R, J, 1)
        alpha = (a - (plan.transpose(-1, -2) @ beta).squeeze(-1)) / mu  # (R, n)
        return plan * (alpha.unsqueeze(-2) + beta - g), None, None, None


def sinkhorn_plan(ce: Tensor, log_nu: Tensor, *, tol: float, max_iter: int = SINKHORN_MAX_ITER) -> Tensor:
    """The entropic OT plan of uniform scores (mass 1/n each) to anchors of log-masses ``log_nu`` (…, J, 1) for a
    cost ``ce`` (…, J, n) already divided by ε, with the implicit backward. Low level; see :func:`topk_permutation`."""
    return _SinkhornPlan.apply(ce, log_nu, tol, max_iter)


def sorted_topk_plan(x: Tensor, k: int, eps: Tensor, *, largest: bool, tol: float, max_iter: int) -> Tensor:
    """Γ (R, k, n) of SOFT sorted top-k for finite rows ``x`` (R, n) at ε (R, 1): row j of Γ softly indicates the
    (j + 1)-th largest entry (the (j + 1)-th smallest with ``largest=False``). See
    :func:`softtopk.topk_permutation` for the problem solved."""
    rows_, n = x.shape
    if k == 0:
        return x.new_zeros(rows_, 0, n)
    xl = x.reshape(-1, 1, n)
    rows = k + 1 if k < n else k  # anchors; no "rest" anchor when k = n
    j = torch.arange(rows, device=x.device, dtype=x.dtype)
    anchors = (k - j) if largest else j
    diff = xl - anchors.view(1, rows, 1)  # (R, J, n)
    # C / max C = (diff / max |diff|)²: scaled before squaring, so that |x| up to the dtype's range cannot overflow
    dmax = diff.abs().amax(dim=(-2, -1), keepdim=True)
    scaled = diff / torch.where(dmax > 0, dmax, torch.ones_like(dmax))
    cost = scaled * scaled
    nu = torch.full((rows,), 1.0 / n, dtype=torch.float64)
    if rows > k:
        nu[k] = (n - k) / n
    log_nu = torch.log(nu).to(device=x.device, dtype=x.dtype).view(1, rows, 1)
    plan = _SinkhornPlan.apply(cost / eps.reshape(-1, 1, 1), log_nu, float(tol), int(max_iter))
    return plan[:, :k, :] * n
