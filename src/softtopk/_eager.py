"""What the eager fast paths (the numba kernels) share: an autograd ``Function`` applied without the Python layer of
``Function.apply``, and the test of whether a call needs an autograd node at all.

On a row of a thousand entries the Python around a kernel call costs as much as the kernel's backward: after the
kernel has streamed the input through the cache, every Python object it touches is a cache miss (tens of
microseconds per call, measured). These helpers keep that layer thin; they are for eager calls on plain tensors only
(the callers have checked that no ``torch.func`` transform wraps the inputs).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["eager_apply", "needs_graph", "once"]


def eager_apply(cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``cls.apply`` without ``Function.apply``'s Python layer (its signature binding, needed only by a
    ``setup_context`` Function, and its functorch dispatch, needed only for wrapped tensors): the C++ apply itself,
    bound to ``cls``. For old-style ``forward(ctx, ...)`` Functions on plain tensors."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)


def needs_graph(x: Tensor, *params: Any) -> bool:
    """Whether an autograd node must record a result computed from ``x`` and ``params`` (numbers or tensors): grad
    mode on and some tensor among them requiring grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for p in params:
        if isinstance(p, Tensor) and p.requires_grad:
            return True
    return False


def once(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``backward`` as ``@once_differentiable`` makes it (a second differentiation raises), with that wrapper's cost
    paid only under ``create_graph=True``: a plain backward runs with grad mode off and needs nothing of it."""
    wrapped = torch.autograd.function.once_differentiable(backward)

    def run(ctx: Any, *grads: Any) -> Any:
        return wrapped(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    run.__doc__ = backward.__doc__
    return run
