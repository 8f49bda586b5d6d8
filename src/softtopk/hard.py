"""The hard top-k mask: the exact selection every relaxation tends to, and the forward of straight-through."""

from __future__ import annotations

import torch
from torch import Tensor

from ._eager import eager_apply, needs_graph
from ._prepare import can_read_data
from .threshold import kernel_hard_mask, kernel_ready

__all__ = ["hard_mask", "hard_topk_mask", "kernel_hard", "with_soft_gradient"]


def hard_topk_mask(x: Tensor, k: int | Tensor) -> Tensor:
    """Exact 0/1 indicator of the k largest entries along the last dim, ties broken as ``torch.topk``.

    ``k`` is an int or an integer-valued tensor of shape (..., 1) (one k per row). No gradient.
    """
    n = x.shape[-1]
    out = kernel_hard_mask(x, k)  # float32 CPU tensors in eager mode, with numba installed; None otherwise
    if out is not None:
        return out
    if isinstance(k, int):
        out = torch.zeros_like(x)
        if k == 0:
            return out
        idx = torch.topk(x, k, sorted=False).indices
        return _scatter(out, idx, torch.ones_like(idx, dtype=x.dtype))
    kk = k.long()
    m = min(int(kk.max()), n) if can_read_data(x) else n
    out = torch.zeros_like(x)
    if m == 0:
        return out
    idx = torch.topk(x, m, sorted=True).indices  # rank j is kept when j < k of its row
    keep = (torch.arange(m, device=x.device) < kk).to(x.dtype)
    return _scatter(out, idx, keep.expand(idx.shape))


def _scatter(out: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    # in place where it is cheaper (eager); out of place under vmap, which has no batching rule for scatter_
    return out.scatter_(-1, idx, src) if can_read_data(out) else out.scatter(-1, idx, src)


class _HardMask(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return hard_topk_mask(x, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None  # piecewise constant: the gradient is zero almost everywhere


class _HardMaskEager(torch.autograd.Function):
    """:class:`_HardMask` in eager mode: the old-style ``forward(ctx, ...)`` spares ``apply`` the signature binding
    of a ``setup_context`` Function (tens of microseconds, more than the mask of a small input)."""

    @staticmethod
    def forward(ctx, x, k):
        return hard_topk_mask(x, k)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None


class _HardKernel(torch.autograd.Function):
    """:class:`_HardMaskEager` by the kernel alone: a 0-d result where the kernel does not answer (eager only, applied
    by :func:`~softtopk._eager.eager_apply`)."""

    @staticmethod
    def forward(ctx, x, k):
        out = kernel_hard_mask(x, k, ready=True)  # (by kernel_hard)
        return x.new_zeros(()) if out is None else out

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None


_hard_kernel_apply = eager_apply(_HardKernel)


def kernel_hard(x: Tensor, k: int | Tensor) -> Tensor | None:
    """:func:`hard_mask` by the numba kernel (:func:`~softtopk.threshold.kernel_hard_mask`), or None where it does not
    answer: not a float32 CPU tensor in eager mode, a k outside (0, n), a NaN, a tie at some row's k-th value. Its
    rows hold no NaN when it answers, so a caller may leave the data checks to the case where it does not."""
    if not kernel_ready(x, k):
        return None
    if not needs_graph(x):
        return kernel_hard_mask(x, k, ready=True)
    out = _hard_kernel_apply(x, k)
    return out if out.dim() else None


class _StraightThrough(torch.autograd.Function):
    """Forward ``hard``; backward the incoming gradient into ``soft``, unchanged. The same as
    ``hard + (soft - soft.detach())`` without its two full-size temporaries and autograd nodes."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hard, soft):
        return hard  # returned as-is: autograd makes it a view, no copy

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return None, g


class _StraightThroughEager(torch.autograd.Function):
    """:class:`_StraightThrough` in eager mode (see :class:`_HardMaskEager`)."""

    @staticmethod
    def forward(ctx, hard, soft):
        return hard.view_as(hard)

    @staticmethod
    def backward(ctx, g):
        return None, g


def with_soft_gradient(hard: Tensor, soft: Tensor) -> Tensor:
    """The values of ``hard`` with the gradient of ``soft`` (straight-through estimator, Bengio et al. 2013)."""
    return (_StraightThroughEager if can_read_data(soft) else _StraightThrough).apply(hard, soft)


def hard_mask(x: Tensor, k: int | Tensor) -> Tensor:
    """Hard top-k mask that stays in the autograd graph with an exact zero gradient."""
    return (_HardMaskEager if can_read_data(x) else _HardMask).apply(x, k)
