r"""Top-k classification and selection losses built on the operators of :mod:`softtopk`.

Each loss is a function (``lml_loss``, ``topk_cross_entropy``, ``smooth_topk_hinge_loss``, ``cascade_topk_loss``)
and an ``nn.Module`` (``LMLLoss``, ``TopKCrossEntropyLoss``, ``SmoothTopKHingeLoss``, ``CascadeTopKLoss``). They
take scores of shape (batch, classes) in any floating dtype (float16 and bfloat16 are computed in float32; the
loss has the scores' dtype) and reduce over the batch like ``torch.nn`` losses: ``reduction="mean"`` (default),
``"sum"`` or ``"none"`` (one loss per row).

Logarithms of probabilities are taken as :math:`\log\max(p, \mathrm{tiny})`, tiny the smallest normal number of
the compute dtype (1.2e-38 in float32, 2.2e-308 in float64): finite losses (at most 87.3 in float32) where a
probability underflows to 0; there the gradient through that term is 0.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._prepare import (
    DEFAULT_TEMPERATURE,
    SCALES,
    can_read_data,
    check_finite,
    check_input,
    check_temperature,
    compute_dtype,
    prepare,
    reject_unused,
)
from ._registry import internal_temperature, lookup
from .masks import topk_mask
from .permutations import topk_permutation

__all__ = [
    "DEFAULT_P_K",
    "CascadeTopKLoss",
    "JointCascadeLoss",
    "LMLLoss",
    "SmoothTopKHingeLoss",
    "TopKCrossEntropyLoss",
    "cascade_topk_loss",
    "joint_cascade_loss",
    "lml_loss",
    "smooth_topk_hinge_loss",
    "topk_cross_entropy",
]

REDUCTIONS = ("mean", "sum", "none")
#: The distribution P_K of :func:`topk_cross_entropy` when neither ``k`` nor ``p_k`` is given: half top-1, half
#: top-5 (Petersen et al. 2022, the difftopk library's example and one of the paper's settings).
DEFAULT_P_K = (0.5, 0.0, 0.0, 0.0, 0.5)
TOP1_MODES = ("softmax", "cross_entropy", "sort")


# ----------------------------------------------------------------------------------------------------------------
# validation and reduction shared by the losses
# ----------------------------------------------------------------------------------------------------------------
def _check_logits(x: Any, fn: str, name: str = "logits") -> None:
    """A finite floating tensor of shape (batch, classes) with at least one class."""
    check_input(x, name, fn=fn)  # Tensor, floating dtype
    if x.dim() != 2:
        raise ValueError(f"{fn}: `{name}` must have shape (batch, classes), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{fn}: `{name}` must have at least one class, got shape {tuple(x.shape)}")
    check_finite(x, name, fn=fn)  # no NaN, no ±inf


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_target(target: object, logits: Tensor, fn: str, name: str = "target") -> None:
    """Class indices: an integer tensor of shape (batch,) with values in [0, classes)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor of class indices, got {type(target).__name__}")
    if not _is_integer_dtype(target.dtype):
        raise TypeError(f"{fn}: `{name}` must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"{fn}: `{name}` must have shape (batch,) = {tuple(logits.shape[:1])} to match `logits` of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    n = logits.shape[1]
    if target.numel() and can_read_data(target) and not bool(((target >= 0) & (target < n)).all()):
        raise ValueError(f"{fn}: `{name}` must hold class indices in [0, {n - 1}]; got values outside it")


def _check_reduction(reduction: object, fn: str) -> None:
    if not isinstance(reduction, str):
        raise TypeError(f"{fn}: `reduction` must be a string, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: unknown `reduction`={reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")


def _check_int(value: Any, name: str, lo: int, hi: float, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{fn}: `{name}`={value} is out of range [{lo}, {hi}]")
    return int(value)


def _check_real(value: object, name: str, fn: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "nonnegative"
        raise ValueError(f"{fn}: `{name}` must be a finite {kind} number, got {value}")
    return value


def _check_temperature_scale(temperature: Any, scale: Any, fn: str) -> None:
    """The loss's own check of the mask arguments, so that its errors name the loss."""
    if temperature is not None:
        check_temperature(temperature, fn=fn)
    if scale not in SCALES:
        raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")


def _safe_log(p: Tensor) -> Tensor:
    """log max(p, tiny): finite where p underflows (module docstring)."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def _reduce(loss: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# LML
# ----------------------------------------------------------------------------------------------------------------
def lml_loss(
    logits: Tensor,
    target: Tensor,
    k: int,
    *,
    temperature: Union[float, Tensor, None] = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Top-k loss of the Limited Multi-Label projection layer: :math:`-\log y_{\mathrm{target}}`, or
    :math:`-\sum_{i \in G} \log y_i` for a set G of targets.

    :math:`y = \arg\max_{0 \le y \le 1,\ \sum_i y_i = k} \langle x/t, y\rangle + H_b(y)` is the LML projection
    (Amos, Koltun & Kolter 2019, "The Limited Multi-Label Projection Layer"), i.e. ``topk_mask(logits, k,
    method="sigmoid", temperature=T)``: :math:`y_i = \sigma((x_i - \tau)/t)`, t = T/4, :math:`\sum_i y_i = k`. The loss
    is the negative log-likelihood of the target class under y, taken as :math:`-\log\max(y, \mathrm{tiny})` (tiny
    of the compute dtype; see :mod:`softtopk.losses`). It is 0 for k = classes and tends to 0 (target among the
    k largest) or grows without bound (target outside) as t → 0. k = 1 is not softmax cross-entropy: the LML
    layer with k = 1 is a sigmoid of the logits with a common threshold τ.

    **Sets of targets** (ranking, multi-label): ``target`` may also give a set G per row, as integer indices of
    shape (batch, K) or as a 0-1 indicator of the logits' shape; the loss is then the negative log-likelihood of
    the set, :math:`-\sum_{i \in G} \log y_i` (the LML paper's multi-label likelihood; 0 for an empty set). One
    class is the case K = 1, with the same value. It extends ``lml_loss`` rather than adding a function because
    the mask, k, the temperature and the reduction are the same and a class index is a one-element set. With
    k ≥ |G| the loss tends to 0 as t → 0 when G lies among the k largest; with k < |G| it stays bounded below by
    the cost of putting mass k on |G| items.

    Args:
        logits: scores of shape (batch, classes), finite.
        target: class indices of shape (batch,) (an integer tensor); or a set per row: integer indices of shape
            (batch, K) (no repeats within a row) or a 0-1 indicator of shape (batch, classes) (bool or float).
        k: the size of the predicted set, an int in [1, classes].
        temperature: T > 0 (the width convention of :func:`softtopk.topk_mask`; None: 1.0), a number or a
            per-row tensor of shape (batch,).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from softtopk.losses import lml_loss
        >>> logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
        >>> lml_loss(logits, torch.tensor([2, 0]), k=2, temperature=4.0, reduction="none")
        tensor([0.4741, 1.7014])
        >>> lml_loss(logits, torch.tensor([[2, 0], [0, 3]]), k=2, temperature=4.0, reduction="none")  # sets
        tensor([0.6755, 1.9028])
    """
    fn = "lml_loss"
    _check_logits(logits, fn)
    is_set = isinstance(target, Tensor) and target.dim() == 2
    if not is_set:
        _check_target(target, logits, fn)
    rel = _relevance(target, logits, fn, name="target") if is_set else None
    k = _check_int(k, "k", 1, logits.shape[1], fn)
    _check_temperature_scale(temperature, None, fn)
    _check_reduction(reduction, fn)
    x = logits.to(compute_dtype(logits))
    y = topk_mask(x, k, method="sigmoid", temperature=temperature)
    if rel is None:
        loss = -_safe_log(y.gather(1, target.long().unsqueeze(1)).squeeze(1))
    else:
        loss = -(rel * _safe_log(y)).sum(1)
    return _reduce(loss, reduction, logits.dtype)


class LMLLoss(nn.Module):
    """``nn.Module`` form of :func:`lml_loss`: ``LMLLoss(k, temperature=1.0)(logits, target)``; ``target`` is one
    class per row or a set per row (indices (batch, K) or a 0-1 indicator), as :func:`lml_loss`.

    Example:
        >>> import torch
        >>> from softtopk.losses import LMLLoss
        >>> LMLLoss(k=2, temperature=4.0)(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([2]))
        tensor(0.4741)
    """

    def __init__(self, k: int, *, temperature: Union[float, Tensor, None] = None, reduction: str = "mean"):
        super().__init__()
        _check_int(k, "k", 1, math.inf, "LMLLoss")
        if temperature is not None:
            check_temperature(temperature, fn="LMLLoss")
        _check_reduction(reduction, "LMLLoss")
        self.k, self.temperature, self.reduction = k, temperature, reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return lml_loss(logits, target, self.k, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------------------------------------------
# Differentiable top-k cross-entropy (Petersen et al. 2022)
# ----------------------------------------------------------------------------------------------------------------
def _parse_p_k(k: object, p_k: object, fn: str) -> tuple[float, ...]:
    """The distribution P_K over k = 1, …, K_max as a tuple of floats (see :func:`topk_cross_entropy`)."""
    if p_k is None:
        if k is None:
            return DEFAULT_P_K
        kk = _check_int(k, "k", 1, math.inf, fn)
        return (1.0,) if kk == 1 else (0.5,) + (0.0,) * (kk - 2) + (0.5,)
    if isinstance(p_k, Tensor):
        if p_k.dim() != 1:
            raise ValueError(f"{fn}: `p_k` must be 1-D, got shape {tuple(p_k.shape)}")
        p_k = p_k.tolist()
    if isinstance(p_k, (str, bytes)) or not isinstance(p_k, Sequence):
        raise TypeError(f"{fn}: `p_k` must be a sequence of weights, got {type(p_k).__name__}")
    if len(p_k) == 0:
        raise ValueError(f"{fn}: `p_k` must hold at least one weight")
    if any(isinstance(p, bool) or not isinstance(p, numbers.Real) for p in p_k):
        raise TypeError(f"{fn}: `p_k` must hold numbers, got {list(p_k)!r}")
    p = tuple(float(v) for v in p_k)
    if not all(math.isfinite(v) and v >= 0 for v in p):
        raise ValueError(f"{fn}: `p_k` must hold finite nonnegative weights, got {list(p)!r}")
    if not math.isclose(math.fsum(p), 1.0, rel_tol=0.0, abs_tol=1e-6):
        raise ValueError(f"{fn}: `p_k` must sum to 1, got {list(p)!r} summing to {math.fsum(p):.6g}")
    if k is not None and _check_int(k, "k", 1, math.inf, fn) != len(p):
        raise ValueError(f"{fn}: `k`={k} must equal len(p_k)={len(p)} (the largest k of P_K) when both are given")
    return p


def _check_top1(top1: object, fn: str) -> None:
    if not isinstance(top1, str) or top1 not in TOP1_MODES:
        raise ValueError(f"{fn}: unknown `top1`={top1!r}; choose one of {', '.join(map(repr, TOP1_MODES))}")


def _check_permutation_method(method: object, options: dict, temperature: object, fn: str) -> None:
    spec = lookup("permutation", method, options, fn=fn)
    if spec.factor is None and temperature is not None:
        raise TypeError(f"{fn}: method={method!r} takes no `temperature` (it takes `epsilon`)")


def _preselect(x: Tensor, target: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The target's score and the m − 1 largest other scores, (batch, m), in decreasing order of score (the target
    after the others it ties with), and the target's column. Not the target at a fixed column: a sorting network is
    not exactly permutation-equivariant, and a fixed column would bias the target's probability whatever its score."""
    others = x.detach().scatter(1, target.unsqueeze(1), -math.inf)
    idx = torch.cat([others.topk(m - 1, dim=1).indices, target.unsqueeze(1)], dim=1)
    order = x.detach().gather(1, idx).argsort(dim=1, descending=True, stable=True)
    return x.gather(1, idx.gather(1, order)), (order == m - 1).to(torch.int64).argmax(dim=1)


def topk_cross_entropy(
    logits: Tensor,
    target: Tensor,
    k: int | None = None,
    *,
    p_k: Sequence[float] | None = None,
    candidates: int | None = None,
    method: str = "sinkhorn",
    temperature: Union[float, Tensor, None] = None,
    top1: str = "softmax",
    reduction: str = "mean",
    **method_options,
) -> Tensor:
    r"""Differentiable top-k cross-entropy (Petersen, Kuehne, Borgelt & Deussen 2022, "Differentiable Top-k
    Classification Learning"): :math:`-\log \sum_{k=1}^{K} p_k\, P_k[\mathrm{target}]`.

    :math:`\Gamma` = ``topk_permutation(logits, K, method=method, temperature=temperature)`` (row j softly
    indicates the (j + 1)-th largest class) gives :math:`P_k = \sum_{j<k} \Gamma_j`, the soft probability that a
    class is among the top k, and the loss is the cross-entropy of the mixture
    :math:`p = \sum_k p_k P_k = \sum_j w_j \Gamma_j`, :math:`w_j = \sum_{k > j} p_k` (the paper's Figure 1: the
    weights of the ranks are a cumulative sum of P_K). The mixture is inside the logarithm, as in the paper and
    its code, not a mixture of per-k cross-entropies. ``top1`` sets the top-1 component:

    - ``"softmax"`` (default, the paper's and difftopk's ``top1_mode='sm'``): :math:`P_1` is replaced by
      softmax(logits), :math:`p = p_1\,\mathrm{softmax} + \sum_{k\ge2} p_k P_k`, its log taken as a log-sum-exp
      so that the softmax part keeps its gradient when the sorted part underflows. With ``p_k=(1,)`` the loss is
      exactly softmax cross-entropy.
    - ``"cross_entropy"`` (difftopk's ``'smce'``): :math:`p_1\,\mathrm{CE}(\mathrm{logits}) - (1 - p_1)
      \log\bigl(\sum_{k\ge2} p_k P_k / (1 - p_1)\bigr)`. (difftopk omits the ``/ (1 - p_1)``, which only shifts
      the loss by the constant :math:`(1 - p_1)\log(1 - p_1)`.)
    - ``"sort"``: :math:`P_1` from Γ like the other components.

    ``candidates`` (the paper's m, e.g. 16 for ImageNet-1K): only that many classes are sorted, the target and the
    m − 1 largest other logits, selected hard (the gradient flows to the m selected logits only; the softmax of
    the top-1 term is then over these m as well, as in difftopk). ``candidates=None`` sorts all classes.

    Args:
        logits: scores of shape (batch, classes), finite.
        target: class indices of shape (batch,), an integer tensor.
        k: shorthand for P_K when ``p_k`` is not given: ``k=K`` means :math:`P_K = (1/2, 0, \dots, 0, 1/2)` of
            length K (half top-1, half top-K, as in difftopk's example; (1,) for K = 1). With ``p_k``, k must
            equal ``len(p_k)``. Neither: P_K = (0.5, 0, 0, 0, 0.5).
        p_k: weights :math:`(p_1, \dots, p_K)` of top-1 … top-K, nonnegative, summing to 1 (e.g. the paper's
            (.5, 0, 0, 0, .5), (.25, 0, 0, 0, .75), (.2, .2, .2, .2, .2)).
        candidates: the number of classes sorted, an int in [K, classes], or None (all).
        method: a method of :func:`softtopk.topk_permutation`: ``"sinkhorn"`` (SOFT optimal transport, default),
            ``"odd_even"`` or ``"bitonic"`` (differentiable sorting networks, the paper's choice).
        temperature: of ``topk_permutation``'s sorting networks (t = 1/steepness; the paper used steepness 0.5 – 2
            on logits); None uses ``topk_permutation``'s default. ``"sinkhorn"`` takes the option ``epsilon``.
        top1: ``"softmax"`` (default), ``"cross_entropy"`` or ``"sort"``, see above.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        **method_options: passed to ``topk_permutation`` (``relaxation`` for the networks, ``epsilon``, ``tol``
            and ``max_iter`` for ``"sinkhorn"``).

    Example:
        >>> import torch
        >>> from softtopk.losses import topk_cross_entropy
        >>> logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
        >>> target = torch.tensor([2, 2])
        >>> topk_cross_entropy(logits, target, p_k=[0.5, 0.5], method="odd_even", temperature=0.5,
        ...                    reduction="none")
        tensor([0.7044, 2.1954])
        >>> ce = torch.nn.functional.cross_entropy(logits, target)
        >>> bool(torch.allclose(topk_cross_entropy(logits, target, p_k=[1.0]), ce))
        True
    """
    fn = "topk_cross_entropy"
    _check_logits(logits, fn)
    _check_target(target, logits, fn)
    p = _parse_p_k(k, p_k, fn)
    n = logits.shape[1]
    if len(p) > n:
        raise ValueError(f"{fn}: P_K has K={len(p)} weights (`p_k` or `k`), more than the {n} classes")
    m = n if candidates is None else _check_int(candidates, "candidates", len(p), n, fn)
    _check_permutation_method(method, method_options, temperature, fn)
    _check_top1(top1, fn)
    _check_reduction(reduction, fn)
    x, t = logits.to(compute_dtype(logits)), target.long()
    if m < n:
        x, t = _preselect(x, t, m)
    opts = dict(method_options, **({} if temperature is None else {"temperature": temperature}))
    rest = _sorted_part(x, t, p, top1, method, opts)
    return _reduce(_mixture_loss(x, t, p[0], rest, top1), reduction, logits.dtype)


def _sorted_part(x: Tensor, t: Tensor, p: tuple[float, ...], top1: str, method: str, opts: dict) -> Tensor | None:
    """Σ_j w_j Γ_j[target] over the ranks sorted by ``topk_permutation`` (None when no weight needs them)."""
    kmax = len(p)
    weights = torch.tensor(p, dtype=x.dtype, device=x.device).flip(0).cumsum(0).flip(0)  # w_j = Σ_{i≥j} p_i
    if top1 != "sort":
        weights[0] = weights[1] if kmax > 1 else 0.0  # row 0 enters only the components k ≥ 2
    if not bool((weights > 0).any()):
        return None
    gamma = topk_permutation(x, kmax, method=method, **opts)  # (batch, K, m)
    g_target = gamma.gather(2, t.view(-1, 1, 1).expand(-1, kmax, 1)).squeeze(2)  # (batch, K)
    return (g_target * weights).sum(1)


def _mixture_loss(x: Tensor, t: Tensor, p1: float, rest: Tensor | None, top1: str) -> Tensor:
    """−log of the mixture of the top-1 term (per ``top1``) and the sorted part ``rest``."""
    if top1 == "sort":
        assert rest is not None  # every rank has a weight in "sort" mode (p_k sums to 1)
        return -_safe_log(rest)
    log_sm = F.log_softmax(x, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)
    if top1 == "softmax":
        if rest is None:
            return -log_sm
        if p1 == 0.0:
            return -_safe_log(rest)
        return -torch.logaddexp(math.log(p1) + log_sm, _safe_log(rest))
    loss = -p1 * log_sm if p1 > 0 else torch.zeros_like(log_sm)  # "cross_entropy"
    return loss if rest is None else loss - (1.0 - p1) * _safe_log(rest / (1.0 - p1))


class TopKCrossEntropyLoss(nn.Module):
    """``nn.Module`` form of :func:`topk_cross_entropy`: ``TopKCrossEntropyLoss(p_k=..., method=...)(logits,
    target)``. The arguments are checked when the module is built.

    Example:
        >>> import torch
        >>> from softtopk.losses import TopKCrossEntropyLoss
        >>> loss = TopKCrossEntropyLoss(p_k=[0.5, 0.5], method="odd_even", temperature=0.5)
        >>> loss(torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]]), torch.tensor([2]))
        tensor(0.7044)
    """

    def __init__(
        self,
        k: int | None = None,
        *,
        p_k: Sequence[float] | None = None,
        candidates: int | None = None,
        method: str = "sinkhorn",
        temperature: Union[float, Tensor, None] = None,
        top1: str = "softmax",
        reduction: str = "mean",
        **method_options,
    ):
        super().__init__()
        fn = "TopKCrossEntropyLoss"
        self.p_k = _parse_p_k(k, p_k, fn)
        if candidates is not None:
            _check_int(candidates, "candidates", len(self.p_k), math.inf, fn)
        _check_permutation_method(method, method_options, temperature, fn)
        if temperature is not None:
            check_temperature(temperature, fn=fn)
        _check_top1(top1, fn)
        _check_reduction(reduction, fn)
        self.candidates, self.method, self.temperature, self.top1 = candidates, method, temperature, top1
        self.reduction, self.method_options = reduction, method_options

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return topk_cross_entropy(
            logits,
            target,
            p_k=self.p_k,
            candidates=self.candidates,
            method=self.method,
            temperature=self.temperature,
            top1=self.top1,
            reduction=self.reduction,
            **self.method_options,
        )

    def extra_repr(self) -> str:
        opts = "".join(f", {key}={val!r}" for key, val in self.method_options.items())
        return (
            f"p_k={self.p_k}, candidates={self.candidates}, method={self.method!r}, temperature={self.temperature}, "
            f"top1={self.top1!r}, reduction={self.reduction!r}{opts}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Stochastically smoothed top-K hinge loss (Garcin et al. 2022)
# ----------------------------------------------------------------------------------------------------------------
class _NoisedKthLargest(torch.autograd.Function):
    """φ̂(x) = (1/S) Σ_s top_j(x + σ Z_s) along dim 1, the j-th largest of each noised copy, averaged.

    Forward: noise (batch, n, S) is σZ; the j-th largest of each of the S copies is found by selection
    (``kthvalue``), O(n S) per row, and only its index is kept, (batch, S).
    Backward (perturbed optimizer, Berthet et al. 2020; Garcin et al. 2022):
        ∇φ̂(x) = (1/S) Σ_s e_{i_s},   i_s = the index of the j-th largest entry of x + σ Z_s,
    the Monte Carlo estimate of ∇ E[top_j(x + σZ)] = E[arg top_j(x + σZ)] (the one-hot of the j-th largest), which
    is also the exact gradient of the piecewise-linear φ̂. O(batch · (n + S)) memory, no n × n tensor.
    """

    @staticmethod
    def forward(x: Tensor, noise: Tensor, j: int) -> tuple[Tensor, Tensor]:
        vals, idx = torch.kthvalue(-(x.unsqueeze(-1) + noise), j, dim=1)  # j-th smallest of −(x + σZ)
        return -vals.mean(-1), idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.n = inputs[0].shape[1]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_idx):
        (idx,) = ctx.saved_tensors
        counts = torch.zeros(idx.shape[0], ctx.n, dtype=grad.dtype, device=grad.device)
        counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=grad.dtype, device=grad.device))
        return counts * (grad / idx.shape[1]).unsqueeze(1), None, None


def _class_margins(class_counts: object, n: int, margin: float, fn: str, device, dtype) -> Tensor:
    """m_c = margin · (min_j n_j / n_c)^{1/4}: LDAM margins ∝ n_c^{-1/4}, the largest (``margin``) on the rarest."""
    if isinstance(class_counts, Tensor):
        counts = class_counts.detach().to(device="cpu", dtype=torch.float64)
    else:
        if isinstance(class_counts, (str, bytes)) or not isinstance(class_counts, Sequence):
            raise TypeError(
                f"{fn}: `class_counts` must be a sequence or tensor of counts, got {type(class_counts).__name__}"
            )
        if any(isinstance(c, bool) or not isinstance(c, numbers.Real) for c in class_counts):
            raise TypeError(f"{fn}: `class_counts` must hold numbers")
        counts = torch.tensor([float(c) for c in class_counts], dtype=torch.float64)
    if counts.shape != (n,):
        raise ValueError(f"{fn}: `class_counts` must hold one count per class ({n}), got shape {tuple(counts.shape)}")
    if not bool((torch.isfinite(counts) & (counts > 0)).all()):
        raise ValueError(f"{fn}: `class_counts` must be positive and finite")
    return (margin * (counts.min() / counts) ** 0.25).to(device=device, dtype=dtype)


def _noise_options(temperature: object, n_samples: object, fn: str) -> tuple[float, int]:
    """(σ, n_samples) of the hinge loss: σ = temperature ≥ 0 (None: 1.0); n_samples (None: 5) only when σ > 0."""
    sigma = _check_real(DEFAULT_TEMPERATURE if temperature is None else temperature, "temperature", fn)
    if sigma == 0:
        reject_unused(fn, "temperature=0 (the unsmoothed loss)", n_samples=n_samples)
    return sigma, _check_int(5 if n_samples is None else n_samples, "n_samples", 1, math.inf, fn)


def smooth_topk_hinge_loss(
    logits: Tensor,
    target: Tensor,
    k: int,
    *,
    temperature: float | None = None,
    n_samples: int | None = None,
    margin: float = 1.0,
    balanced: bool = True,
    class_counts: Union[Sequence[float], Tensor, None] = None,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Stochastically smoothed top-K calibrated hinge loss: :math:`s\,(m_y + \widehat{\mathrm{top}}_{K+1,\sigma}
    (x) - x_y)_+`.

    Garcin, Servajean, Joly & Salmon 2022 (ICML), "Stochastic smoothing of the top-K calibrated hinge loss for deep
    imbalanced classification". The top-K calibrated hinge loss :math:`(1 + \mathrm{top}_{K+1}(x) - x_y)_+`
    (Yang & Koyejo 2020; :math:`\mathrm{top}_j` the j-th largest entry, over all classes, the target's included)
    is smoothed by the perturbed optimizer: :math:`\mathrm{top}_{K+1}` is replaced by
    :math:`\mathrm{top}_{K+1,\sigma}(x) = E[\mathrm{top}_{K+1}(x + \sigma Z)]`, Z standard Gaussian, estimated
    by Monte Carlo over ``n_samples`` draws (fresh at every call), with gradient
    :math:`E[\arg\mathrm{top}_{K+1}(x + \sigma Z)]` estimated on the same draws (the one-hot of the (K + 1)-th
    largest noised entry; O(batch · (classes + n_samples)) memory). σ = 0 gives the unsmoothed loss.

    - ``balanced=True`` (the paper's balanced loss): the same margin :math:`m_y = ` ``margin`` for every class
      (the paper: 1).
    - ``balanced=False`` (the paper's imbalanced loss): label-dependent margins from the training class
      frequencies ``class_counts`` (:math:`n_c`), as in LDAM (Cao et al. 2019): :math:`m_c \propto n_c^{-1/4}`,
      the largest, ``margin``, on the rarest class: :math:`m_c = \mathrm{margin}\,(\min_j n_j / n_c)^{1/4}`.

    ``scale`` s multiplies the hinge. The paper uses it (with ``balanced=False``) on cosine logits, i.e.
    normalised last-layer weights and features, with s = 60, largest margin 0.2, σ = 0.01 and 5 samples on
    Pl@ntNet-300K; on raw logits s = 1 (default) is the natural choice. The paper's balanced experiments use
    σ = 0.2 (CIFAR-100, 10 samples) and σ = 1 (Pl@ntNet-300K, 5 samples); the defaults here are σ = 1,
    5 samples, margin 1 (the authors' code's defaults).

    Args:
        logits: scores of shape (batch, classes), finite.
        target: class indices of shape (batch,), an integer tensor.
        k: K, an int in [1, classes − 1].
        temperature: σ ≥ 0, the noise scale in the units of the logits (the paper's ε); None: 1.0; 0: unsmoothed.
        n_samples: the number of noise draws per row, a positive int (None: 5); not taken at temperature 0.
        margin: the margin (balanced) or the largest margin (imbalanced), ≥ 0.
        balanced: the balanced (default) or the imbalanced loss, which needs ``class_counts``.
        class_counts: the number of training examples of each class (``balanced=False`` only).
        scale: s > 0.
        generator: a ``torch.Generator`` on the logits' device for reproducible noise.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from softtopk.losses import smooth_topk_hinge_loss
        >>> logits = torch.tensor([[2.0, 1.5, -3.0, 0.5], [7.5, 4.0, -1.5, 0.0]])
        >>> target = torch.tensor([3, 2])
        >>> smooth_topk_hinge_loss(logits, target, k=2, temperature=0.0, reduction="none")  # unsmoothed
        tensor([1.0000, 2.5000])
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = smooth_topk_hinge_loss(logits, target, k=2, temperature=1.0, n_samples=1000, generator=g,
        ...                               reduction="none")
        >>> loss.round(decimals=2)
        tensor([0.7300, 2.6100])
    """
    fn = "smooth_topk_hinge_loss"
    _check_logits(logits, fn)
    _check_target(target, logits, fn)
    n = logits.shape[1]
    if n < 2:
        raise ValueError(
            f"{fn}: `logits` must have at least 2 classes (the loss compares the target with the "
            f"(k+1)-th largest), got {n}"
        )
    k = _check_int(k, "k", 1, n - 1, fn)
    sigma, n_samples = _noise_options(temperature, n_samples, fn)
    margin = _check_real(margin, "margin", fn)
    scale = _check_real(scale, "scale", fn, positive=True)
    if not isinstance(balanced, bool):
        raise TypeError(f"{fn}: `balanced` must be a bool, got {type(balanced).__name__}")
    if balanced and class_counts is not None:
        raise ValueError(f"{fn}: `class_counts` is used only by the imbalanced loss; pass balanced=False")
    if not balanced and class_counts is None:
        raise ValueError(f"{fn}: the imbalanced loss (balanced=False) needs `class_counts`")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    _check_reduction(reduction, fn)

    cdtype = compute_dtype(logits)
    x = logits.to(cdtype)
    t = target.long()
    if sigma > 0:
        z = torch.randn((x.shape[0], n, n_samples), generator=generator, device=x.device, dtype=cdtype)
        kth, _ = _NoisedKthLargest.apply(x, z.mul_(sigma), k + 1)
    else:
        kth = x.topk(k + 1, dim=1).values[:, -1]
    m_y: Union[float, Tensor] = margin
    if not balanced:
        m_y = _class_margins(class_counts, n, margin, fn, x.device, cdtype)[t]
    loss = scale * F.relu(m_y + kth - x.gather(1, t.unsqueeze(1)).squeeze(1))
    return _reduce(loss, reduction, logits.dtype)


class SmoothTopKHingeLoss(nn.Module):
    """``nn.Module`` form of :func:`smooth_topk_hinge_loss`; each call draws fresh noise (from ``generator`` if
    given).

    Example:
        >>> import torch
        >>> from softtopk.losses import SmoothTopKHingeLoss
        >>> loss = SmoothTopKHingeLoss(k=2, balanced=False, class_counts=[5, 15, 10, 20], temperature=0.0)
        >>> loss(torch.tensor([[2.0, 1.5, -3.0, 0.5]]), torch.tensor([2]))
        tensor(4.3409)
    """

    def __init__(
        self,
        k: int,
        *,
        temperature: float | None = None,
        n_samples: int | None = None,
        margin: float = 1.0,
        balanced: bool = True,
        class_counts: Union[Sequence[float], Tensor, None] = None,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        fn = "SmoothTopKHingeLoss"
        _check_int(k, "k", 1, math.inf, fn)
        _noise_options(temperature, n_samples, fn)
        _check_real(margin, "margin", fn)
        _check_real(scale, "scale", fn, positive=True)
        if not isinstance(balanced, bool):
            raise TypeError(f"{fn}: `balanced` must be a bool, got {type(balanced).__name__}")
        if balanced and class_counts is not None:
            raise ValueError(f"{fn}: `class_counts` is used only by the imbalanced loss; pass balanced=False")
        if not balanced:
            if class_counts is None:
                raise ValueError(f"{fn}: the imbalanced loss (balanced=False) needs `class_counts`")
            n = len(class_counts)
            _class_margins(class_counts, n, margin, fn, "cpu", torch.float64)  # validates
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
        _check_reduction(reduction, fn)
        self.k, self.temperature, self.n_samples, self.margin, self.scale = k, temperature, n_samples, margin, scale
        self.balanced, self.class_counts, self.generator, self.reduction = balanced, class_counts, generator, reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return smooth_topk_hinge_loss(
            logits,
            target,
            self.k,
            temperature=self.temperature,
            n_samples=self.n_samples,
            margin=self.margin,
            balanced=self.balanced,
            class_counts=self.class_counts,
            scale=self.scale,
            generator=self.generator,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, temperature={self.temperature}, n_samples={self.n_samples}, margin={self.margin}, "
            f"balanced={self.balanced}, scale={self.scale}, reduction={self.reduction!r}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Cascade top-K selection loss (DFTopK, Zhu et al. 2025)
# ----------------------------------------------------------------------------------------------------------------
def _relevance(relevant: object, scores: Tensor, fn: str, name: str = "relevant") -> Tensor:
    """The 0/1 indicator (batch, n) in the scores' compute dtype of a set given as an indicator or as indices."""
    if not isinstance(relevant, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(relevant).__name__}")
    cdtype = compute_dtype(scores)
    b, n = scores.shape
    if relevant.dtype == torch.bool or relevant.dtype.is_floating_point:
        if relevant.shape != scores.shape:
            raise ValueError(
                f"{fn}: a boolean or floating `{name}` is a 0-1 indicator of the scores' shape {tuple(scores.shape)}"
                f", got shape {tuple(relevant.shape)}"
            )
        rel = relevant.to(device=scores.device, dtype=cdtype)
        if can_read_data(rel) and not bool(((rel == 0) | (rel == 1)).all()):
            raise ValueError(f"{fn}: `{name}` as an indicator must hold only 0 and 1")
        return rel
    if not _is_integer_dtype(relevant.dtype):
        raise TypeError(
            f"{fn}: `{name}` must be a bool/float indicator or an integer index tensor, got {relevant.dtype}"
        )
    if relevant.dim() != 2 or relevant.shape[0] != b or relevant.shape[1] > n:
        raise ValueError(
            f"{fn}: an integer `{name}` holds item indices of shape (batch, K) with batch={b} and K <= {n}, got "
            f"shape {tuple(relevant.shape)} (pass a 0-1 indicator as bool or float)"
        )
    idx = relevant.to(device=scores.device, dtype=torch.long)
    if idx.numel() and can_read_data(idx) and not bool(((idx >= 0) & (idx < n)).all()):
        raise ValueError(f"{fn}: `{name}` must hold item indices in [0, {n - 1}]; got values outside it")
    rel = torch.zeros((b, n), dtype=cdtype, device=scores.device).scatter_(1, idx, 1.0)
    if can_read_data(rel) and idx.numel() and bool((rel.sum(1) != idx.shape[1]).any()):
        raise ValueError(
            f"{fn}: `{name}` has a repeated index in a row (an integer `{name}` holds item indices; pass a 0-1 "
            f"indicator as bool or float)"
        )
    return rel


def _warn_underflow(y: Tensor, rel: Tensor, fn: str, stacklevel: int) -> None:
    """A ``RuntimeWarning`` when the mask underflows to 0 at a relevant item (its log is clamped, no gradient)."""
    if can_read_data(y) and bool(((rel > 0) & (y < torch.finfo(y.dtype).tiny)).any()):
        warnings.warn(
            f"{fn}: the mask underflows to 0 at some relevant items (their scores lie far more than the temperature "
            f"below the k-th): their log is clamped and they get no gradient. Raise the temperature or use "
            f"scale='std'",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def _check_mask_method(method: object, options: dict, fn: str) -> None:
    if options.get("straight_through"):
        raise ValueError(
            f"{fn}: straight_through=True gives a hard 0/1 mask in the forward pass, where the binary "
            f"cross-entropy's log has zero gradient: pass a method whose mask is strictly inside (0, 1)"
        )
    spec = lookup("mask", method, {key: v for key, v in options.items() if key != "straight_through"}, fn=fn)
    if options.get("max_support") is not None:
        raise ValueError(
            f"{fn}: `max_support` makes the mask exactly 0 outside the largest entries, where the binary "
            f"cross-entropy's log has zero gradient: relevant items there would never be pulled in"
        )
    if spec.exact_zeros:
        raise ValueError(
            f"{fn}: method={method!r} gives masks with exact zeros (and ones), where the binary cross-entropy's "
            f"log has zero gradient: relevant items the mask misses would never be pulled in. Use a method whose "
            f"mask is strictly inside (0, 1): 'dftopk', 'sigmoid', 'soft' or 'lapsum'"
        )


def cascade_topk_loss(
    scores: Tensor,
    relevant: Tensor,
    k: int | None = None,
    *,
    method: str = "dftopk",
    temperature: Union[float, Tensor, None] = None,
    scale: str | None = None,
    reduction: str = "mean",
    **method_options,
) -> Tensor:
    r"""Top-K selection loss of cascade ranking (Zhu et al. 2025, "Differentiable Fast Top-K Selection for
    Large-Scale Recommendation", DFTopK): :math:`-\frac1n \sum_i [r_i \log y_i + (1 - r_i)\log(1 - y_i)]`.

    :math:`y` = ``topk_mask(scores, k, method=method, temperature=temperature, scale=scale)`` is a soft top-k
    selection of the n candidates (with ``"dftopk"``, the paper's operator, :math:`y_i = \sigma((x_i - \theta)/t)`,
    θ the midpoint of the k-th and (k + 1)-th largest scores), and :math:`r` the indicator of the ground-truth set G
    of K relevant items (the top-K of the later stage). The loss is the binary cross-entropy of y against r averaged
    over the n candidates (as in the authors' code), :math:`\log` taken as :math:`\log\max(\cdot, \mathrm{tiny})`.
    The authors train with k = K = |G| (``k=None``, the default: k is each row's number of relevant items); k > K
    relaxes Recall@K@k (select k items that contain G): the k − K extra selected items are still pushed towards 0.
    The paper's joint term for two cascade stages and its uncertainty weighting are not included; combine
    single-stage losses for them.

    Methods whose mask has exact zeros (``"hard"``, ``"sparse"``, ``"perturbed"``, ``max_support``,
    ``straight_through``) raise ``ValueError``: the log of an exact 0 has no gradient, so a relevant item outside
    the mask's support is never pulled in. For the same reason a ``RuntimeWarning`` is issued when the smooth mask
    underflows to 0 at a relevant item (a temperature far below the gaps between scores).

    The temperature is in the units of the scores (:func:`softtopk.topk_mask`'s width convention): it should be
    comparable to the spread of the scores, not far above it. Measured on a linear pre-ranker (synthetic data,
    n = 200, Recall@10@20 after 300 Adam steps): absolute temperatures 0.1, 1, 10, 100, 500 gave 0.954, 0.969,
    0.999, 0.992, 0.484 (a large temperature forces the scorer to inflate its scores first); ``scale="std"``
    (relative to each row's standard deviation) gave 0.994–0.999 for every temperature from 0.03 to 3, and is the
    safer choice for unnormalised scores. See docs/choosing-the-temperature.md.

    Args:
        scores: candidate scores of shape (batch, n), finite.
        relevant: the ground-truth set, either a 0-1 indicator of the scores' shape (bool or float) or an integer
            tensor of item indices of shape (batch, K) (no repeats within a row).
        k: the selection size, an int in [0, n], or None: K per row.
        method: a method of :func:`softtopk.topk_mask` without exact zeros (``"dftopk"``, default; ``"sigmoid"``,
            ``"soft"``, ``"lapsum"``).
        temperature: T > 0 (None: 1.0), a number or per-row tensor of shape (batch,).
        scale: None (T in score units) or ``"std"`` (T times each row's standard deviation).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` over the batch.
        **method_options: passed to ``topk_mask``.

    Example:
        >>> import torch
        >>> from softtopk.losses import cascade_topk_loss
        >>> scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
        >>> relevant = torch.tensor([[0, 2], [0, 1]])  # the ground-truth top-2 of each row
        >>> cascade_topk_loss(scores, relevant, temperature=4.0, reduction="none")
        tensor([0.3377, 1.3377])
        >>> mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
        >>> cascade_topk_loss(scores, mask, 2, temperature=4.0, reduction="none")
        tensor([0.3377, 1.3377])
    """
    fn = "cascade_topk_loss"
    _check_logits(scores, fn, "scores")
    rel = _relevance(relevant, scores, fn)
    _check_mask_method(method, method_options, fn)
    n = scores.shape[1]
    kk: Union[int, Tensor] = rel.sum(1).round().long() if k is None else _check_int(k, "k", 0, n, fn)
    _check_temperature_scale(temperature, scale, fn)
    _check_reduction(reduction, fn)
    x = scores.to(compute_dtype(scores))
    y = topk_mask(x, kk, method=method, temperature=temperature, scale=scale, **method_options)
    _warn_underflow(y, rel, fn, stacklevel=2)
    loss = -(rel * _safe_log(y) + (1.0 - rel) * _safe_log(1.0 - y)).mean(1)
    return _reduce(loss, reduction, scores.dtype)


class CascadeTopKLoss(nn.Module):
    """``nn.Module`` form of :func:`cascade_topk_loss`: ``CascadeTopKLoss(k, method="dftopk")(scores, relevant)``.

    Example:
        >>> import torch
        >>> from softtopk.losses import CascadeTopKLoss
        >>> CascadeTopKLoss(temperature=4.0)(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), torch.tensor([[0, 2]]))
        tensor(0.3377)
    """

    def __init__(
        self,
        k: int | None = None,
        *,
        method: str = "dftopk",
        temperature: Union[float, Tensor, None] = None,
        scale: str | None = None,
        reduction: str = "mean",
        **method_options,
    ):
        super().__init__()
        fn = "CascadeTopKLoss"
        if k is not None:
            _check_int(k, "k", 0, math.inf, fn)
        _check_mask_method(method, method_options, fn)
        _check_temperature_scale(temperature, scale, fn)
        _check_reduction(reduction, fn)
        self.k, self.method, self.temperature, self.scale = k, method, temperature, scale
        self.reduction, self.method_options = reduction, method_options

    def forward(self, scores: Tensor, relevant: Tensor) -> Tensor:
        return cascade_topk_loss(
            scores, relevant, self.k, method=self.method, temperature=self.temperature, scale=self.scale,
            reduction=self.reduction, **self.method_options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        opts = "".join(f", {key}={val!r}" for key, val in self.method_options.items())
        return (
            f"k={self.k}, method={self.method!r}, temperature={self.temperature}, scale={self.scale!r}, "
            f"reduction={self.reduction!r}{opts}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Joint loss of a cascade of stages (DFTopK, Zhu et al. 2025)
# ----------------------------------------------------------------------------------------------------------------
_STAGES = "a sequence of (batch, n) tensors (one per stage) or one tensor of shape (stages, batch, n)"


def _stages(stage_scores: object, fn: str) -> list[Tensor]:
    """The stages' scores as a list of S ≥ 1 finite (batch, n) tensors of one shape, dtype and device."""
    if isinstance(stage_scores, Tensor):
        if stage_scores.dim() != 3:
            raise ValueError(
                f"{fn}: `stage_scores` as one tensor must have shape (stages, batch, n), got shape "
                f"{tuple(stage_scores.shape)} (pass [scores] for one stage)"
            )
        stages = list(stage_scores.unbind(0))
    elif isinstance(stage_scores, (list, tuple)):
        stages = list(stage_scores)
    else:
        raise TypeError(f"{fn}: `stage_scores` must be {_STAGES}, got {type(stage_scores).__name__}")
    if not stages:
        raise ValueError(f"{fn}: `stage_scores` must hold at least one stage, got none")
    for s, x in enumerate(stages):
        try:
            _check_logits(x, fn, "stage_scores")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (stage {s})") from None
        first = stages[0]
        if (x.shape, x.dtype, x.device) != (first.shape, first.dtype, first.device):
            raise ValueError(
                f"{fn}: every stage of `stage_scores` scores the same candidates: stage {s} has shape "
                f"{tuple(x.shape)}, dtype {x.dtype}, device {x.device}; stage 0 has shape {tuple(first.shape)}, "
                f"dtype {first.dtype}, device {first.device}"
            )
    return stages


def _n_stages(stage_scores: object) -> int | None:
    """The number of stages of a well-formed ``stage_scores`` (None otherwise: the function's checks report it)."""
    if isinstance(stage_scores, Tensor):
        return stage_scores.shape[0] if stage_scores.dim() == 3 else None
    return len(stage_scores) if isinstance(stage_scores, (list, tuple)) else None


def _per_stage(value: object, n_stages: int, name: str, fn: str) -> list:
    """One value per stage: a list or tuple of ``n_stages`` values, or one value for every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_stages:
            raise ValueError(
                f"{fn}: `{name}` has {len(value)} entries for {n_stages} stages: pass one per stage, or one value "
                f"for every stage"
            )
        return list(value)
    return [value] * n_stages


def _check_stage_args(k: object, temperature: object, scale: object, n_stages: int, fn: str) -> list:
    """Checks ``k`` (None or an int ≥ 0 per stage) and the temperatures; returns the per-stage temperatures."""
    for kk in _per_stage(k, n_stages, "k", fn):
        if kk is not None:
            _check_int(kk, "k", 0, math.inf, fn)
    temperatures = _per_stage(temperature, n_stages, "temperature", fn)
    for t in temperatures:
        _check_temperature_scale(t, scale, fn)
    return temperatures


def _check_log_weights(log_weights: object, n_stages: int, fn: str) -> None:
    if log_weights is None:
        return
    if not isinstance(log_weights, Tensor) or not log_weights.dtype.is_floating_point:
        kind = log_weights.dtype if isinstance(log_weights, Tensor) else type(log_weights).__name__
        raise TypeError(f"{fn}: `log_weights` must be None or a floating tensor, got {kind}")
    if log_weights.shape != (n_stages,):
        raise ValueError(
            f"{fn}: `log_weights` must hold one log-weight per stage, shape ({n_stages},), got shape "
            f"{tuple(log_weights.shape)}"
        )
    if can_read_data(log_weights) and not bool(torch.isfinite(log_weights).all()):
        raise ValueError(f"{fn}: `log_weights` must be finite")


def _kth_midpoint(x: Tensor, k: Union[int, Tensor]) -> Tensor:
    """τ = (x_(k) + x_(k+1))/2 of each row of x (batch, n), x_(j) the j-th largest, x_(0) = +∞, x_(n+1) = −∞;
    (batch, 1), differentiable (the gradient reaches the k-th and (k+1)-th entries, as in DFTopK)."""
    b, n = x.shape
    if isinstance(k, Tensor):
        kk = k
        m = min(int(kk.max()) + 1, n) if kk.numel() and can_read_data(kk) else n
    else:
        kk, m = torch.full((b, 1), k, dtype=torch.long, device=x.device), min(k + 1, n)
    pad = x.new_full((b, 1), math.inf)
    vals = torch.cat([pad, x.topk(m, dim=1).values, -pad], 1)
    return vals.gather(1, torch.cat([kk, kk + 1], 1).clamp(max=m + 1)).mean(1, keepdim=True)


def _dftopk_logits(x: Tensor, k: Union[int, Tensor], temperature: Any, scale: Any, fn: str) -> Tensor:
    """z = (x − τ)/t, the logits of DFTopK's mask σ(z) (t = T/4, τ by :func:`_kth_midpoint`).

    At k = 0 and k = n the mask is exact (τ = ±∞); there z is ∓(−log tiny), so that a disagreeing label costs
    −log tiny, as the clamped log of the probability methods, with no gradient."""
    spec = lookup("mask", "dftopk", {}, fn=fn)
    rows = prepare(fn, x, k, temperature=temperature, scale=scale, k_kind="int")
    t = internal_temperature(spec, rows, {})
    assert t is not None  # dftopk takes a temperature
    tau = _kth_midpoint(x, rows.k)
    finite = torch.isfinite(tau)
    z = (x - torch.where(finite, tau, 0.0)) / t
    return torch.where(finite, z, torch.full_like(tau, -math.log(torch.finfo(x.dtype).tiny)).copysign(-tau))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 − e^a) for a ≤ 0, stably (Mächler 2012): log(−expm1 a) above −log 2, log1p(−e^a) below; clamped at
    log tiny where a = 0 (a product of masks exactly 1)."""
    cut = -math.log(2.0)
    near = torch.log((-torch.expm1(a.clamp(min=cut))).clamp_min(torch.finfo(a.dtype).tiny))
    return torch.where(a > cut, near, torch.log1p(-torch.exp(a.clamp(max=cut))))


def _bce(rel: Tensor, log_y: Tensor, log_not_y: Tensor) -> Tensor:
    """−mean_i [r_i log y_i + (1 − r_i) log(1 − y_i)], per row."""
    return -(rel * log_y + (1.0 - rel) * log_not_y).mean(1)


def _joint_terms(
    xs: list[Tensor], ks: list, ts: list, rel: Tensor, method: str, scale: Any, options: dict, fn: str
) -> tuple[list[Tensor], Tensor]:
    """The stage losses L_s and the joint loss, per row (see :func:`joint_cascade_loss`)."""
    log_ys, log_nots, probs = [], [], []
    for x, k, t in zip(xs, ks, ts):
        if method == "dftopk":  # from the logits: log σ(z), log(1 − σ(z)) = log σ(−z)
            z = _dftopk_logits(x, k, t, scale, fn)
            log_ys.append(F.logsigmoid(z))
            log_nots.append(F.logsigmoid(-z))
        else:  # from the probabilities, with the clamped log of cascade_topk_loss
            y = topk_mask(x, k, method=method, temperature=t, scale=scale, **options)
            _warn_underflow(y, rel, fn, stacklevel=4)
            probs.append(y)
            log_ys.append(_safe_log(y))
            log_nots.append(_safe_log(1.0 - y))
    log_p = torch.stack(log_ys).sum(0)  # log Π_s y_s = Σ_s log y_s
    log_not_p = _log1mexp(log_p) if method == "dftopk" else _safe_log(1.0 - torch.stack(probs).prod(0))
    return [_bce(rel, a, b) for a, b in zip(log_ys, log_nots)], _bce(rel, log_p, log_not_p)


def _uncertainty_weighted(stage_losses: list[Tensor], log_weights: Tensor | None) -> Tensor:
    """Σ_s L_s / (2 w_s²) + Σ_s log w_s, w_s = exp(log_weights[s]) (w_s = 1 when ``log_weights`` is None)."""
    losses = torch.stack(stage_losses, -1)  # (batch, S)
    if log_weights is None:
        return 0.5 * losses.sum(-1)
    lw = log_weights.to(losses.dtype)
    return (0.5 * losses * torch.exp(-2.0 * lw)).sum(-1) + lw.sum()


def joint_cascade_loss(
    stage_scores: Union[Sequence[Tensor], Tensor],
    relevant: Tensor,
    k: Union[int, Sequence[int], None] = None,
    *,
    method: str = "dftopk",
    temperature: Union[float, Tensor, Sequence[Union[float, Tensor]], None] = None,
    scale: str | None = None,
    log_weights: Tensor | None = None,
    reduction: str = "mean",
    **method_options,
) -> Tensor:
    r"""Joint top-K loss of a cascade of S stages (Zhu et al. 2025, "Differentiable Fast Top-K Selection for
    Large-Scale Recommendation", DFTopK): :math:`\sum_s \frac{L_s}{2 w_s^2} + L_{\mathrm{joint}} + \sum_s \log w_s`.

    Each stage s of a cascade (e.g. retrieval, then pre-ranking) scores the same n candidates,
    :math:`x^{(s)}`, and keeps its top :math:`k_s`. With :math:`y^{(s)}` = ``topk_mask(x_s, k_s, method=method,
    temperature=T_s, scale=scale)`` the stage's soft selection and :math:`r` the indicator of the ground-truth set G
    (the top-K of the final ranking),

    - :math:`L_s = \mathrm{BCE}(y^{(s)}, r) = -\frac1n \sum_i [r_i \log y^{(s)}_i + (1 - r_i)\log(1 - y^{(s)}_i)]`
      is :func:`cascade_topk_loss` of stage s;
    - :math:`L_{\mathrm{joint}} = \mathrm{BCE}(\prod_s y^{(s)}, r)`: an item reaches the end of the cascade only if
      every stage keeps it, so the product of the masks is the cascade's soft selection;
    - :math:`w_s = \exp(\texttt{log\_weights}[s])` are learnable uncertainty weights (Kendall, Gal & Cipolla 2018),
      which balance the stage losses; the :math:`\log w_s` term keeps them from growing without bound (for
      fixed losses the optimum is :math:`w_s^2 = L_s`).
      ``log_weights=None`` means :math:`w_s = 1` (:math:`\sum_s L_s/2 + L_{\mathrm{joint}}`).
      :class:`JointCascadeLoss` owns them as an ``nn.Parameter``.

    This is the objective of the authors' code for two stages (its weights start at 1, i.e. ``log_weights`` 0),
    for any number of stages. With ``"dftopk"`` (the paper's operator, :math:`y = \sigma(z)`,
    :math:`z = (x - \theta)/t`, θ the midpoint of the k-th and (k + 1)-th largest scores, t = T/4: the code's τ is
    ``temperature / 4``) the cross-entropies are computed from the logits z: :math:`\log y = \log\sigma(z)`,
    :math:`\log(1 - y) = \log\sigma(-z)`, :math:`\log\prod_s y^{(s)} = \sum_s \log\sigma(z^{(s)})` and
    :math:`\log(1 - \prod_s y^{(s)}) = \mathrm{log1mexp}(\sum_s \log\sigma(z^{(s)}))`, so the loss and its gradient
    stay exact where the masks saturate (no clamping; for k = 0 or n, where the mask is exact, a disagreeing label
    costs :math:`-\log\mathrm{tiny}`). The other methods without exact zeros (``"sigmoid"``, ``"soft"``,
    ``"lapsum"``) take the logarithms of the probabilities, clamped as in :func:`cascade_topk_loss`; methods with
    exact zeros raise ``ValueError`` as there. As the temperature → 0 each :math:`y^{(s)}` tends to the stage's hard
    top-:math:`k_s` selection.

    The loss of a row includes :math:`\sum_s \log w_s`; ``reduction`` then reduces the rows, so ``"sum"`` scales
    every term by the batch size and leaves the optimal weights unchanged.

    Args:
        stage_scores: the S ≥ 1 stages' scores of the same candidates: a sequence of S finite tensors of shape
            (batch, n) (one dtype and device), or one tensor of shape (S, batch, n).
        relevant: the ground-truth set, a 0-1 indicator of shape (batch, n) (bool or float) or an integer tensor of
            item indices of shape (batch, K) (no repeats within a row), as :func:`cascade_topk_loss`.
        k: each stage's selection size: None (default: each row's K, every stage), an int in [0, n] for every
            stage, or a sequence of S such values (e.g. ``[30, 20]``: retrieval keeps 30, pre-ranking 20).
        method: a method of :func:`softtopk.topk_mask` without exact zeros (``"dftopk"``, default; ``"sigmoid"``,
            ``"soft"``, ``"lapsum"``), the same for every stage.
        temperature: T > 0 (None: 1.0), a number or a per-row tensor of shape (batch,), or a sequence of S of these
            (one per stage: stages' scores may live on different scales).
        scale: None (T in score units) or ``"std"`` (T times each row's standard deviation, per stage).
        log_weights: None, or the learnable :math:`\log w_s`, a floating tensor of shape (S,).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` over the batch.
        **method_options: passed to ``topk_mask`` (none for ``"dftopk"``).

    Example:
        >>> import torch
        >>> from softtopk.losses import joint_cascade_loss
        >>> retrieval = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
        >>> prerank = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 3.0, 0.0, 2.0]])
        >>> relevant = torch.tensor([[0, 2], [1, 3]])  # the ground-truth top-2 of each row
        >>> joint_cascade_loss([retrieval, prerank], relevant, [3, 2], temperature=4.0, reduction="none")
        tensor([0.6925, 0.8959])
        >>> joint_cascade_loss([retrieval, prerank], relevant, [3, 2], temperature=4.0,
        ...                    log_weights=torch.tensor([0.5, -0.5]), reduction="none")
        tensor([0.8461, 0.9704])
    """
    fn = "joint_cascade_loss"
    stages = _stages(stage_scores, fn)
    n_stages, n = len(stages), stages[0].shape[1]
    rel = _relevance(relevant, stages[0], fn)
    _check_mask_method(method, method_options, fn)
    temperatures = _check_stage_args(k, temperature, scale, n_stages, fn)
    default_k = rel.sum(1).round().long()
    ks = [default_k if v is None else _check_int(v, "k", 0, n, fn) for v in _per_stage(k, n_stages, "k", fn)]
    _check_log_weights(log_weights, n_stages, fn)
    _check_reduction(reduction, fn)
    xs = [x.to(compute_dtype(x)) for x in stages]
    stage_losses, joint = _joint_terms(xs, ks, temperatures, rel, method, scale, method_options, fn)
    return _reduce(joint + _uncertainty_weighted(stage_losses, log_weights), reduction, stages[0].dtype)


class JointCascadeLoss(nn.Module):
    r"""``nn.Module`` form of :func:`joint_cascade_loss` that owns the uncertainty weights:
    ``JointCascadeLoss(n_stages, k)(stage_scores, relevant)``.

    ``log_weights`` is an ``nn.Parameter`` of shape (n_stages,), initialised to 0 (every :math:`w_s = 1`, as the
    authors' code); train it with the models' parameters (pass ``loss_fn.parameters()`` to the optimiser too).
    :math:`w_s` = ``log_weights.exp()``. The other arguments are checked when the module is built; ``eval()``
    changes nothing.

    Example:
        >>> import torch
        >>> from softtopk.losses import JointCascadeLoss
        >>> loss_fn = JointCascadeLoss(2, [3, 2], temperature=4.0)
        >>> retrieval = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
        >>> prerank = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
        >>> loss = loss_fn([retrieval, prerank], torch.tensor([[0, 2]]))
        >>> loss
        tensor(0.6925, grad_fn=<MeanBackward0>)
        >>> loss.backward()
        >>> loss_fn.log_weights.grad
        tensor([0.5679, 0.6623])
    """

    def __init__(
        self,
        n_stages: int,
        k: Union[int, Sequence[int], None] = None,
        *,
        method: str = "dftopk",
        temperature: Union[float, Tensor, Sequence[Union[float, Tensor]], None] = None,
        scale: str | None = None,
        reduction: str = "mean",
        **method_options,
    ):
        super().__init__()
        fn = "JointCascadeLoss"
        n_stages = _check_int(n_stages, "n_stages", 1, math.inf, fn)
        _check_mask_method(method, method_options, fn)
        _check_stage_args(k, temperature, scale, n_stages, fn)
        _check_reduction(reduction, fn)
        self.n_stages, self.k, self.method, self.temperature, self.scale = n_stages, k, method, temperature, scale
        self.reduction, self.method_options = reduction, method_options
        self.log_weights = nn.Parameter(torch.zeros(n_stages))

    def forward(self, stage_scores: Union[Sequence[Tensor], Tensor], relevant: Tensor) -> Tensor:
        count = _n_stages(stage_scores)
        if count is not None and count != self.n_stages:
            raise ValueError(
                f"JointCascadeLoss: `stage_scores` has {count} stages; the module was built for "
                f"n_stages={self.n_stages}"
            )
        return joint_cascade_loss(
            stage_scores, relevant, self.k, method=self.method, temperature=self.temperature, scale=self.scale,
            log_weights=self.log_weights, reduction=self.reduction, **self.method_options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        opts = "".join(f", {key}={val!r}" for key, val in self.method_options.items())
        return (
            f"n_stages={self.n_stages}, k={self.k}, method={self.method!r}, temperature={self.temperature}, "
            f"scale={self.scale!r}, reduction={self.reduction!r}{opts}"
        )
