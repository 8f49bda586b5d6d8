"""The contract of every public operator, as one parametrised suite.

``OPERATORS`` holds one entry per public operator (and per method where the method changes what holds): a small
callable ``call(x, dim, k, t)`` and flags for what docs/contract.md and the docstrings say it supports. Each contract
item below is one test parametrised over the whole table; where the docs say an item does not apply, the flag says
so and the test is skipped with that reason. Genuine failures are marked ``xfail(strict=True)`` per combination in
``XFAIL`` (and listed in the report, not fixed here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import softtopk
from softtopk import losses
from softtopk.nn import SoftTopK

T_DEFAULT = 0.5  # the smoothing parameter the table uses unless a test passes its own


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(x: torch.Tensor) -> torch.Tensor:
    """A fixed class index per row of a (batch, classes) tensor."""
    return torch.arange(x.shape[0]) % x.shape[-1]


def _relevant(x: torch.Tensor) -> torch.Tensor:
    """A fixed 0/1 relevance indicator of x's shape: every other item relevant."""
    rel = torch.zeros(x.shape, dtype=torch.bool)
    rel[..., ::2] = True
    return rel


def _w_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The generating vector (n - 1, ..., 0) of permutahedron_projection, laid along ``dim`` and broadcast."""
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    return torch.arange(n - 1, -1, -1, dtype=x.dtype).reshape(shape).expand(x.shape)


@dataclass(frozen=True)
class Op:
    """One public operator and what its documentation says it supports.

    ``call(x, dim, k, t)``: ``k`` the selection size (ignored when ``has_k`` is False), ``t`` the smoothing
    parameter passed as ``temp`` (None: ``T_DEFAULT``; ignored when ``temp`` is None).
    ``out``: "mask" (x's shape, values in [0, 1]), "like" (x's shape), "topk" (a TopK, k along ``dim``),
    "kn" (batch + (k, n), values in [0, 1]; the score dim moved last) or "loss" (one value per row; x is 2-D).
    """

    name: str
    call: Callable
    out: str = "mask"
    has_k: bool = True
    temp: str | None = "temperature"
    temp_zero_ok: bool = False  # temperature = 0 is a documented valid value
    tensor_k: bool = False  # per-row tensor k documented
    tensor_t: bool = True  # per-row tensor temperature documented
    normalised: bool = False  # the mask sums to k
    grad: bool = True  # differentiable (gradcheck applies)
    vmap: str = "yes"  # "yes", "raises" (documented unsupported) or "n/a" (not documented)
    nan_name: str = "x"
    unit: bool = True  # a "mask" / "kn" output lies in [0, 1]
    k_range: tuple = (0, 0)  # documented k in [k_range[0], n - k_range[1]]; outside it raises ValueError


def _mask_op(method, *, label=None, normalised=None, **opts):
    hard = method == "hard"
    stochastic = method == "perturbed"

    def call(x, dim=-1, k=2, t=None):
        kw = dict(opts)
        if not hard:
            kw["temperature"] = T_DEFAULT if t is None else t
        if stochastic:
            kw["generator"] = _gen()
        return softtopk.topk_mask(x, k, dim=dim, method=method, **kw)

    return Op(
        label or f"topk_mask[{method}]",
        call,
        temp=None if hard else "temperature",
        tensor_k=True,
        tensor_t=not hard,
        normalised=(method in ("sigmoid", "soft", "sparse", "lapsum", "hard")) if normalised is None else normalised,
        grad=not (hard or stochastic or opts.get("straight_through", False)),
        vmap="raises" if stochastic else "yes",
    )


def _topk_op(method):
    def call(x, dim=-1, k=2, t=None):
        return softtopk.topk(x, k, dim=dim, method=method, temperature=T_DEFAULT if t is None else t)

    return Op(f"topk[{method}]", call, out="topk", tensor_k=True, normalised=True)


def _threshold(x, dim=-1, k=None, t=None):
    return softtopk.threshold_mask(x, 0.5, dim=dim, temperature=T_DEFAULT if t is None else t)


def _gumbel(x, dim=-1, k=2, t=None):
    return softtopk.gumbel_topk(x, k, dim=dim, temperature=T_DEFAULT if t is None else t, generator=_gen())


def _permutation_op(fn, method):
    smoothing = "epsilon" if method == "sinkhorn" else "temperature"

    def call(x, dim=-1, k=2, t=None):
        return fn(x, k, dim=dim, method=method, **{smoothing: T_DEFAULT if t is None else t})

    # vmap: "—" in docs/contract.md; the autograd.Functions have no vmap rule and raise RuntimeError
    return Op(f"{fn.__name__}[{method}]", call, out="kn", temp=smoothing, tensor_t=True, vmap="raises")


def _soft_sort(x, dim=-1, k=None, t=None):
    return softtopk.soft_sort(x, dim=dim, temperature=T_DEFAULT if t is None else t)


def _soft_rank(x, dim=-1, k=None, t=None):
    return softtopk.soft_rank(x, dim=dim, temperature=T_DEFAULT if t is None else t)


def _isotonic(x, dim=-1, k=None, t=None):
    return softtopk.isotonic(x, dim=dim)


def _projection(x, dim=-1, k=None, t=None):
    return softtopk.permutahedron_projection(x, _w_like(x, dim), dim=dim)


def _perm_topk(x, dim=-1, k=2, t=None):
    return softtopk.permutahedron_topk(x, k, dim=dim, temperature=T_DEFAULT if t is None else t)


def _magnitude(x, dim=-1, k=2, t=None):
    return softtopk.topk_magnitude(x, k, dim=dim, temperature=T_DEFAULT if t is None else t)


def _module(x, dim=-1, k=2, t=None):
    return SoftTopK(k, dim=dim, temperature=T_DEFAULT if t is None else t)(x)


def _lml(x, dim=-1, k=2, t=None):
    return losses.lml_loss(x, _targets(x), k, temperature=T_DEFAULT if t is None else t, reduction="none")


def _lml_module(x, dim=-1, k=2, t=None):
    return losses.LMLLoss(k, temperature=T_DEFAULT if t is None else t, reduction="none")(x, _targets(x))


def _lml_set(x, dim=-1, k=2, t=None):
    return losses.lml_loss(x, _relevant(x), k, temperature=T_DEFAULT if t is None else t, reduction="none")


def _stages(x: torch.Tensor) -> list[torch.Tensor]:
    """Two stages scoring the same candidates: x and a second, fixed function of x."""
    return [x, 0.5 * x.flip(-1) + x]


def _joint(x, dim=-1, k=2, t=None):
    t = T_DEFAULT if t is None else t
    return losses.joint_cascade_loss(_stages(x), _relevant(x), k, temperature=t, reduction="none")


def _joint_module(x, dim=-1, k=2, t=None):
    mod = losses.JointCascadeLoss(2, k, temperature=T_DEFAULT if t is None else t, reduction="none")
    return mod(_stages(x), _relevant(x))


def _topk_ce(x, dim=-1, k=2, t=None):
    return losses.topk_cross_entropy(x, _targets(x), k, epsilon=T_DEFAULT if t is None else t, reduction="none")


def _topk_ce_module(x, dim=-1, k=2, t=None):
    mod = losses.TopKCrossEntropyLoss(k, method="bitonic", temperature=T_DEFAULT if t is None else t, reduction="none")
    return mod(x, _targets(x))


def _hinge(x, dim=-1, k=2, t=None):
    return losses.smooth_topk_hinge_loss(
        x, _targets(x), k, temperature=T_DEFAULT if t is None else t, generator=_gen(), reduction="none"
    )


def _hinge_module(x, dim=-1, k=2, t=None):
    mod = losses.SmoothTopKHingeLoss(k, temperature=T_DEFAULT if t is None else t, generator=_gen(), reduction="none")
    return mod(x, _targets(x))


def _cascade(x, dim=-1, k=2, t=None):
    return losses.cascade_topk_loss(x, _relevant(x), k, temperature=T_DEFAULT if t is None else t, reduction="none")


def _cascade_module(x, dim=-1, k=2, t=None):
    mod = losses.CascadeTopKLoss(k, temperature=T_DEFAULT if t is None else t, reduction="none")
    return mod(x, _relevant(x))


_PERMUTAHEDRON = dict(vmap="raises")
# vmap is "—" for the losses in docs/contract.md: tested where it runs, an error where the operator inside raises.
_LOSS = dict(out="loss", nan_name="logits", k_range=(1, 0))
# k in [1, classes - 1]; temperature "float | None", σ ≥ 0 (0: the unsmoothed loss)
_HINGE = dict(_LOSS, k_range=(1, 1), temp_zero_ok=True, tensor_t=False, vmap="raises")

OPERATORS = [
    *[_mask_op(m) for m in softtopk.METHODS],
    _mask_op("sparse", label="topk_mask[sparse,p=4/3]", p=4 / 3),
    _mask_op("sigmoid", label="topk_mask[straight_through]", straight_through=True),
    _topk_op("sigmoid"),
    _topk_op("sparse"),
    Op("threshold_mask", _threshold, has_k=False, tensor_t=True),
    # softmax relaxation: "Nonnegative and sums to k, but an entry can exceed 1" (docstring)
    Op("gumbel_topk", _gumbel, tensor_k=True, normalised=True, grad=False, vmap="raises", unit=False),
    *[_permutation_op(softtopk.topk_permutation, m) for m in softtopk.PERMUTATION_METHODS],
    _permutation_op(softtopk.topk_distribution, "bitonic"),
    Op("soft_sort", _soft_sort, out="like", has_k=False, **_PERMUTAHEDRON),
    Op("soft_rank", _soft_rank, out="like", has_k=False, **_PERMUTAHEDRON),
    Op("isotonic", _isotonic, out="like", has_k=False, temp=None, nan_name="y", **_PERMUTAHEDRON),
    Op("permutahedron_projection", _projection, out="like", has_k=False, temp=None, nan_name="z", **_PERMUTAHEDRON),
    Op("permutahedron_topk", _perm_topk, tensor_k=True, tensor_t=True, normalised=True, **_PERMUTAHEDRON),
    Op("topk_magnitude", _magnitude, out="like", tensor_k=True, tensor_t=True, **_PERMUTAHEDRON),
    Op("nn.SoftTopK", _module, normalised=True, tensor_t=True),
    Op("losses.lml_loss", _lml, **_LOSS),
    Op("losses.LMLLoss", _lml_module, **_LOSS),
    Op("losses.lml_loss[set]", _lml_set, **_LOSS),
    Op("losses.topk_cross_entropy", _topk_ce, temp="epsilon", **{**_LOSS, "vmap": "raises"}),
    Op("losses.TopKCrossEntropyLoss", _topk_ce_module, **{**_LOSS, "vmap": "raises"}),
    Op("losses.smooth_topk_hinge_loss", _hinge, **_HINGE),
    Op("losses.SmoothTopKHingeLoss", _hinge_module, **_HINGE),
    Op("losses.cascade_topk_loss", _cascade, **{**_LOSS, "nan_name": "scores", "k_range": (0, 0)}),
    Op("losses.CascadeTopKLoss", _cascade_module, **{**_LOSS, "nan_name": "scores", "k_range": (0, 0)}),
    Op("losses.joint_cascade_loss", _joint, **{**_LOSS, "nan_name": "stage_scores", "k_range": (0, 0)}),
    Op("losses.JointCascadeLoss", _joint_module, **{**_LOSS, "nan_name": "stage_scores", "k_range": (0, 0)}),
]
OPS = {op.name: op for op in OPERATORS}

# Genuine failures: (test name, operator name, parameter id or None) -> reason, marked xfail(strict=True). Empty now:
# the suite found topk() returning width 0 on zero rows (the max of an empty per-row k), fixed with its test here.
XFAIL: dict[tuple[str, str, str | None], str] = {}


def cases(test: str, params=(None,)):
    """pytest params over OPERATORS x params, with the known genuine failures marked xfail(strict=True)."""
    out = []
    for op in OPERATORS:
        for p in params:
            pid = None if p is None else str(p)
            marks = []
            reason = XFAIL.get((test, op.name, pid)) or XFAIL.get((test, op.name, "*"))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            values = (op,) if p is None else (op, p)
            out.append(pytest.param(*values, id=op.name if p is None else f"{op.name}-{pid}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def tensors(out) -> tuple[torch.Tensor, ...]:
    """The tensors of a result, in order (a TopK as values, indices, weights)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def float_tensors(out) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tensors(out) if t.dtype.is_floating_point)


def soft_part(op: Op, out) -> tuple[torch.Tensor, ...]:
    """The differentiable outputs: a TopK's values and weights; everything else as is."""
    if op.out == "topk":
        return (out.values, out.weights)
    return tensors(out)


def masks(op: Op, out) -> tuple[torch.Tensor, ...]:
    """The outputs documented to lie in [0, 1]."""
    if op.out in ("mask", "kn") and op.unit:
        return tensors(out)
    if op.out == "topk":
        return (out.weights,)
    return ()


def scores(shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    """Standard normal scores (drawn in float64, then cast)."""
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def spaced(shape, gap=0.4, seed=0) -> torch.Tensor:
    """float64 scores without near-ties along the last dim (safe finite differences)."""
    *batch, n = shape
    g = _gen(seed)
    rows = [torch.randperm(n, generator=g) for _ in range(math.prod(batch))]
    x = torch.stack(rows).to(torch.float64).reshape(*batch, n) * gap
    x = x + 0.05 * gap * torch.rand(x.shape, generator=g, dtype=torch.float64)
    return x - x.mean(-1, keepdim=True)


def assert_same(a, b, *, exact=False):
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb)
    for u, v in zip(ta, tb):
        assert u.shape == v.shape and u.dtype == v.dtype
        if exact or not u.dtype.is_floating_point:
            assert torch.equal(u, v), (u, v)
        else:
            tol = 1e-12 if u.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(u, v, rtol=tol, atol=tol, equal_nan=True)


def move_back(op: Op, out, dim: int):
    """The result of a call on x.movedim(dim, -1), laid out as a call on x along ``dim`` returns it."""
    if op.out == "kn":  # documented: the score dim is moved last, batch dims in order
        return out
    moved = tuple(t.movedim(-1, dim) for t in tensors(out))
    return type(out)(*moved) if op.out == "topk" else moved[0]


def ids(ops):
    return [op.name for op in ops]


def need(condition: bool, reason: str):
    if not condition:
        pytest.skip(f"n/a (documented): {reason}")


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.mark.parametrize(("op", "dtype"), cases("test_dtype", DTYPES))
def test_dtype(op, dtype):
    x = scores((3, 7), dtype)
    out = op.call(x, -1, 2)
    for t in float_tensors(out):
        assert t.dtype == dtype, (op.name, t.dtype)
        assert torch.isfinite(t).all()
    for m in masks(op, out):
        assert float(m.min()) >= 0 and float(m.max()) <= 1


# ---------------------------------------------------------------------------------------------------------------
# dims
# ---------------------------------------------------------------------------------------------------------------
SHAPES = {1: (6,), 2: (3, 5), 3: (2, 3, 4), 4: (2, 3, 2, 4), 5: (2, 1, 3, 2, 3)}


@pytest.mark.parametrize(("op", "ndim"), cases("test_dims", SHAPES))
def test_dims(op, ndim):
    need(op.out != "loss", "the losses take (batch, classes) scores")
    x = scores(SHAPES[ndim])
    for dim in range(-ndim, ndim):
        k = min(2, x.shape[dim])
        got = op.call(x, dim, k)
        ref = move_back(op, op.call(x.movedim(dim, -1).contiguous(), -1, k), dim)
        assert_same(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# edge shapes
# ---------------------------------------------------------------------------------------------------------------
EDGES = ("batch0", "n1", "k0", "kn")


@pytest.mark.parametrize(("op", "edge"), cases("test_edge_shapes", EDGES))
def test_edge_shapes(op, edge):
    shape, k = {"batch0": ((0, 7), 2), "n1": ((3, 1), 1), "k0": ((3, 7), 0), "kn": ((3, 7), 7)}[edge]
    need(op.has_k or edge in ("batch0", "n1"), "the operator takes no k")
    x = scores(shape)
    lo, hi = op.k_range[0], shape[1] - op.k_range[1]
    if op.has_k and not lo <= k <= hi:  # documented range of k (the losses): a ValueError naming the argument
        with pytest.raises(ValueError, match="`k`|`logits`"):
            op.call(x, -1, k)
        return
    out = op.call(x, -1, k)
    for t in float_tensors(out):
        assert torch.isfinite(t).all()
    if op.out in ("mask", "like"):
        assert out.shape == x.shape
    elif op.out == "topk":
        assert all(t.shape == (shape[0], k) for t in out)
    elif op.out == "kn":
        assert out.shape == (shape[0], k, shape[1])
    elif op.out == "loss":
        assert out.shape == (shape[0],)
    for m in masks(op, out):
        assert m.numel() == 0 or (float(m.min()) >= 0 and float(m.max()) <= 1)
    if op.normalised and op.out == "mask":
        torch.testing.assert_close(out.sum(-1), torch.full(shape[:1], float(k), dtype=x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------------------------------------------
def _layout(kind: str) -> torch.Tensor:
    if kind == "transposed":
        return scores((7, 3)).t()
    if kind == "expanded":
        return scores((1, 7)).expand(3, 7)
    return scores((3, 14))[:, ::2]  # sliced with a step


@pytest.mark.parametrize(("op", "layout"), cases("test_noncontiguous", ("transposed", "expanded", "stepped")))
def test_noncontiguous(op, layout):
    x = _layout(layout)
    assert not x.is_contiguous()
    assert_same(op.call(x, -1, 2), op.call(x.contiguous(), -1, 2))


# ---------------------------------------------------------------------------------------------------------------
# inputs never modified
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", cases("test_inputs_not_modified"))
def test_inputs_not_modified(op):
    x = scores((3, 7)).requires_grad_(op.grad)
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) if op.tensor_k else 2
    if op.tensor_k and op.name in ("topk_mask[hard]", "gumbel_topk"):  # whole k
        k = torch.tensor([1, 2, 3])
    t = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64) if op.tensor_t and op.temp else None
    before = [v.detach().clone() for v in (x, k, t) if isinstance(v, torch.Tensor)]
    out = op.call(x, -1, k, t)
    if op.grad:
        sum(v.sum() for v in soft_part(op, out)).backward()
    after = [v.detach() for v in (x, k, t) if isinstance(v, torch.Tensor)]
    for b, a in zip(before, after):
        assert torch.equal(b, a)


# ---------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", cases("test_deterministic"))
def test_deterministic(op):
    x = scores((3, 7), torch.float32)
    assert_same(op.call(x, -1, 2), op.call(x, -1, 2), exact=True)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", cases("test_gradcheck"))
def test_gradcheck(op):
    need(op.grad, "hard or stochastic: no gradient to check")
    x = spaced((2, 5)).requires_grad_()
    assert gradcheck(lambda x: soft_part(op, op.call(x, -1, 2)), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and vmap
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", cases("test_compile"))
def test_compile(op):
    x = scores((3, 7))
    compiled = torch.compile(lambda x: tensors(op.call(x, -1, 2)), backend="eager")
    assert_same(tuple(compiled(x)), tensors(op.call(x, -1, 2)))


#: operators that do not trace into one graph, and why (docs/contract.md): under torch.compile they run with graph
#: breaks, which test_compile covers
NOT_FULLGRAPH = {
    "topk_mask[perturbed]": "draws noise from a torch.Generator (an opaque object)",
    "gumbel_topk": "draws noise from a torch.Generator (an opaque object)",
    "losses.smooth_topk_hinge_loss": "draws noise from a torch.Generator (an opaque object)",
    "losses.SmoothTopKHingeLoss": "draws noise from a torch.Generator (an opaque object)",
    "topk_permutation[odd_even]": "the sorting networks' layers are built per size with data-dependent guards",
    "topk_permutation[bitonic]": "the sorting networks' layers are built per size with data-dependent guards",
    "topk_distribution[bitonic]": "the sorting networks' layers are built per size with data-dependent guards",
    "losses.topk_cross_entropy": "its default P_K weights are checked in Python (data-dependent)",
    "losses.TopKCrossEntropyLoss": "runs a sorting network (data-dependent guards)",
    **{
        name: "the PAV kernel reads the data: a graph break by design"
        for name in ("soft_sort", "soft_rank", "isotonic", "permutahedron_projection", "permutahedron_topk")
    },
    "topk_magnitude": "the PAV kernel reads the data: a graph break by design",
    # the table's call builds the module, whose nn.Parameter dynamo cannot create inside a graph; the forward of a
    # built module traces into one graph (tests/test_losses.py::test_joint_compiles_fullgraph)
    "losses.JointCascadeLoss": "the call builds the module (an nn.Parameter), which dynamo does not trace",
}


@pytest.mark.parametrize("op", cases("test_compile_fullgraph"))
def test_compile_fullgraph(op):
    """Where the operator allows it, torch.compile traces it into one graph (fullgraph=True) with the same values."""
    need(op.name not in NOT_FULLGRAPH, NOT_FULLGRAPH.get(op.name, ""))
    x = scores((3, 7))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: tensors(op.call(x, -1, 2)), backend="eager", fullgraph=True)
    # traced, the iterative solvers run their whole iteration budget (no data-dependent early exit): rounding-close
    for u, v in zip(compiled(x), tensors(op.call(x, -1, 2))):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("op", cases("test_vmap"))
def test_vmap(op):
    x = scores((4, 3, 7))
    fn = torch.func.vmap(lambda r: tensors(op.call(r, -1, 2)))
    if op.vmap == "raises":
        with pytest.raises((NotImplementedError, RuntimeError)) as info:
            fn(x)
        assert len(str(info.value)) > 10
        if op.name.startswith(("topk_permutation", "topk_distribution")):  # softtopk's own message, naming it
            assert isinstance(info.value, NotImplementedError) and op.name.split("[")[0] in str(info.value)
        return
    if op.out == "loss":  # (batch, classes) only: the reference is the loop over the vmapped dim
        ref = tuple(torch.stack(ts) for ts in zip(*(tensors(op.call(r, -1, 2)) for r in x)))
    else:
        ref = tensors(op.call(x, -1, 2))
    assert_same(tuple(fn(x)), ref)


@pytest.mark.parametrize("op", cases("test_jacrev"))
def test_jacrev(op):
    """torch.func.jacrev (reverse mode through vmap) equals the Jacobian built row by row by autograd."""
    need(op.grad, "hard or stochastic: no gradient to check")
    need(op.vmap == "yes", "vmap is documented unsupported")
    x = spaced((2, 5))

    def first(r):
        return soft_part(op, op.call(r, -1, 2))[0]

    jac = torch.func.jacrev(first)(x)
    ref = torch.autograd.functional.jacobian(first, x)
    torch.testing.assert_close(jac, ref)


# ---------------------------------------------------------------------------------------------------------------
# hostile values
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", cases("test_nan_raises"))
def test_nan_raises(op):
    x = scores((3, 7))
    x[1, 3] = math.nan
    with pytest.raises(ValueError, match=f"`{op.nan_name}`"):
        op.call(x, -1, 2)


@pytest.mark.parametrize(("op", "value"), cases("test_bad_temperature", ("0", "-1", "tensor")))
def test_bad_temperature(op, value):
    need(op.temp is not None, "the operator takes no temperature")
    need(not (value == "0" and op.temp_zero_ok), "temperature = 0 is the documented unsmoothed loss")
    need(value != "tensor" or op.tensor_t, "temperature is a number only (docstring: float | None)")
    x = scores((3, 7))
    t = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64) if value == "tensor" else float(value)
    with pytest.raises(ValueError, match=f"`{op.temp}`"):
        op.call(x, -1, 2, t)


SCALES = ("f32-1e-30", "f32-1e30", "f64-1e-300", "f64-1e300")


@pytest.mark.parametrize(("op", "scale"), cases("test_extreme_scale", SCALES))
def test_extreme_scale(op, scale):
    kind, factor = scale.split("-", 1)
    dtype = torch.float32 if kind == "f32" else torch.float64
    x = scores((3, 7)) * float(factor)
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    out = op.call(x, -1, 2)
    for t in float_tensors(out):
        assert torch.isfinite(t).all(), t
    for m in masks(op, out):
        assert float(m.min()) >= 0 and float(m.max()) <= 1


# ---------------------------------------------------------------------------------------------------------------
# property fuzz: topk_mask and topk
# ---------------------------------------------------------------------------------------------------------------
WHOLE_K = ("hard", "perturbed")
NORMALISED_METHODS = ("sigmoid", "soft", "sparse", "lapsum", *WHOLE_K)


@st.composite
def _problems(draw, min_batch=0):
    batch = draw(st.integers(min_batch, 3))
    n = draw(st.integers(1, 9))
    method = draw(st.sampled_from(softtopk.METHODS))
    k = draw(st.integers(0, n)) if method in WHOLE_K or method == "dftopk" else draw(st.floats(0, n))
    values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=batch * n, max_size=batch * n))
    temperature = draw(st.floats(0.01, 10.0))
    return torch.tensor(values, dtype=torch.float64).reshape(batch, n), k, method, temperature


def _options(method, temperature):
    if method == "hard":
        return {}
    if method == "perturbed":
        return {"temperature": temperature, "generator": _gen()}
    return {"temperature": temperature}


@settings(max_examples=25, deadline=None)
@given(_problems())
def test_fuzz_topk_mask(problem):
    x, k, method, temperature = problem
    y = softtopk.topk_mask(x, k, method=method, **_options(method, temperature))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.numel() == 0 or (float(y.min()) >= 0 and float(y.max()) <= 1)
    if method in NORMALISED_METHODS:
        torch.testing.assert_close(y.sum(-1), torch.full(x.shape[:1], float(k), dtype=x.dtype), atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(_problems(min_batch=0))
def test_fuzz_topk(problem):
    x, k, method, temperature = problem
    width = math.ceil(k)
    r = softtopk.topk(x, width, method=method, **_options(method, temperature)) if method in WHOLE_K else None
    if r is None:
        r = softtopk.topk(x, k, method=method, width=width, **_options(method, temperature))
    assert r.weights.shape == (x.shape[0], width)
    w = r.weights
    assert w.numel() == 0 or (float(w.min()) >= 0 and float(w.max()) <= 1)
    torch.testing.assert_close(r.values, torch.topk(x, width).values, rtol=0, atol=0)
    if method in NORMALISED_METHODS:
        total = r.weights.sum(-1) + r.outside.reshape(-1)
        torch.testing.assert_close(total, torch.full(x.shape[:1], float(k), dtype=x.dtype), atol=1e-6, rtol=0)


@st.composite
def _operator_inputs(draw):
    op = draw(st.sampled_from(OPERATORS))
    batch, n = draw(st.integers(0, 3)), draw(st.integers(3, 8))
    values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=batch * n, max_size=batch * n))
    return op, torch.tensor(values, dtype=torch.float64).reshape(batch, n)


@settings(max_examples=60, deadline=None)
@given(_operator_inputs())
def test_fuzz_every_operator(problem):
    """Every operator on random shapes (0 to 3 rows) and values (ties included): finite results, masks in [0, 1]."""
    op, x = problem
    out = op.call(x, -1, 2)
    for t in float_tensors(out):
        assert torch.isfinite(t).all(), (op.name, t)
    for m in masks(op, out):
        assert m.numel() == 0 or (float(m.min()) >= 0 and float(m.max()) <= 1 + 1e-12), (op.name, m)
