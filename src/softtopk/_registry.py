"""The one method registry: every entry point (``topk_mask``, ``topk``, ``topk_permutation``,
``topk_distribution``, the modules of :mod:`softtopk.nn` and the losses) looks its ``method`` up here.

A :class:`Method` record says what a method computes (a family function, called on prepared rows), which options
it takes with their defaults, what its temperature means, and the properties the docs' method table lists.
Families are leaves: this module imports them; they never import it.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from . import sinkhorn, sorting_networks, stochastic, threshold
from ._eager import needs_graph
from ._prepare import Rows, can_read_data, check_choice, check_temperature, row_param, solver_options
from .hard import hard_mask, hard_topk_mask, kernel_hard, with_soft_gradient

__all__ = ["MASK_METHODS", "METHODS", "PERMUTATION_METHODS", "Method", "lookup", "run_mask"]


@dataclass(frozen=True)
class Method:
    """One method of :func:`topk_mask` (a mask) or of :func:`topk_permutation` (a (k, n) matrix per row)."""

    name: str
    #: (rows, t, **options) -> result along the last dim, in the compute dtype; t is the internal temperature
    compute: Callable[..., Tensor]
    #: option -> default, the one place a method's defaults are written (None for tol and max_iter: the solver's
    #: defaults, which depend on the dtype, from ``_prepare.SOLVERS``)
    options: Mapping[str, object] = field(default_factory=dict)
    #: validates the options given (a dict with every option) and returns compute's keyword arguments
    parse: Callable[..., dict] = lambda fn, **o: o
    #: the factor from the public temperature T (the transition's width on the score axis) to the family's own
    #: t = T * factor, as a function of the parsed options; None: the method takes no temperature
    factor: Union[Callable[..., float], None] = None
    #: an option that replaces ``temperature`` (the paper's own parametrisation), e.g. SOFT's epsilon
    alias: Union[str, None] = None
    float_k: bool = False  # a real k is allowed and differentiable
    sums_to_k: bool = True
    exact_zeros: bool = False
    support: str = "n"  # what bounds the number of nonzero entries of a row
    paper: str = ""
    #: one line for the docs' method table: what it is and when to use it
    summary: str = ""
    #: the option ``max_support`` applies (the computation restricted to the largest entries)
    boundable: bool = False
    #: the fast path, tried before ``compute`` (without ``max_support``): (rows, t, straight_through, **options) ->
    #: the mask (the straight-through mask itself when asked: the hard mask and the soft gradient from one call), or
    #: None where it does not apply; t is the internal temperature, a number where one value serves every row. It
    #: runs before the data checks that ``prepare`` deferred, so it must answer None for any call those checks
    #: would reject (a NaN; ±inf beyond what the method takes).
    kernel: Union[Callable[..., Union[Tensor, None]], None] = None


# Parsers: (fn, **options) -> compute's keyword arguments. They validate values only (no data, no dtype), so that
# modules can check their options when they are built; the computes fill the dtype-dependent defaults.
def _solver(fn: str, tol, max_iter, **rest) -> dict:
    solver_options("threshold", torch.float32, tol, max_iter, fn=fn)  # validates
    return {"tol": tol, "max_iter": max_iter, **rest}


def _sparse_parse(fn: str, p, **rest) -> dict:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: `p` must be 2 or 4/3, got {type(p).__name__}")
    if p == 2:
        family = "sparse2"
    elif math.isclose(p, 4 / 3, rel_tol=1e-6):
        family = "sparse4/3"
    else:
        raise ValueError(f"{fn}: `p` must be 2 or 4/3 for method='sparse', got {p}")
    return {"family": family, **_solver(fn, **rest)}


def _check_epsilon(fn: str, epsilon) -> None:
    """SOFT's epsilon: a positive number or a per-row tensor."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (numbers.Real, Tensor)):
        raise TypeError(f"{fn}: `epsilon` must be a positive number or a tensor, got {type(epsilon).__name__}")
    check_temperature(epsilon, fn=fn, name="epsilon")


def _epsilon_rows(rows: Rows, epsilon) -> Tensor:
    return row_param(epsilon, rows.x, rows.x.dim() - 1, name="epsilon", dtype=rows.x.dtype)


def _soft_parse(fn: str, epsilon, **rest) -> dict:
    if epsilon is not None:
        _check_epsilon(fn, epsilon)
    return {"epsilon": epsilon, **_solver(fn, **rest)}


def _perturbed_parse(fn: str, n_samples, noise, generator) -> dict:
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"{fn}: `n_samples` must be a positive int, got {n_samples!r}")
    check_choice(noise, "noise", stochastic.NOISES, fn=fn)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    return {"n_samples": int(n_samples), "noise": noise, "generator": generator}


# Mask methods: compute(rows, t, **options) with rows.signed the scores to take the k largest of.
def _hard(rows, t):
    return hard_mask(rows.signed, rows.k)


def _hard_kernel(rows, t, straight_through):
    return kernel_hard(rows.signed, rows.k_arg)


def _dftopk(rows, t):
    return threshold.dftopk(rows.signed, rows.k, t)


def _dftopk_kernel(rows, t, straight_through):
    return None if straight_through else threshold.kernel_dftopk(rows.signed, rows.k_arg, t)


def _threshold_mask(family: str, rows: Rows, t: Tensor, tol, max_iter) -> Tensor:
    tol, max_iter = solver_options("threshold", rows.x.dtype, tol, max_iter, fn="")  # the dtype's defaults
    return threshold.normalised_mask(family, rows.signed, rows.k, t, tol=tol, max_iter=max_iter)


def _threshold_kernel(family: str, rows: Rows, t, straight_through: bool, tol, max_iter) -> Tensor | None:
    tol, max_iter = solver_options("threshold", rows.x.dtype, tol, max_iter, fn="")
    return threshold.kernel_mask(family, rows.signed, rows.k_arg, t, tol, max_iter, hard=straight_through,
                                 plain=rows.plain)  # fmt: skip


def _normalised(family: str):
    def compute(rows, t, tol, max_iter):
        return _threshold_mask(family, rows, t, tol, max_iter)

    return compute


def _normalised_kernel(family: str):
    return functools.partial(_threshold_kernel, family)  # (a partial adds no Python frame to the call)


def _soft(rows, t, epsilon, tol, max_iter):
    if epsilon is not None:  # SOFT's epsilon, relative to max C: a sigmoid mask at a temperature set by the scores
        t = threshold.soft_temperature(rows.x, _epsilon_rows(rows, epsilon))
    return _threshold_mask("sigmoid", rows, t, tol, max_iter)


def _soft_kernel(rows, t, straight_through, epsilon, tol, max_iter):
    return None if epsilon is not None else _threshold_kernel("sigmoid", rows, t, straight_through, tol, max_iter)


def _sparse(rows, t, family, tol, max_iter):
    return _threshold_mask(family, rows, t, tol, max_iter)


def _sparse_kernel(rows, t, straight_through, family, tol, max_iter):
    return _threshold_kernel(family, rows, t, straight_through, tol, max_iter)


def _perturbed(rows, t, n_samples, noise, generator):
    return stochastic.perturbed_mask(rows.signed, rows.k, t, n_samples=n_samples, noise=noise, generator=generator)


_SOLVER = {"tol": None, "max_iter": None}
_SIGMOID = threshold.FAMILIES["sigmoid"].slope_at_half  # σ'(0) = 1/4: the mask's slope at 1/2 is 1/T for t = T/4
_LAPLACE = threshold.FAMILIES["lapsum"].slope_at_half  # φ'(0) = 1/2
_CUBIC = threshold.FAMILIES["sparse4/3"].slope_at_half  # 3·2^(-2/3)


def _table(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


MASK_METHODS: dict[str, Method] = _table(
    Method(
        "hard", _hard, support="k", exact_zeros=True, paper="—", kernel=_hard_kernel,
        summary="exact 0/1 mask, ties as torch.topk; zero gradient: evaluation, baselines, the forward of "
        "straight_through=True",
    ),
    Method(
        "dftopk", _dftopk, factor=lambda: _SIGMOID, sums_to_k=False, kernel=_dftopk_kernel,
        paper="DFTopK, Zhu et al. 2025",
        summary="σ((x − τ)/t), τ the midpoint of the k-th and (k+1)-th largest: one O(n) selection, no root "
        "finding; **not normalised** (Σy ≠ k): not for weights that must sum to k unless divided by Σy, as "
        "`nn.soft_knn` does",
    ),
    Method(
        "sigmoid", _normalised("sigmoid"), _SOLVER, _solver, lambda **o: _SIGMOID, float_k=True,
        boundable=True, kernel=_normalised_kernel("sigmoid"), paper="LML, Amos, Xu & Kolter 2019",
        summary="φ = sigmoid (binary-entropy regulariser); the default: smooth, every entry gets a gradient",
    ),
    Method(
        "soft", _soft, {"epsilon": None, **_SOLVER}, _soft_parse, lambda **o: _SIGMOID, alias="epsilon",
        float_k=True, boundable=True, kernel=_soft_kernel, paper="SOFT top-k, Xie et al. 2020",
        summary="entropic OT to anchors 0 and 1; at convergence a sigmoid mask, so with `temperature` it equals "
        "`sigmoid`; `epsilon=` gives the paper's ε (relative to max C)",
    ),
    Method(
        "sparse", _sparse, {"p": 2, **_SOLVER}, _sparse_parse,
        lambda family, **o: 1.0 if family == "sparse2" else _CUBIC, float_k=True, exact_zeros=True,
        support="data-dependent; `max_support` bounds it", boundable=True, kernel=_sparse_kernel,
        paper="Sander et al. 2023",
        summary="p=2: the Euclidean projection of x/t; p=4/3: φ(z) = max(z, 0)³; exact zeros and ones, gradients "
        "only where the mask is fractional",
    ),
    Method(
        "lapsum", _normalised("lapsum"), _SOLVER, _solver, lambda **o: _LAPLACE, float_k=True,
        boundable=True, kernel=_normalised_kernel("lapsum"), paper="LapSum, Struski et al. 2025",
        summary="φ = Laplace CDF: heavier tails than sigmoid, gradients reach entries far from the threshold",
    ),
    Method(
        "perturbed", _perturbed, {"n_samples": 100, "noise": "gaussian", "generator": None},
        _perturbed_parse,
        lambda noise, **o: 1.0 / math.sqrt(2.0 * math.pi) if noise == "gaussian" else math.log(2.0) / 2.0,
        exact_zeros=True, support="data-dependent (random)", paper="perturbed optimizer, Berthet et al. 2020",
        summary="E[hard(x + σZ)] by Monte Carlo, Z Gaussian or Gumbel; unbiased, noisy; costs n_samples hard top-k's",
    ),
)  # fmt: skip


# Permutation methods: compute(rows, t, **options) -> Γ (R, k, n) on rows.signed flattened to (R, n).
def _sinkhorn_parse(fn: str, epsilon, tol, max_iter) -> dict:
    solver_options("sinkhorn", torch.float32, tol, max_iter, fn=fn)  # validates
    _check_epsilon(fn, epsilon)
    return {"epsilon": epsilon, "tol": tol, "max_iter": max_iter}


def _sinkhorn(rows, t, epsilon, tol, max_iter):
    tol, max_iter = solver_options("sinkhorn", rows.x.dtype, tol, max_iter, fn="")
    eps = _epsilon_rows(rows, epsilon).reshape(-1, 1)
    plan = sinkhorn.sorted_topk_plan(
        rows.x.reshape(-1, rows.n), rows.k, eps, largest=rows.largest, tol=tol, max_iter=max_iter
    )
    return plan.reshape(rows.x.shape[:-1] + (rows.k, rows.n))


def _network_parse(fn: str, relaxation) -> dict:
    return {"relaxation": check_choice(relaxation, "relaxation", sorting_networks.RELAXATIONS, fn=fn)}


def _network(name: str):
    def compute(rows, t, relaxation):
        shape = rows.x.shape[:-1]
        gamma = sorting_networks.network_permutation(
            rows.signed.reshape(-1, rows.n), rows.k, t.reshape(-1, 1), network=name, relaxation=relaxation
        )
        return gamma.reshape(shape + (rows.k, rows.n))

    return compute


PERMUTATION_METHODS_TABLE: dict[str, Method] = _table(
    Method(
        "sinkhorn", _sinkhorn, {"epsilon": 0.1, "tol": None, "max_iter": None}, _sinkhorn_parse,
        paper="SOFT sorted top-k, Xie et al. 2020",
        summary="entropic OT of the scores to k + 1 anchors, implicit backward; smoothing by `epsilon` (relative "
        "to max C)",
    ),
    Method(
        "odd_even", _network("odd_even"), {"relaxation": "logistic"}, _network_parse,
        lambda **o: 1.0, paper="Petersen et al. 2021",
        summary="relaxed odd-even transposition network: n layers, O(n²) comparators, checkpointed backward",
    ),
    Method(
        "bitonic", _network("bitonic"), {"relaxation": "logistic"}, _network_parse,
        lambda **o: 1.0, paper="Petersen et al. 2021, 2022",
        summary="relaxed bitonic network: O(n log² n) comparators, checkpointed backward",
    ),
)  # fmt: skip

#: The methods of :func:`softtopk.topk_mask` and :func:`softtopk.topk`, by name.
METHODS: tuple[str, ...] = tuple(MASK_METHODS)
#: The methods of :func:`softtopk.topk_permutation` and :func:`softtopk.topk_distribution`, by name.
PERMUTATION_METHODS: tuple[str, ...] = tuple(PERMUTATION_METHODS_TABLE)
_TABLES = {"mask": MASK_METHODS, "permutation": PERMUTATION_METHODS_TABLE}
_GENERIC = ("max_support",)  # options of the mask runner itself, not of one method


def lookup(kind: str, method: object, options: Mapping[str, object], *, fn: str) -> Method:
    """The record of ``method``; an unknown method or an option it does not take raises, naming it."""
    table = _TABLES[kind]
    if not isinstance(method, str):
        raise TypeError(f"{fn}: `method` must be a string, got {type(method).__name__}")
    if method not in table:
        raise ValueError(f"{fn}: unknown `method`={method!r}; choose one of {', '.join(map(repr, table))}")
    spec = table[method]
    allowed = tuple(spec.options) + (_GENERIC if spec.boundable else ())
    unknown = [name for name in options if name not in allowed]
    if unknown:
        names = ", ".join(f"`{name}`" for name in unknown)
        takes = ", ".join(f"`{a}`" for a in allowed) or "none"
        raise TypeError(f"{fn}: method={method!r} takes no option {names}; its options: {takes}")
    return spec


def uses_temperature(spec: Method, options: Mapping[str, object], temperature: object, *, fn: str) -> bool:
    """Whether the call's temperature is used: not by methods without one, nor when the method's alias (the
    paper's own parameter) is given; passing both raises ``TypeError``."""
    if spec.alias is not None and options.get(spec.alias) is not None:
        if temperature is not None:
            raise TypeError(f"{fn}: method={spec.name!r} takes `temperature` or `{spec.alias}`, not both")
        return False
    return spec.factor is not None


_PLAIN = (int, float, str, bool, type(None))  # option values that a memo may hold: none changes in place
_MEMO_SIZE = 256  # each memo keeps its first entries only (a loop over many option values does not grow it)


def memo_key(*head: Any, options: Mapping[str, object]) -> tuple | None:
    """A key for a memo of what a call's method and options determine: ``head`` and the options, or None when an
    option's value is not a plain Python number, string or None (a tensor, a generator: read afresh each call) or
    is NaN, and under ``torch.compile`` (which would guard on the memo's keys, and recompile when it grows)."""
    if torch.compiler.is_compiling():
        return None
    for value in options.values():
        if type(value) not in _PLAIN or value != value:
            return None
    return (*head, *options.items()) if options else head


def memo_store(memo: dict, key: tuple, value: Any) -> bool:
    """Keep ``value`` in ``memo`` under ``key`` while the memo holds fewer than ``_MEMO_SIZE`` entries; whether it
    was kept."""
    if len(memo) >= _MEMO_SIZE:
        return False
    memo[key] = value
    return True


_PARSED: dict[tuple, dict] = {}  # parse's results by memo_key(record), validated once: shared, never modified
_FACTORS: dict[int, Any] = {}  # the temperature factor of each of those results, by its id (they live on)


def parse(spec: Method, options: Mapping[str, object], *, fn: str) -> dict:
    """The method's options with the defaults of its record filled in, validated (``max_support`` excluded);
    reads no data. Plain option values are validated once, then the result is shared (a plain dict: as keyword
    arguments a mapping proxy costs every call a microsecond)."""
    key = memo_key(id(spec), options=options)
    parsed = None if key is None else _PARSED.get(key)
    if parsed is None:
        given = {name: val for name, val in options.items() if name not in _GENERIC}
        parsed = spec.parse(fn, **{**spec.options, **given})
        if key is not None and memo_store(_PARSED, key, parsed):
            _FACTORS[id(parsed)] = None if spec.factor is None else spec.factor(**parsed)
    return parsed


def internal_temperature(spec: Method, rows: Rows, parsed: dict, *, number: bool = False) -> Any:
    """The family's own temperature t = T · factor (None when the call uses no temperature): a (..., 1) tensor, or
    with ``number`` a Python number where the call gave one."""
    if rows.t_arg is None or spec.factor is None:
        return None
    factor = _FACTORS.get(id(parsed))
    t, factor = rows.t_arg, spec.factor(**parsed) if factor is None else factor
    if not isinstance(t, Tensor):
        return t * factor if number else rows.per_row(t * factor)
    if t.dim() > 1 and not any(t.stride()) and not t.requires_grad:  # one number for every row: stays one
        return (t.as_strided((1,), (1,)) * factor).expand(t.shape)
    return t * factor


def run_mask(spec: Method, rows: Rows, options: Mapping[str, object], *, straight_through: bool, fn: str) -> Tensor:
    """The mask of a prepared call along the last dim, in the compute dtype: ``max_support`` restricts the
    computation to the largest entries of each row, ``straight_through`` replaces the forward by the hard mask.
    The method's kernel is tried first; the data checks ``prepare`` deferred to it run when it declines."""
    parsed = parse(spec, options, fn=fn)
    bound = options.get("max_support")
    if straight_through and (rows.plain or can_read_data(rows.x)) and not needs_graph(rows.x, rows.k_arg, rows.t_arg):
        # nothing differentiates this call (inference, no_grad): its value is the hard mask, without the soft one
        y = kernel_hard(rows.signed, rows.k_arg)
        if y is None:
            rows.check_data()
            y = hard_topk_mask(rows.signed.detach(), rows.k)
        return y
    if spec.kernel is not None and bound is None:
        y = spec.kernel(rows, internal_temperature(spec, rows, parsed, number=True), straight_through, **parsed)
        if y is not None:
            return y
    rows.check_data()
    t = internal_temperature(spec, rows, parsed)
    hard_k = rows.k
    if spec.float_k and rows.k_kind != "float":
        rows = replace(rows, k_kind="float")  # a whole k (straight-through) for a family that solves for a real one
    if bound is not None:
        y = _bounded(spec, rows, t, parsed, check_support(bound, rows.k, fn=fn))
    else:
        y = spec.compute(rows, t, **parsed)
    if straight_through:
        # forward: the exact top-k mask; backward: the gradient of the soft mask
        y = with_soft_gradient(hard_topk_mask(rows.signed.detach(), hard_k), y)
    return y


def check_support(bound: Any, k: Any, *, fn: str) -> int:
    """``max_support``: an int above k, or at least a real k (checked against a tensor k's largest value when it can
    be read): with max_support = k every weight would be exactly 1 and the gradient zero."""
    if isinstance(bound, bool) or not isinstance(bound, numbers.Integral):
        raise TypeError(f"{fn}: `max_support` must be an int, got {type(bound).__name__}")
    if isinstance(k, Tensor):
        k = float(k.detach().max()) if k.numel() and can_read_data(k) else 0.0
    bound, k = int(bound), float(k)
    if bound == k and bound > 0:
        raise ValueError(
            f"{fn}: `max_support`={bound} equals k: the mask would be the hard top-k (every weight exactly 1, zero "
            f"gradient). Use max_support > k (e.g. k + 1) for a soft mask, or method='hard' / straight_through=True"
        )
    if bound < k:
        raise ValueError(f"{fn}: `max_support`={bound} must be at least k={k:g}")
    return int(bound)


def _bounded(spec: Method, rows: Rows, t: Tensor | None, parsed: dict, bound: int) -> Tensor:
    """The mask computed on the ``bound`` largest entries of each row only; the others are exactly 0."""
    if bound >= rows.n:
        return spec.compute(rows, t, **parsed)
    idx = torch.topk(rows.signed.detach(), bound, sorted=False).indices
    sub = replace(rows, x=rows.x.gather(-1, idx), signed=rows.signed.gather(-1, idx), t_arg=t)
    y = spec.compute(sub, t, **parsed)
    return torch.zeros_like(rows.x).scatter(-1, idx, y)
