r"""Top-k over a dimension sharded across the ranks of a ``torch.distributed`` process group.

Each rank holds a slice of the selection dimension (slices may differ in length; their concatenation in rank order
is the full dimension). The threshold masks make this cheap: only the threshold τ is global. The root-finder starts
from the threshold of a strided sample of about 2048 scores per row (gathered once), then Newton runs on the
entries near that start (a band: the others contribute below e^-40 each) and exchanges two scalars per row per step
(:math:`\sum_i y_i` and :math:`\sum_i \varphi'`); the implicit backward exchanges two more (four with a
temperature gradient). The shards themselves never travel. DFTopK and the hard top-k exchange each rank's local top
candidates (O(k · world) values per row). Sums are all-gathered and added in rank order, so that every rank takes
the same solver branches and gets bit-identical gradients for the replicated arguments.

Semantics of the gradient: the global loss is the **sum of the ranks' losses**, each of them a function of its own
shard of the result (for :func:`topk_mask`) or of the replicated result (for :func:`topk`, where every rank holds
the same ``values`` and ``weights`` and computes the same loss). The backward then gives every rank the gradient of
that global loss with respect to its own shard, and the full gradient with respect to ``k`` and ``temperature``
(replicated arguments) on every rank.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import threshold
from .._prepare import Rows, check_bool, check_input, move_back, normalize_dim, prepare, solver_options
from .._registry import internal_temperature, lookup, parse, uses_temperature
from ..hard import with_soft_gradient
from ..masks import TopK

__all__ = ["SHARDED_METHODS", "ShardedTopK", "Traffic", "topk", "topk_mask", "traffic"]

#: The methods of the sharded operators (the threshold family, DFTopK and the hard top-k).
SHARDED_METHODS: tuple[str, ...] = ("hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum")
_META = 12  # ints of a rank's description: ndim, dtype, shard length, then the batch shape (padded) and its hash
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Shards(NamedTuple):
    """Where each rank's slice lies in the full dimension (the same on every rank)."""

    group: object
    rank: int
    world: int
    offset: int  # this rank's first global index
    length: int  # the global length n
    lengths: tuple  # every rank's shard length, in rank order


def _group(group: Any, fn: str) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"softtopk.distributed.{fn}: the default process group is not initialised; call "
            "torch.distributed.init_process_group(...) first (gloo on CPU, nccl on GPUs), e.g. under torchrun"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _shards(x: Tensor, d: int, group: object, fn: str) -> Shards:
    """Exchanges each rank's shape and dtype (one all-gather of a few ints) and checks that they agree."""
    rank, world = _group(group, fn)
    batch = x.shape[:d] + x.shape[d + 1 :]
    head = [x.dim(), _DTYPES.index(x.dtype), x.shape[d]]
    shape = list(batch[: _META - 4]) + [-1] * max(0, _META - 4 - len(batch))
    meta = torch.tensor(head + shape + [hash(tuple(batch)) % (1 << 61)], dtype=torch.long, device=x.device)
    table = torch.stack(_gather(meta, group, world)).cpu()
    ours = torch.cat([table[:, :2], table[:, 3:]], 1)  # all but the shard length must agree
    if not bool((ours == ours[rank]).all()):
        raise ValueError(
            f"softtopk.distributed.{fn}: the ranks' shards disagree in batch shape or dtype (every rank must pass a "
            f"tensor with the same shape except along `dim`, and the same dtype); this rank has shape "
            f"{tuple(x.shape)} along dim={d} and dtype {x.dtype}"
        )
    lengths = table[:, 2].tolist()
    return Shards(group, rank, world, int(sum(lengths[:rank])), int(sum(lengths)), tuple(int(n) for n in lengths))


@dataclass
class Traffic:
    """What this rank's calls of the sharded operators exchanged: collectives, and the bytes of the payloads
    this rank contributed (an all-reduce or all-gather of a tensor of b bytes counts b)."""

    calls: int = 0
    bytes: int = 0


_TRAFFIC: list[Traffic] = []  # the counters of the open `traffic()` blocks


@contextlib.contextmanager
def traffic() -> Iterator[Traffic]:
    """Counts the collectives of the sharded operators called inside the block (forward and backward), on this rank.

    Example:
        >>> import softtopk.distributed as sd
        >>> with sd.traffic() as sent:
        ...     pass  # y = sd.topk_mask(shard, k); y.sum().backward()
        >>> sent.calls, sent.bytes
        (0, 0)
    """
    counter = Traffic()
    _TRAFFIC.append(counter)
    try:
        yield counter
    finally:
        _TRAFFIC.remove(counter)


def _count(t: Tensor) -> None:
    for counter in _TRAFFIC:
        counter.calls += 1
        counter.bytes += t.numel() * t.element_size()


def _all_max(t: Tensor, shards: Shards) -> Tensor:
    _count(t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shards.group)
    return t


def _gather(t: Tensor, group: Any, world: int) -> list[Tensor]:
    """Every rank's ``t``, in rank order (counted by :func:`traffic`)."""
    t = t.contiguous()
    _count(t)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return parts


def _all_sum(t: Tensor, shards: Shards) -> Tensor:
    """The sum over ranks, bit-identical on every rank: gathered, then added in rank order. (An all-reduce may add
    in a different order on each rank; the solver's branches, taken on these sums, must agree across ranks, and
    the gradients of replicated arguments must be equal.)"""
    return torch.stack(_gather(t, shards.group, shards.world)).sum(0)


def _all_gather_cat(t: Tensor, shards: Shards) -> Tensor:
    """The ranks' (R, m) tensors side by side: (R, world · m)."""
    return torch.cat(_gather(t, shards.group, shards.world), -1)


# --------------------------------------------------------------------------------------------------------------
# The threshold family: a safeguarded Newton on the global S(τ) = Σ_ranks Σ_i φ((x_i − c)/t − τ) = k.
# --------------------------------------------------------------------------------------------------------------
def _global_stats(x: Tensor, shards: Shards):
    """(min, max) over the finite entries of each row, counts of entries > −inf and of +inf: all global, (R, 1)."""
    if x.shape[-1] == 0:  # an empty shard
        big, small = x.new_full((x.shape[0], 1), -math.inf), x.new_full((x.shape[0], 1), math.inf)
        counts = x.new_zeros((x.shape[0], 2))
    else:
        big, small = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        if bool(torch.isfinite(big).all() & torch.isfinite(small).all()):  # the common case: two passes
            counts = x.new_tensor([float(x.shape[-1]), 0.0]).expand(x.shape[0], 2)
        else:
            finite = torch.isfinite(x)
            big = torch.where(finite, x, -math.inf).amax(-1, keepdim=True)
            small = torch.where(finite, x, math.inf).amin(-1, keepdim=True)
            counts = torch.stack([(x > -math.inf).sum(-1), (x == math.inf).sum(-1)], -1).to(x.dtype)
    ext = _all_max(torch.cat([big, -small], -1), shards)
    counts = _all_sum(counts, shards)
    return -ext[:, 1:], ext[:, :1], counts[:, :1], counts[:, 1:]


_SAMPLE = 2048  # entries per row of the warm start's strided sample (over all the shards)
#: After the warm start, Newton runs on the entries within _BAND units of t below the start (the others contribute
#: at most e^-(_BAND - _MARGIN) each while τ stays _MARGIN above the cut; a row whose τ does not is solved again
#: on all its entries).
_BAND, _MARGIN = 60.0, 20.0


def _newton(family, evaluate, k, n_live, tau, lo, hi, done, tol_k, max_iter, same):
    """Safeguarded Newton on S(τ) = k for the threshold in units of t, as the single-process solver: a bracket
    [lo, hi] with S(lo) ≥ k ≥ S(hi), bisection when a step leaves it. ``evaluate(τ)`` returns the (R, 1) float64
    sums (S, Σφ'); every branch is taken on them, so ranks that see the same sums take the same steps. A row stops
    within tolerance, or when ``same(τ, new)`` says the step no longer moves the threshold the data sees (its
    compute dtype's resolution). Returns (τ, S, Σφ', ok)."""
    logit_k = torch.log(k / (n_live - k)) if family.log_newton else None
    exact = done  # rows solved in advance (degenerate)
    for it in range(max_iter + 1):
        s, dsum = evaluate(tau)
        resid = s - k
        ok = exact | (resid.abs() <= tol_k)
        done = done | ok
        if it == max_iter or bool(done.all()):
            break
        lo, hi = torch.where(resid > 0, tau, lo), torch.where(resid < 0, tau, hi)
        if family.log_newton:  # Newton on logit(S/n): linear in τ in both exponential tails
            rest = n_live - s
            step = (torch.log(s / rest) - logit_k) * (s * rest) / (dsum * n_live)
        else:
            step = resid / dsum
        new = tau + step
        new = torch.where((new > lo) & (new < hi), new, 0.5 * lo + 0.5 * hi)
        done = done | same(tau, new)  # stalled at the data's precision (ok says whether within tol)
        tau = torch.where(done, tau, new)
    return tau, s, dsum, ok


class _Evaluator:
    """S(τ) and Σφ' of this rank's rows at a threshold, y = clip(φ((x − c)/t − τ), 0, 1) left in ``buf``: in the
    compute dtype, in place on two buffers (no allocation per step), the sums accumulated in float64."""

    def __init__(self, family, x, c, t):
        self.family, self.x, self.c, self.t = family, x, c, t
        self.rt = t.reciprocal().to(x.dtype)
        self.buf, self.scratch = torch.empty_like(x), torch.empty_like(x)

    def same(self, tau: Tensor, new: Tensor) -> Tensor:
        """Whether two thresholds (units of t) are the same threshold in the data's dtype."""
        return (self.c + tau * self.t).to(self.x.dtype) == (self.c + new * self.t).to(self.x.dtype)

    def local(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        threshold = (self.c + tau * self.t).to(self.x.dtype)  # x − threshold: exact near it (Sterbenz)
        torch.sub(self.x, threshold, out=self.buf).mul_(self.rt)
        dsum = self.family.phi_(self.buf, self.scratch).double()
        return self.buf.sum(-1, keepdim=True).double(), dsum  # torch's cascade sum: float64 casts would copy


def _warm_start(family, x, c, t, k, n_live, lo, hi, tau, done, shards: Shards):
    """τ of the same problem on a strided sample of about ``_SAMPLE`` entries per row over all the shards (one
    all-gather of O(rows · _SAMPLE) scores), k scaled, solved loosely and locally: the global Newton then starts
    within a few percent of the solution and takes a few exchanges instead of tens."""
    stride = max(1, shards.length // _SAMPLE)
    m = max(-(-n // stride) for n in shards.lengths)
    local = x[:, ::stride]
    pad = x.new_full((x.shape[0], m - local.shape[-1]), -math.inf)
    sample = _all_gather_cat(torch.cat([local, pad], -1), shards)
    live = (sample > -math.inf).sum(-1, keepdim=True).double()
    k_s = (k * live / n_live).clamp(1e-3, None).minimum(live - 1e-3)
    sample_eval = _Evaluator(family, sample, c, t)
    tau_s = _newton(family, sample_eval.local, k_s, live, tau, lo, hi, done | (live < 2), 1e-3 * k_s.clamp(min=1.0),
                    30, sample_eval.same)[0]  # fmt: skip
    return torch.where(torch.isfinite(tau_s), tau_s.clamp(lo, hi), tau)


def _band(x: Tensor, floor: Tensor) -> Tensor:
    """The entries of each row above ``floor`` (R, 1), packed to the left, the rows padded with −inf."""
    keep = x > floor.to(x.dtype)
    values = x[keep]  # row-major: row by row
    counts = keep.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    out = x.new_full((x.shape[0], width), -math.inf)
    out[rows, torch.arange(values.numel(), device=x.device) - starts[rows]] = values
    return out


def _solve(family, x, k, t, shards: Shards, tol: float, max_iter: int):
    """(y, threshold, Σφ') of the sharded mask y = clip(φ((x − threshold)/t), 0, 1), the threshold and Σφ' global
    (R, 1) float64; x (R, n_r) in the compute dtype, k and t (R, 1) float64."""
    xmin, xmax, n_live, n_pinf = _global_stats(x, shards)
    if bool((n_live < k).any()) or bool((n_pinf > k).any()):
        raise ValueError(
            "softtopk.distributed.topk_mask: a row has fewer than k entries above -inf (padding) or more than k "
            "equal to +inf, over all the shards"
        )
    xmin, xmax, n_live, n_pinf = (a.double() for a in (xmin, xmax, n_live, n_pinf))
    k_fin = k - n_pinf
    none, full = k_fin <= 0, k >= n_live
    degenerate = none | full
    c = torch.where(torch.isfinite(xmax), xmax, 0.0)  # the frame: thresholds as c + τ t, τ of moderate size
    zp = family.phi_inv((k_fin / (n_live - n_pinf)).clamp(1e-30, 1.0 - 1e-16))
    big = torch.finfo(torch.float64).max
    lo = torch.where(degenerate, 0.0, ((xmin - c) / t - zp).clamp(min=-big))
    hi = torch.where(degenerate, 0.0, (-zp).clamp(max=big))
    tau = 0.5 * lo + 0.5 * hi
    ev = _Evaluator(family, x, c, t)
    tol_k = tol * k.clamp(min=1.0)

    def exchanged(evaluator):
        def evaluate(tau):
            s, dsum = evaluator.local(tau)
            sums = _all_sum(torch.cat([s, dsum], -1), shards)  # the one exchange of a step
            return sums[:, :1], sums[:, 1:]

        return evaluate

    redo = ~degenerate
    if shards.length > 8 * _SAMPLE:
        tau = _warm_start(family, x, c, t, k, n_live, lo, hi, tau, degenerate, shards)
        cut = torch.where(degenerate, -math.inf, tau - _BAND)  # the band: entries with (x − c)/t > cut
        band = _Evaluator(family, _band(x, c + cut * t), c, t)  # this rank's choice; the exchanges are the same
        tau, s, dsum, ok = _newton(family, exchanged(band), k, n_live, tau, lo, hi, degenerate, tol_k, max_iter,
                                   ev.same)  # fmt: skip
        redo = ~ok | (tau < cut + _MARGIN)  # rows the band may not hold: solved again on all the entries
    if bool(redo.any()):
        tau, s, dsum, ok = _newton(family, exchanged(ev), k, n_live, tau, lo, hi, ~redo, tol_k, max_iter, ev.same)
    else:
        ev.local(tau)  # y at τ, over all the entries
    if not bool(ok.all()):
        warnings.warn(
            f"softtopk.distributed.topk_mask({family.name}): the threshold search stopped (max_iter={max_iter}, or "
            f"the resolution of the scores' dtype) with |sum(y) - k| = {float((s - k).abs().max()):.3g}; raise "
            "max_iter or tol, or pass float64 scores",
            RuntimeWarning,
            stacklevel=5,
        )
    y = ev.buf  # y at the last τ evaluated, which is the τ returned
    if bool(degenerate.any()):
        exact = torch.where(none, (x == math.inf).to(x.dtype), (x > -math.inf).to(x.dtype))
        y = torch.where(degenerate, exact, y)
    return y, c + tau * t, torch.where(degenerate, 0.0, dsum)


class _ShardedThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, t, family, shards, tol, max_iter):
        # elementwise work in the compute dtype, in place; per-row quantities and every sum in float64
        y, threshold, _ = _solve(family, x, k.double(), t.double(), shards, tol, max_iter)
        ctx.family, ctx.shards = family, shards
        ctx.save_for_backward(y, x, t, threshold)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        # ∂y/∂x = diag(d) − d dᵀ/Σd,  ∂y/∂k = d/Σd,  ∂y/∂t = −diag(d) (z − Σdz/Σd),  d = φ'(z)/t, z = (x − τ)/t,
        # every Σ over all the shards: one exchange of (Σ d·g, Σ d[, Σ d·z·g, Σ d·z]) per row.
        y, x, t, threshold = ctx.saved_tensors
        needs_k, needs_t = ctx.needs_input_grad[1:3]
        rt = t.reciprocal().to(x.dtype)
        d = ctx.family.dphi(y).mul_(rt)
        dg = d * gy

        def rowsum(v):
            return v.sum(-1, keepdim=True).double()

        parts = [rowsum(dg), rowsum(d)]
        if needs_t:
            z = torch.where(d != 0, (x - threshold.to(x.dtype)) * rt, 0.0)
            parts += [rowsum(dg * z), rowsum(d * z)]
        sums = _all_sum(torch.cat(parts, -1), ctx.shards)
        den = sums[:, 1:2]
        mean = torch.where(den > 0, sums[:, :1] / den.clamp(min=1e-300), 0.0)
        gx = dg.sub_(d * mean.to(x.dtype))
        gk = mean.to(x.dtype) if needs_k else None
        gt = None
        if needs_t:
            dz = torch.where(den > 0, sums[:, 3:4] / den.clamp(min=1e-300), 0.0)
            gt = (-(sums[:, 2:3] - sums[:, :1] * dz)).to(t.dtype)
        return gx, gk, gt, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Candidates: each rank's local top entries, exchanged, give the global order statistics (DFTopK, hard).
# --------------------------------------------------------------------------------------------------------------
def _global_top(x: Tensor, m: int, shards: Shards) -> tuple[Tensor, Tensor]:
    """The m largest entries of each row over all shards, (R, m) values and global indices, sorted decreasingly;
    missing ones (m > n) are −inf with index −1. Ties go to the lower rank, then as ``torch.topk`` within a rank."""
    local = min(m, x.shape[-1])
    values, idx = torch.topk(x, local, dim=-1)
    idx = idx + shards.offset
    if m > local:  # a short shard: padded with −inf at index −1
        values = torch.cat([values, values.new_full((x.shape[0], m - local), -math.inf)], -1)
        idx = torch.cat([idx, idx.new_full((x.shape[0], m - local), -1)], -1)
    all_values, all_idx = _all_gather_cat(values, shards), _all_gather_cat(idx, shards)
    order = torch.sort(all_values, dim=-1, descending=True, stable=True).indices[:, :m]
    return all_values.gather(-1, order), all_idx.gather(-1, order)


def _gather_owned(source: Tensor, idx: Tensor, shards: Shards) -> Tensor:
    """``source`` (R, n_r) at the global indices ``idx`` (R, m) this rank holds, 0 at the others."""
    local = idx - shards.offset
    mine = (local >= 0) & (local < source.shape[-1]) & (idx >= 0)
    if source.shape[-1] == 0:  # an empty shard holds none (zeros still in the graph: the loss's backward runs here)
        return source.sum(-1, keepdim=True).expand(idx.shape).clone()
    return torch.where(mine, source.gather(-1, local.clamp(0, source.shape[-1] - 1)), 0.0)


def _scatter_owned(target: Tensor, idx: Tensor, src: Tensor, shards: Shards) -> Tensor:
    """``target`` (R, n_r) plus ``src`` (R, m) at the global indices ``idx`` this rank holds (out of place)."""
    local = idx - shards.offset
    mine = (local >= 0) & (local < target.shape[-1]) & (idx >= 0)
    if target.shape[-1] == 0:
        return target.clone()
    return target.scatter_add(-1, local.clamp(0, target.shape[-1] - 1), torch.where(mine, src, 0.0))


class _ShardedDFTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, kth_values, kth_idx, shards):
        tau = kth_values.mean(-1, keepdim=True)
        y = torch.sub(x, tau).div_(t).sigmoid_()  # in place: one temporary
        if not bool(torch.isfinite(tau).all()):  # x = τ = ±inf gives NaN: selected iff +inf
            y = torch.where(y.isnan(), (tau > 0).to(y.dtype), y)
        ctx.shards = shards
        ctx.save_for_backward(x, t, y, tau, kth_idx)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        # y = σ(z), z = (x − τ)/t, τ = (x_a + x_b)/2 with a, b the global k-th and (k+1)-th largest:
        #   ∂L/∂x = s − (Σ s)(e_a + e_b)/2,  s = g σ'(z)/t;   ∂L/∂t = −Σ s z   (Σ over all the shards).
        x, t, y, tau, idx = ctx.saved_tensors
        shards = ctx.shards
        s = torch.addcmul(y, y, y, value=-1.0).mul_(gy).div_(t)  # g σ'(z)/t, in place
        parts = [s.sum(-1, keepdim=True)]
        if ctx.needs_input_grad[1]:
            parts.append(torch.where(s != 0, s * (x - tau) / t, 0.0).sum(-1, keepdim=True))
        sums = _all_sum(torch.cat(parts, -1), shards)
        gx = _scatter_owned(s, idx, (-0.5 * sums[:, :1]).expand(idx.shape), shards)
        return gx, (-sums[:, 1:2] if ctx.needs_input_grad[1] else None), None, None, None


def _dftopk(x: Tensor, k: int, t: Tensor, shards: Shards) -> Tensor:
    values, idx = _global_top(x.detach(), k + 1, shards)  # the (k+1)-th is −inf (index −1) when k = n
    # the k-th and (k+1)-th largest; at k = 0 the "k-th" is +inf (index −1): nothing is selected
    values = torch.cat([values.new_full((x.shape[0], 1), math.inf), values], -1)[:, k : k + 2]
    idx = torch.cat([idx.new_full((x.shape[0], 1), -1), idx], -1)[:, k : k + 2]
    return _ShardedDFTopK.apply(x, t, values, idx, shards)


class _ZeroGradient(torch.autograd.Function):
    """A piecewise-constant function of x (the hard mask): its values, and a zero gradient for x."""

    @staticmethod
    def forward(ctx, x, values):
        return values

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None


def _hard(x: Tensor, k: int, shards: Shards) -> tuple[Tensor, Tensor, Tensor]:
    """The hard mask of this shard (zero gradient), with the global top-k (values, indices)."""
    values, idx = _global_top(x.detach(), k, shards)
    mask = _scatter_owned(torch.zeros_like(x), idx, torch.ones_like(idx, dtype=x.dtype), shards)
    return _ZeroGradient.apply(x, mask), values, idx


# --------------------------------------------------------------------------------------------------------------
# The public functions.
# --------------------------------------------------------------------------------------------------------------
def _prepare_sharded(fn, x, k, dim, method, temperature, largest, straight_through, options, group):
    name = f"softtopk.distributed.{fn}"
    check_input(x, fn=name, data=False)  # a tensor of a floating dtype (prepare checks the data)
    d = normalize_dim(x, dim, fn=name)
    spec = lookup("mask", method, options, fn=name)
    if method not in SHARDED_METHODS:
        raise ValueError(f"{name}: method={method!r} has no sharded form; choose one of {SHARDED_METHODS}")
    if options.get("max_support") is not None or options.get("epsilon") is not None:
        bad = "max_support" if options.get("max_support") is not None else "epsilon"
        raise TypeError(f"{name}: the sharded operators take no `{bad}` (pass `temperature`)")
    check_bool(straight_through, "straight_through", fn=name)
    if straight_through and spec.factor is None:
        raise TypeError(f"{name}: method={method!r} takes no `straight_through` (it has no soft gradient)")
    shards = _shards(x, d, group, fn)
    k_kind = "float" if spec.float_k and not straight_through else "python_int"
    uses_t = uses_temperature(spec, options, temperature, fn=name)
    rows = prepare(name, x, k, dim=d, temperature=temperature, largest=largest, k_kind=k_kind,
                   uses_temperature=uses_t, method=method, length=shards.length)  # fmt: skip
    return spec, rows, shards


def _mask(spec, rows: Rows, options: dict, shards: Shards, straight_through: bool, fn: str):
    """The mask of this shard (R, n_r) on the flattened rows, and the global hard top-k when it was computed."""
    parsed = parse(spec, options, fn=fn)
    t = internal_temperature(spec, rows, parsed)
    r, n = math.prod(rows.x.shape[:-1]), rows.n  # rows may be empty (n = 0): no -1 in the shapes
    x = rows.signed.reshape(r, n)
    t2 = None if t is None else t.reshape(r, 1)
    hard = _hard(x, int(rows.k), shards) if spec.name == "hard" or straight_through else None
    if hard is not None and spec.name == "hard":
        return hard[0], hard
    assert t2 is not None  # every method but "hard" has a temperature
    if spec.name == "dftopk":
        y = _dftopk(x, int(rows.k), t2, shards)
    else:
        family = threshold.FAMILIES[parsed.get("family", "sigmoid" if spec.name == "soft" else spec.name)]
        tol, max_iter = solver_options("threshold", x.dtype, parsed["tol"], parsed["max_iter"], fn=fn)
        k = rows.k.reshape(r, 1) if isinstance(rows.k, Tensor) else x.new_full((r, 1), float(rows.k))
        y = _ShardedThreshold.apply(x, k.to(x.dtype), t2, family, shards, tol, max_iter)
    if hard is not None:  # straight-through
        y = with_soft_gradient(hard[0].detach(), y)
    return y, hard


def topk_mask(
    x: Tensor,
    k: Union[int, float, Tensor],
    *,
    group: object = None,
    dim: int = -1,
    method: str = "sigmoid",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    straight_through: bool = False,
    **options,
) -> Tensor:
    r"""This rank's shard of :func:`softtopk.topk_mask` of the tensor sharded along ``dim`` across ``group``.

    Every rank of the process group calls it with its own slice ``x`` of the full tensor (the slices concatenated
    in rank order along ``dim``; lengths may differ, even be 0) and gets its slice of exactly the mask that
    :func:`softtopk.topk_mask` gives on the concatenated tensor, to the solver's tolerance. The shards never
    travel:

    - ``"sigmoid"``, ``"soft"`` (with ``temperature``), ``"sparse"`` (p = 2, 4/3), ``"lapsum"``: only the threshold
      is global. A strided sample of about 2048 scores per row (all ranks together) gives the start; then each
      Newton step exchanges two scalars per row (Σy and Σφ'), the backward two (four when ``temperature`` needs a
      gradient): O(rows) communication per step. Per-row quantities and sums are float64, the elementwise work in
      the compute dtype.
    - ``"dftopk"`` and ``"hard"`` (and ``straight_through``'s forward): each rank sends its local top k + 1 (k)
      values and indices; O(k · world) per row.

    The gradient is that of the global loss (the sum of the ranks' losses) with respect to this shard; ``k`` and
    ``temperature`` are replicated arguments and get their full gradient on every rank.

    Args:
        x: this rank's shard of the scores, any floating dtype; the same shape on every rank except along ``dim``
            and the same dtype.
        k: the number of entries to select in the **full** dimension: an int (``"hard"``, ``"dftopk"``,
            straight-through) or a real number or per-row tensor (the normalised methods), the same on every rank.
        group: the process group (None: the default group).
        dim: the sharded dimension.
        method: one of :data:`SHARDED_METHODS`.
        temperature: as :func:`softtopk.topk_mask` (None: 1.0), the same on every rank. ``scale`` is not offered.
        largest: the k largest (default) or smallest.
        straight_through: the hard mask forward, the method's gradient backward.
        **options: ``tol``, ``max_iter`` (threshold methods), ``p`` (sparse). ``max_support`` and SOFT's
            ``epsilon`` are not offered.

    Returns:
        This rank's shard of the mask, ``x``'s shape and dtype.

    Raises:
        RuntimeError: the process group is not initialised. ValueError: the shards disagree in batch shape or
        dtype, or ``k`` exceeds the global length.

    Example (under ``torchrun --nproc-per-node 2``; every rank runs the same code):

    .. code-block:: python

        import torch, torch.distributed as dist, softtopk.distributed as sd
        dist.init_process_group("gloo")
        scores = torch.randn(4, 500_000)                 # this rank's half of a (4, 1e6) score matrix
        y = sd.topk_mask(scores, 1000, method="sigmoid", temperature=0.1)   # its half of the mask
        # y.sum() over all ranks is 4 × 1000; the shards never left their rank
    """
    fn = "topk_mask"
    spec, rows, shards = _prepare_sharded(fn, x, k, dim, method, temperature, largest, straight_through, options,
                                          group)  # fmt: skip
    y, _ = _mask(spec, rows, options, shards, straight_through, f"softtopk.distributed.{fn}")
    return rows.restore(y.reshape(rows.x.shape))


class ShardedTopK(TopK):
    """:class:`softtopk.TopK` with the attribute ``outside`` (batch shape, no gradient), as :func:`topk` returns."""

    outside: Tensor


class _Replicated(torch.autograd.Function):
    """The sum over ranks of each rank's contribution (forward), every rank holding the same result; backward the
    identity, for a loss that every rank computes identically from the replicated result."""

    @staticmethod
    def forward(ctx, part, shards):
        return _all_sum(part, shards)

    @staticmethod
    def backward(ctx, g):
        return g, None


def topk(
    x: Tensor,
    k: int,
    *,
    group: object = None,
    dim: int = -1,
    method: str = "hard",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    straight_through: bool = False,
    **options,
) -> TopK:
    r"""The global top ``k`` of a tensor sharded along ``dim`` across ``group``, as :func:`softtopk.topk`.

    ``values`` and ``indices`` (global indices into the concatenated dimension) are those of ``torch.topk`` on the
    concatenated tensor, sorted, found by exchanging each rank's local top k only (O(k · world) per row); ``weights``
    is the soft mask of ``method`` (see :func:`topk_mask`; default ``"hard"``: ones) at those indices. All three are
    **replicated**: every rank gets the same tensors. ``values`` and ``weights`` are differentiable: a loss that every
    rank computes identically from them sends its gradient into the shards (``values`` into the entries selected,
    ``weights`` into every entry through the mask). ``result.outside`` is the mask mass outside the k indices.
    Ties at the k-th value go to the lower rank.

    Args:
        x: this rank's shard, as :func:`topk_mask`.
        k: an int in [0, global length].
        group, dim, method, temperature, largest, straight_through, **options: as :func:`topk_mask`.

    Returns:
        A :class:`softtopk.TopK` ``(values, indices, weights)``, each of ``x``'s shape with ``dim`` of size ``k``.

    Example (under ``torchrun``; every rank runs the same code):

    .. code-block:: python

        r = softtopk.distributed.topk(logits_shard, 4)   # a vocabulary split by tensor parallelism
        r.indices                                         # the same global token ids on every rank
    """
    fn = "topk"
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"softtopk.distributed.{fn}: `k` must be an int, got {type(k).__name__}")
    spec, rows, shards = _prepare_sharded(fn, x, k, dim, method, temperature, largest, straight_through, options,
                                          group)  # fmt: skip
    y, hard = _mask(spec, rows, options, shards, straight_through, f"softtopk.distributed.{fn}")
    r, n = math.prod(rows.x.shape[:-1]), rows.n
    xs = rows.x.reshape(r, n)
    _, idx = hard[1:] if hard is not None else _global_top(rows.signed.reshape(r, n).detach(), k, shards)
    values = _Replicated.apply(_gather_owned(xs, idx, shards), shards)
    weights = _Replicated.apply(_gather_owned(y, idx, shards), shards)
    outside = _all_sum(y.detach().sum(-1), shards) - weights.detach().sum(-1)
    batch = rows.x.shape[:-1]
    values, weights = (rows.restore(a.reshape(batch + (k,))) for a in (values, weights))
    result = ShardedTopK(values, move_back(idx.reshape(batch + (k,)), rows.dim), weights)
    result.outside = outside.reshape(batch).to(x.dtype)
    return result
