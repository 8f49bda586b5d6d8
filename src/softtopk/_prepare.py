"""The one preparation step of every public operator: validation, ``dim``, dtype, per-row ``k`` and temperature,
solver defaults.

Every public operator goes through :func:`prepare` (or, for the few with other arguments, through the checks it is
made of), so that no operator writes its own dim code, its own defaults or its own error messages. Checks that
read tensor *data* (NaN, per-row ``k`` in range) run only in eager mode: under ``torch.compile`` tracing or a
``torch.func`` transform (``vmap``, ``grad``) they are skipped, because a data-dependent Python branch would
break the graph or the transform; there NaN propagates to the output. The common eager call (a float32 CPU tensor,
``dim`` last, a Python int k, a float temperature) is recognised by one test first, :func:`plain_rows`, which gives
the same :class:`Rows` for a tenth of the cost: on rows of a thousand entries the call's Python is a fifth of it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

Number = Union[int, float]
KArg = Union[int, float, Tensor]

is_transformed = torch._C._functorch.is_functorch_wrapped_tensor  # a tensor seen by vmap / grad

#: The default of every ``temperature`` argument: 1.0, in the units of the scores.
DEFAULT_TEMPERATURE = 1.0

#: Solver defaults, the one table: tolerance (float64, other dtypes) and iteration cap of each iterative solver.
#: threshold: Newton on sum(y) = k, |sum(y) - k| <= tol. sinkhorn: max_i |n (P1)_i - 1| <= tol. dykstra: largest
#: step and violation <= tol (1 + range of y).
SOLVERS: dict[str, dict[str, Any]] = {
    "threshold": {"tol": (1e-9, 1e-5), "max_iter": 50},
    "sinkhorn": {"tol": (1e-10, 1e-5), "max_iter": 1000},
    "dykstra": {"tol": (1e-10, 1e-6), "max_iter": 1000},
}


_is_compiling = torch.compiler.is_compiling  # (dynamo knows this function: under torch.compile it reads True)
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() outside TorchScript, without its Python layer


def can_read_data(x: Tensor) -> bool:
    """True when a data-dependent Python branch on ``x`` is allowed (eager, not traced, not transformed)."""
    return not (_is_compiling() or _is_tracing() or is_transformed(x))


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
    if math.isfinite(total.item()):
        return True
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{fn}: `{name}` contains NaN")
    return False


def check_finite(x: Any, name: str = "x", *, fn: str, data: bool = True) -> None:
    """:func:`check_input`, and (``data``, eager) no ±inf either: for operators without a meaning for padding."""
    finite = check_input(x, name, fn=fn, data=data)
    if data and not finite and can_read_data(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: `{name}` must be finite (it contains ±inf)")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an operator computes in: float32 for half-precision inputs, the input's own dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def normalize_dim(x: Tensor, dim: int, *, fn: str = "topk_mask") -> int:
    if type(dim) is not int and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
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


def check_temperature(t: Any, *, fn: str = "topk_mask", name: str = "temperature") -> None:
    if type(t) is float:  # the common case, without the abstract-class checks below
        if not 0 < t < math.inf:
            raise ValueError(f"{fn}: `{name}` must be positive and finite, got {t}")
        return
    if isinstance(t, bool) or not isinstance(t, (numbers.Real, Tensor)):
        raise TypeError(f"{fn}: `{name}` must be a positive number or a tensor, got {type(t).__name__}")
    if isinstance(t, Tensor):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: `{name}` must be a floating tensor, got {t.dtype}")
        if can_read_data(t) and t.numel() and not bool(((t > 0) & torch.isfinite(t)).all()):
            raise ValueError(f"{fn}: `{name}` must be positive and finite")
    elif not 0 < float(t) < math.inf:
        raise ValueError(f"{fn}: `{name}` must be positive and finite, got {t}")


def check_k(k: KArg, n: int, *, integer: bool, fn: str = "topk_mask") -> None:
    """``k`` must lie in [0, n]; ``integer`` demands integral values (hard selections)."""
    if type(k) is int:  # the common case, without the abstract-class checks below
        if not 0 <= k <= n:
            raise ValueError(f"{fn}: `k`={k} is out of range [0, n={n}] for a dimension of size {n}")
        return
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


def solver_options(
    solver: str, dtype: torch.dtype, tol: Any = None, max_iter: Any = None, *, fn: str
) -> tuple[float, int]:
    """``(tol, max_iter)`` of ``solver`` for a computation in ``dtype``: validated, None filled from :data:`SOLVERS`."""
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) > 0):
        raise ValueError(f"{fn}: `tol` must be a positive number, got {tol!r}")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1
    ):  # (tested only when given: the abstract-class check costs every call of a kernel's fast path)
        raise ValueError(f"{fn}: `max_iter` must be a positive int, got {max_iter!r}")
    table = SOLVERS[solver]
    if tol is None:
        tol = table["tol"][0 if dtype == torch.float64 else 1]
    return float(tol), int(table["max_iter"] if max_iter is None else max_iter)


def check_bool(value: object, name: str, *, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: `{name}` must be a bool, got {type(value).__name__}")
    return value


def check_choice(value: object, name: str, choices, *, fn: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: `{name}` must be a string, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{fn}: unknown `{name}`={value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def reject_unused(fn: str, why: str, **given) -> None:
    """``TypeError`` naming every argument in ``given`` that is not None (arguments that ``why`` does not use)."""
    used = [name for name, value in given.items() if value is not None and value is not False]
    if used:
        names = ", ".join(f"`{name}`" for name in used)
        raise TypeError(f"{fn}: {why} takes no {names}")


def row_std(x: Tensor) -> Tensor:
    """The standard deviation of each row (last dim) over its finite entries, (..., 1); 1 where it is 0 or
    undefined (fewer than two finite entries, constant rows). Differentiable."""
    if can_read_data(x) and bool(torch.isfinite(x).all()):
        var = x.var(-1, keepdim=True, correction=0)
    else:
        live = torch.isfinite(x)
        count = live.sum(-1, keepdim=True).clamp(min=1)
        xf = torch.where(live, x, 0.0)
        mean = xf.sum(-1, keepdim=True) / count
        var = torch.where(live, xf - mean, 0.0).square().sum(-1, keepdim=True) / count
    # the square root of 1, not of 0, where the spread vanishes: sqrt's derivative at 0 would make the gradient NaN
    return torch.where(var > 0, var, torch.ones_like(var)).sqrt()


SCALES = (None, "std")


def _per_row(value: Number | Tensor, x: Tensor) -> Tensor:
    """A number as a (..., 1) tensor over the rows of ``x`` (dim last): an expanded scalar; a tensor as it is."""
    if isinstance(value, Tensor):
        return value
    return torch.full((), float(value), dtype=x.dtype, device=x.device).expand(x.shape[:-1] + (1,))


@dataclass
class Rows:
    """A prepared call: the scores with ``dim`` last in the compute dtype, and the per-row parameters.

    ``signed`` is ``x`` for ``largest=True`` and ``-x`` otherwise: every selection is "the k largest of signed".
    ``k`` is None, an int, or a (..., 1) tensor (compute dtype, or long for integer-only selections); ``t`` is the
    (..., 1) temperature, or None for an operator without one. A number given for either stays a number
    (``k_arg``, ``t_arg``) until ``k`` or ``t`` is first read, so that a kernel taking numbers makes no tensor of
    them. ``unchecked`` names the operator whose data checks of ``x`` were deferred (see :func:`prepare`).
    """

    x: Tensor
    signed: Tensor
    k_arg: Any  # None, a number, or a (..., 1) tensor, as the call's k_kind says (typed loosely: it is dynamic)
    t_arg: Any  # None, a positive number, or a (..., 1) tensor
    largest: bool
    dim: int
    dtype: torch.dtype
    k_kind: str | None = "float"
    unchecked: str = ""
    #: made by :func:`plain_rows`: ``x`` a float32 CPU tensor with entries and ``dim`` last in eager mode, ``k`` and
    #: ``t`` Python numbers (so that the kernels need not test it again, and there is nothing to restore)
    plain: bool = False
    _made: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.x.shape[-1]

    @property
    def k(self) -> Any:
        """None, an int (integer kinds given a number), or a (..., 1) tensor (the compute dtype for a real k)."""
        k = self.k_arg
        if isinstance(k, Tensor):
            return k.to(self.x.dtype) if self.k_kind == "float" and not k.dtype.is_floating_point else k
        if k is None or self.k_kind != "float":
            return None if k is None else int(k)
        return self._per_row("k", k)

    @property
    def t(self) -> Any:  # a (..., 1) tensor, or None for a call without a temperature (typed loosely, as k)
        """The (..., 1) temperature, or None."""
        t = self.t_arg
        return t if t is None or isinstance(t, Tensor) else self._per_row("t", t)

    def _per_row(self, name: str, value: float) -> Tensor:
        if name not in self._made:
            self._made[name] = self.per_row(value)
        return self._made[name]

    def per_row(self, value: Number | Tensor) -> Tensor:
        """A number (or a (..., 1) tensor, returned as it is) as a per-row (..., 1) tensor of these rows."""
        return _per_row(value, self.x)

    def check_data(self) -> None:
        """The data checks :func:`prepare` deferred (NaN, and the per-row ±inf counts); nothing when none were."""
        if not self.unchecked:
            return
        fn, self.unchecked = self.unchecked, ""
        if not check_input(self.x, fn=fn) and self.k_arg is not None and self.x.numel():
            check_infinities(self.signed, self.k, fn=fn)

    def restore(self, y: Tensor) -> Tensor:
        """A result computed along the last dim, back in the caller's dtype and ``dim`` (plain rows: ``y`` itself)."""
        if self.plain:
            return y
        return move_back(y if y.dtype == self.dtype else y.to(self.dtype), self.dim)


def plain_rows(fn: str, x: Any, k: Any, dim: Any, temperature: Any, largest: Any, scale: Any, *, k_kind: str,
               uses_temperature: bool) -> Rows | None:
    """:func:`prepare` of the common eager call, in one test: the same :class:`Rows` (its data checks deferred, as
    with ``defer_data``) for a float32 CPU tensor with entries and ``dim`` its last, a Python int k in [0, n], a
    temperature that is None or a positive finite float (None where the call uses none), ``largest=True``, no
    ``scale``, in eager mode; None for every other call, which :func:`prepare` then validates (and rejects). On a
    row of a thousand entries :func:`prepare`'s generality costs a tenth of the call (measured)."""
    if not (isinstance(x, Tensor) and x.dtype == torch.float32 and x.is_cpu and type(k) is int and type(dim) is int):
        return None
    nd = x.dim()
    if nd == 0 or not (dim == -1 or dim == nd - 1) or largest is not True or scale is not None:
        return None
    if not 0 <= k <= x.shape[-1] or x.numel() == 0 or _is_compiling() or _is_tracing() or is_transformed(x):
        return None
    if uses_temperature:
        t = DEFAULT_TEMPERATURE if temperature is None else temperature
        if type(t) is not float or not 0 < t < math.inf:
            return None
    elif temperature is not None:
        return None
    else:
        t = None
    return Rows(x, x, k, t, True, nd - 1, torch.float32, k_kind, fn, True)


def prepare(
    fn: str,
    x: Any,
    k: Any = None,
    *,
    dim: Any = -1,
    temperature: Any = None,
    largest: Any = True,
    k_kind: str | None = "float",
    uses_temperature: bool = True,
    scale: Any = None,
    finite: bool = False,
    method: str | None = None,
    length: int | None = None,
    defer_data: bool = False,
) -> Rows:
    """Validate a call and move it to the last dim: the one preparation step of the public operators.

    ``k_kind``: ``"float"`` (a real k in [0, n], per-row tensors, differentiable), ``"int"`` (whole numbers,
    per-row tensors), ``"python_int"`` (a Python int: a shape) or None (no k). ``temperature`` None is
    :data:`DEFAULT_TEMPERATURE`; with ``uses_temperature=False`` it must stay None. ``scale="std"`` multiplies the
    temperature by each row's standard deviation (:func:`row_std`). ``finite`` rejects ±inf scores. ``method``
    names the method in the error for an unused temperature. ``length`` replaces ``x.shape[dim]`` as the n that k
    is checked against (the global length of a dimension sharded across ranks); the per-row ±inf counts are then
    the caller's to check. ``defer_data`` leaves the checks of ``x``'s data (NaN, ±inf counts) to
    :meth:`Rows.check_data`, for a caller whose kernel proves every row finite when it answers (one pass over the
    data fewer); the caller runs them before any other computation.
    """
    if finite:
        check_finite(x, fn=fn)
    defer = defer_data and not finite and scale is None and length is None and can_read_data(x)
    is_finite = finite or check_input(x, fn=fn, data=not defer)
    d = normalize_dim(x, dim, fn=fn)
    check_bool(largest, "largest", fn=fn)
    if scale not in SCALES:
        raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")
    if not uses_temperature:
        reject_unused(fn, f"method={method!r}" if method else "this call", temperature=temperature, scale=scale)
    n = x.shape[d] if length is None else length
    if k_kind == "python_int" and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
        raise TypeError(f"{fn}: `k` must be an int, got {type(k).__name__}")
    if k_kind is not None:
        check_k(k, n, integer=k_kind != "float", fn=fn)
    if uses_temperature:
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        check_temperature(temperature, fn=fn)
    cdtype = compute_dtype(x)
    xl = move_last(x, d)
    xl = xl if xl.dtype == cdtype else xl.to(cdtype)
    kt: Any = None  # a number stays one (Rows.k makes its tensor when read)
    if isinstance(k, Tensor) and k_kind is not None:
        kt = row_param(k, x, d, name="k", fn=fn, dtype=cdtype if k_kind == "float" else torch.long)
    elif k_kind is not None:
        kt = k if k_kind == "float" else int(k)
    signed = xl if largest else -xl
    t: Any = None  # a number stays one (Rows.t makes its tensor when read)
    if uses_temperature:
        t = temperature
        if isinstance(t, Tensor):
            t = row_param(t, x, d, name="temperature", fn=fn, dtype=cdtype)
        if scale == "std" and x.numel():
            t = _per_row(t, xl) * row_std(xl)
    rows = Rows(xl, signed, kt, t, largest, d, x.dtype, k_kind, fn if defer else "")
    if kt is not None and not defer and not is_finite and not finite and x.numel() and length is None:
        check_infinities(signed, rows.k, fn=fn)
    return rows
