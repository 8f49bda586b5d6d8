"""Shared plumbing: input validation, `dim` handling, per-row parameters.

Every public operator goes through these helpers, so that no operator writes its own dim code or its own
error messages. Checks that read tensor *data* (NaN, per-row ``k`` in range) run only in eager mode: under
``torch.compile`` tracing or a ``torch.func`` transform (``vmap``, ``grad``) they are skipped, because a
data-dependent Python branch would break the graph or the transform; there NaN propagates to the output.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch
from torch import Tensor

Number = Union[int, float]
KArg = Union[int, float, Tensor]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def can_read_data(x: Tensor) -> bool:
    """True when a data-dependent Python branch on ``x`` is allowed (eager, not traced, not transformed)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not _is_wrapped(x)


def check_input(x: object, name: str = "x", *, fn: str = "topk_mask", data: bool = True) -> bool:
    """Type, dtype and (``data``) NaN check of a score tensor.

    Returns True when ``x`` is known to hold finite values only (no NaN, no ±inf), which spares later checks.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{fn}: `{name}` must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{fn}: `{name}` must have at least one dimension, got a 0-d tensor")
    if x.numel() == 0:
        return True
    if not data or not can_read_data(x):
        return False
    # One cheap reduction decides the common case; only a non-finite total needs the exact test.
    total = x.detach().sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return True
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{fn}: `{name}` contains NaN")
    return False


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an operator computes in: float32 for half-precision inputs, the input's own dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def normalize_dim(x: Tensor, dim: int, *, fn: str = "topk_mask") -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{fn}: `dim` must be an int, got {type(dim).__name__}")
    nd = x.dim()
    if not -nd <= dim < nd:
        raise ValueError(f"{fn}: `dim`={dim} is out of range for a tensor with {nd} dimension(s)")
    return int(dim) % nd


def move_last(x: Tensor, dim: int) -> Tensor:
    """``x`` with ``dim`` moved last (a view; no copy when ``dim`` is already last)."""
    return x if dim == x.dim() - 1 else x.movedim(dim, -1)


def move_back(y: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`move_last` for a result with the same number of dimensions."""
    return y if dim == y.dim() - 1 else y.movedim(-1, dim)


def row_param(
    value: Union[Number, Tensor],
    x: Tensor,
    dim: int,
    *,
    name: str,
    fn: str = "topk_mask",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A per-row parameter (``k``, ``temperature``) as a tensor of shape ``batch + (1,)``.

    Accepts a Python number, a tensor broadcastable to the batch shape (``x.shape`` without ``dim``), or a
    tensor of ``x.dim()`` dimensions with size 1 at ``dim`` (the "keepdim" form). The result is an expanded
    view, so autograd reduces gradients back to the caller's shape.
    """
    batch = x.shape[:dim] + x.shape[dim + 1 :]
    dtype = dtype or x.dtype
    if isinstance(value, Tensor):
        v = value
        if v.dim() == x.dim() and x.dim() > 0 and v.shape[dim] == 1:
            v = v.squeeze(dim)
        try:
            v = v.to(device=x.device, dtype=dtype).expand(batch)
        except RuntimeError:
            raise ValueError(
                f"{fn}: `{name}` of shape {tuple(value.shape)} does not broadcast to the batch shape "
                f"{tuple(batch)} (x.shape without dim)"
            ) from None
        return v.unsqueeze(-1)
    return torch.full((), float(value), dtype=dtype, device=x.device).expand(batch + (1,))


def check_temperature(t: Union[Number, Tensor], *, fn: str = "topk_mask", name: str = "temperature") -> None:
    if isinstance(t, bool) or not isinstance(t, (numbers.Real, Tensor)):
        raise TypeError(f"{fn}: `{name}` must be a positive number or a tensor, got {type(t).__name__}")
    if isinstance(t, Tensor):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: `{name}` must be a floating tensor, got {t.dtype}")
        if can_read_data(t) and t.numel() and not bool(((t > 0) & torch.isfinite(t)).all()):
            raise ValueError(f"{fn}: `{name}` must be positive and finite")
    elif not (t > 0 and t < float("inf")):
        raise ValueError(f"{fn}: `{name}` must be positive and finite, got {t}")


def check_k(k: KArg, n: int, *, integer: bool, fn: str = "topk_mask") -> None:
    """``k`` must lie in [0, n]; ``integer`` demands integral values (hard selections)."""
    if isinstance(k, bool) or not isinstance(k, (numbers.Real, Tensor)):
        raise TypeError(f"{fn}: `k` must be an int or a tensor, got {type(k).__name__}")
    if isinstance(k, Tensor):
        if k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"{fn}: `k` must be an integer or floating tensor, got {k.dtype}")
        if integer and k.dtype.is_floating_point and can_read_data(k) and k.numel():
            if not bool((k == k.round()).all()):
                raise ValueError(f"{fn}: `k` must hold whole numbers for this method")
        if can_read_data(k) and k.numel() and not bool(((k >= 0) & (k <= n)).all()):
            raise ValueError(f"{fn}: `k` must lie in [0, n={n}] along dim; got values outside it")
        return
    if integer and not float(k).is_integer():
        raise ValueError(f"{fn}: `k` must be a whole number for this method, got {k}")
    if not 0 <= k <= n:
        raise ValueError(f"{fn}: `k`={k} is out of range [0, n={n}] for a dimension of size {n}")


def check_infinities(xl: Tensor, k: KArg, *, fn: str = "topk_mask") -> None:
    """Eager check along the last dim: each row needs at least k entries > -inf and at most k equal to +inf."""
    if not can_read_data(xl) or xl.numel() == 0:
        return
    lo, hi = xl.detach().amin(), xl.detach().amax()
    if not (lo == -math.inf or hi == math.inf):
        return
    kk = k.detach().squeeze(-1) if isinstance(k, Tensor) else k
    if lo == -math.inf and bool(((xl > -math.inf).sum(-1) < kk).any()):
        raise ValueError(f"{fn}: `x` has a row with fewer than k entries above -inf (padding)")
    if hi == math.inf and bool(((xl == math.inf).sum(-1) > kk).any()):
        raise ValueError(f"{fn}: `x` has a row with more than k entries equal to +inf")
