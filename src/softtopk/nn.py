"""``nn.Module`` forms of the operators, for building models: ``SoftTopK`` (a soft top-k mask layer),
``SoftKNN`` (a differentiable k-nearest-neighbour classifier), with the functions ``soft_knn`` and ``knn_predict``,
and ``TopKRouter`` (a mixture-of-experts router returning a ``Routing``).

Modules validate their arguments when they are built, show them in ``repr``, and say what they do in ``eval()``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

from ._prepare import (
    SCALES,
    can_read_data,
    check_bool,
    check_finite,
    check_k,
    check_temperature,
    compute_dtype,
    reject_unused,
)
from ._registry import check_support, lookup, parse, uses_temperature
from .masks import topk, topk_mask

__all__ = ["Routing", "SoftKNN", "SoftTopK", "TopKRouter", "knn_predict", "soft_knn"]

_FLAGS = ("largest", "straight_through", "hard_in_eval")


class SoftTopK(nn.Module):
    """``nn.Module`` form of :func:`softtopk.topk_mask`: ``SoftTopK(k, method=..., temperature=...)(x)``.

    The arguments are checked when the module is built; ``temperature`` may be an ``nn.Parameter``.
    ``hard_in_eval=True`` makes the module return the exact top-k mask (``method="hard"``) in ``eval()`` mode:
    train with the soft mask, infer with the exact selection. With the default ``False`` the module computes the
    same soft mask in both modes.

    Example:
        >>> import torch
        >>> from softtopk.nn import SoftTopK
        >>> layer = SoftTopK(2, method="sparse", temperature=2.0, hard_in_eval=True)
        >>> x = torch.tensor([3.0, 1.0, 2.0, 0.0])
        >>> layer(x), layer.eval()(x)
        (tensor([1.0000, 0.2500, 0.7500, 0.0000]), tensor([1., 0., 1., 0.]))
    """

    def __init__(
        self,
        k: Union[int, float, Tensor],
        *,
        dim: int = -1,
        method: str = "sigmoid",
        temperature: Union[float, Tensor, None] = None,
        largest: bool = True,
        scale: Union[str, None] = None,
        straight_through: bool = False,
        hard_in_eval: bool = False,
        **options,
    ):
        super().__init__()
        fn = "SoftTopK"
        spec = lookup("mask", method, options, fn=fn)
        parse(spec, options, fn=fn)  # the option values, as topk_mask checks them
        uses_temperature(spec, options, temperature, fn=fn)  # a method's alias and temperature together raise
        if options.get("max_support") is not None:
            check_support(options["max_support"], k, fn=fn)
        check_k(
            k,
            math.inf,  # type: ignore[arg-type]
            integer=not spec.float_k or straight_through,
            fn=fn,
        )
        if temperature is not None:
            check_temperature(temperature, fn=fn)
        for name, flag in zip(_FLAGS, (largest, straight_through, hard_in_eval)):
            check_bool(flag, name, fn=fn)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"{fn}: `dim` must be an int, got {type(dim).__name__}")
        if hard_in_eval and not float(k if not isinstance(k, Tensor) else 0).is_integer():
            raise ValueError(f"{fn}: `hard_in_eval` needs a whole k, got {k}")
        if scale not in SCALES:
            raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")
        if spec.factor is None:
            why = f"method={method!r}"
            reject_unused(fn, why, temperature=temperature, scale=scale, straight_through=straight_through)
        self.k: Union[int, float, Tensor] = k
        self.method: str = method
        self.temperature: Union[float, Tensor, None] = temperature
        self.dim: int = int(dim)
        self.largest: bool = largest
        self.scale: Union[str, None] = scale
        self.straight_through: bool = straight_through
        self.hard_in_eval: bool = hard_in_eval
        self.options: dict = options

    def forward(self, x: Tensor) -> Tensor:
        if self.hard_in_eval and not self.training:
            return topk_mask(x, self.k, dim=self.dim, method="hard", largest=self.largest)
        return topk_mask(
            x, self.k, dim=self.dim, method=self.method, temperature=self.temperature, largest=self.largest,
            scale=self.scale, straight_through=self.straight_through, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"k={self.k}", f"method={self.method!r}"]
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        for name, default in (("dim", -1), ("largest", True), ("scale", None), ("straight_through", False)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        parts.append(f"hard_in_eval={self.hard_in_eval}")
        parts += [f"{key}={val!r}" for key, val in self.options.items()]
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Differentiable k-nearest neighbours (SOFT, Xie et al. 2020)
# ----------------------------------------------------------------------------------------------------------------
def _check_mask_args(method: Any, temperature: Any, scale: Any, options: dict, k: int, fn: str) -> None:
    """The mask arguments of the kNN, checked as ``topk_mask`` checks them, with errors naming ``fn``."""
    opts = {key: val for key, val in options.items() if key != "straight_through"}
    spec = lookup("mask", method, opts, fn=fn)
    parse(spec, opts, fn=fn)  # the option values
    uses_t = uses_temperature(spec, opts, temperature, fn=fn)  # a method's alias and temperature together raise
    straight_through = check_bool(options.get("straight_through", False), "straight_through", fn=fn)
    if temperature is not None:
        check_temperature(temperature, fn=fn)
    if scale not in SCALES:
        raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")
    if spec.factor is None:
        reject_unused(fn, f"method={method!r}", temperature=temperature, scale=scale, straight_through=straight_through)
    elif not uses_t:
        reject_unused(fn, f"method={method!r} with `{spec.alias}`", scale=scale)
    if opts.get("max_support") is not None:
        check_support(opts["max_support"], k, fn=fn)


def _check_knn_k(k: Any, n: float, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{fn}: `k` must be an int (the number of neighbours), got {type(k).__name__}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"{fn}: `k`={k} is out of range [1, {n}] (the number of references that can be neighbours)")
    return int(k)


def _embeddings(query: Any, reference: Any, fn: str) -> None:
    for name, x in (("query", query), ("reference", reference)):
        check_finite(x, name, fn=fn)
        if x.dim() < 2:
            raise ValueError(f"{fn}: `{name}` must have shape (..., n_{name}, dim), got shape {tuple(x.shape)}")
    if query.shape[-1] != reference.shape[-1] or query.dtype != reference.dtype:
        raise ValueError(
            f"{fn}: `query` and `reference` must have the same embedding size and dtype, got shapes "
            f"{tuple(query.shape)}, {tuple(reference.shape)} and dtypes {query.dtype}, {reference.dtype}"
        )


def _check_labels(labels: Any, reference: Tensor, fn: str) -> None:
    """An integer tensor of shape (..., n_reference) whose batch dims broadcast with the reference's."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.is_complex():
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{fn}: `labels` must be an integer tensor of class indices, got {kind}")
    if labels.dtype == torch.bool:
        raise TypeError(f"{fn}: `labels` must be an integer tensor of class indices, got {labels.dtype}")
    n = reference.shape[-2]
    try:
        torch.broadcast_shapes(labels.shape[:-1], reference.shape[:-2])
        ok = labels.dim() >= 1 and labels.shape[-1] == n
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `labels` must have shape (..., n_reference) = (..., {n}), its batch dims broadcasting with "
            f"`reference`'s {tuple(reference.shape[:-2])}, got shape {tuple(labels.shape)}"
        )


def _one_hot(labels: Any, reference: Tensor, num_classes: Any, dtype: torch.dtype, fn: str) -> Tensor:
    """The labels as a one-hot (..., n_reference, num_classes) tensor in ``dtype``."""
    _check_labels(labels, reference, fn)
    if num_classes is None:  # reads the labels (a graph break under torch.compile): pass num_classes there
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"{fn}: `num_classes` must be None or a positive int, got {num_classes!r}")
    if labels.numel() and can_read_data(labels) and not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f"{fn}: `labels` must hold class indices in [0, {int(num_classes) - 1}]")
    classes = torch.arange(int(num_classes), device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(device=reference.device, dtype=dtype)


def _knn_scores(
    query: Any, reference: Any, labels: Any, k: Any, num_classes: Any, exclude_self: Any, fn: str
) -> tuple[Tensor, Tensor, int]:
    """(s, one-hot labels, k): s = −‖q − r‖² of shape (..., n_query, n_reference) in the compute dtype, with −inf
    on the diagonal when ``exclude_self``."""
    _embeddings(query, reference, fn)
    check_bool(exclude_self, "exclude_self", fn=fn)
    n = reference.shape[-2]
    if exclude_self and query.shape[-2] != n:
        raise ValueError(
            f"{fn}: `exclude_self` needs the query to be the reference (query i is reference i), got "
            f"{query.shape[-2]} queries and {n} references"
        )
    k = _check_knn_k(k, n - int(exclude_self), fn)
    cdtype = compute_dtype(query)
    q, r = query.to(cdtype), reference.to(cdtype)
    d2 = q.square().sum(-1, keepdim=True) - 2.0 * q @ r.mT + r.square().sum(-1).unsqueeze(-2)
    s = -d2.clamp_min(0.0)
    if exclude_self:
        s = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), -math.inf)
    return s, _one_hot(labels, reference, num_classes, cdtype, fn), k


def _vote(y: Tensor, onehot: Tensor, dtype: torch.dtype) -> Tensor:
    """p_c = Σ_j y_j [label_j = c] / Σ_j y_j, (..., n_query, num_classes)."""
    return ((y @ onehot) / y.sum(-1, keepdim=True)).to(dtype)


def soft_knn(
    query: Tensor,
    reference: Tensor,
    labels: Tensor,
    k: int,
    *,
    num_classes: Union[int, None] = None,
    method: str = "sigmoid",
    temperature: Union[float, Tensor, None] = None,
    scale: Union[str, None] = None,
    exclude_self: bool = False,
    **options,
) -> Tensor:
    r"""Differentiable k-nearest-neighbour class scores: the soft vote of the k nearest references.

    SOFT's differentiable kNN (Xie et al. 2020, "Differentiable Top-k Operator with Optimal Transport") replaces
    the hard choice of the k nearest references by a soft top-k. For each query q, the scores of the references
    are :math:`s_j = -\lVert q - r_j \rVert^2`, :math:`y` = ``topk_mask(s, k, method=method,
    temperature=temperature, scale=scale)`` softly selects the k nearest, and the class scores are the soft vote

    .. math:: p_c = \frac{\sum_j y_j\,[\mathrm{label}_j = c]}{\sum_j y_j},

    a distribution over the classes (:math:`p_c \ge 0`, :math:`\sum_c p_c = 1`), differentiable with respect to
    the query and reference embeddings. Train with the negative log-likelihood of the true class,
    :math:`-\log p_{\mathrm{target}}` (clamp p away from 0). Dividing by :math:`\sum_j y_j` (= k for the
    normalised methods) makes the vote a distribution for every method, also for ``"dftopk"``, whose mask does
    not sum to k. As the temperature → 0, y tends to the hard top-k and p to the exact kNN vote (the fraction of
    the k nearest references in each class); :func:`knn_predict` gives its labels, and :class:`SoftKNN` trains
    soft and evaluates exact.

    The temperature is in the units of the scores, squared distances: compare it to the gaps between the squared
    distances of the k-th and (k + 1)-th nearest references, or pass ``scale="std"`` (relative to each query's
    spread of squared distances).

    Args:
        query: query embeddings of shape (..., n_query, dim), finite, floating.
        reference: reference embeddings of shape (..., n_reference, dim), same dim and dtype; the batch dims
            broadcast with the query's.
        labels: the references' classes, an integer tensor of shape (..., n_reference) (e.g. (n_reference,)).
        k: the number of neighbours, an int in [1, n_reference] ([1, n_reference − 1] with ``exclude_self``).
        num_classes: the number of classes C; None: ``labels.max() + 1`` (pass it when a batch may miss classes).
        method: a method of :func:`softtopk.topk_mask` (default ``"sigmoid"``; ``"soft"`` with ``epsilon=`` is
            SOFT's parametrisation; ``"hard"`` gives the exact vote without gradient).
        temperature: T > 0 (None: 1.0), a number or a per-query tensor of shape (..., n_query).
        scale: None or ``"std"``, as :func:`softtopk.topk_mask`.
        exclude_self: the query batch is the reference batch (query i is reference i, e.g. a training batch
            classified by its other members): each query's own distance is excluded (score −inf, mask exactly 0).
        **options: the method's options, as :func:`softtopk.topk_mask` (``straight_through`` included).

    Returns:
        The class scores p, of shape (..., n_query, num_classes), in the query's dtype.

    Example:
        >>> import torch
        >>> from softtopk.nn import soft_knn
        >>> reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> query = torch.tensor([[0.4], [2.7]])
        >>> soft_knn(query, reference, labels, 3, temperature=4.0)
        tensor([[0.6594, 0.3406],
                [0.3384, 0.6616]])
        >>> soft_knn(query, reference, labels, 3, method="hard")  # the exact vote: 2 of the 3 nearest
        tensor([[0.6667, 0.3333],
                [0.3333, 0.6667]])
    """
    fn = "soft_knn"
    _check_mask_args(method, temperature, scale, options, k, fn)
    s, onehot, k = _knn_scores(query, reference, labels, k, num_classes, exclude_self, fn)
    y = topk_mask(s, k, method=method, temperature=temperature, scale=scale, **options)
    return _vote(y, onehot, query.dtype)


def _exact_vote(query: Any, reference: Any, labels: Any, k: Any, num_classes: Any, exclude_self: Any, fn: str):
    """The exact kNN vote (hard top-k, p_c = the fraction of the k nearest in class c), no gradient."""
    s, onehot, k = _knn_scores(query, reference, labels, k, num_classes, exclude_self, fn)
    return _vote(topk_mask(s, k, method="hard"), onehot, query.dtype)


def knn_predict(
    query: Tensor,
    reference: Tensor,
    labels: Tensor,
    k: int,
    *,
    num_classes: Union[int, None] = None,
    exclude_self: bool = False,
) -> Tensor:
    r"""The exact k-nearest-neighbour prediction: the majority class among the k nearest references.

    The neighbours are the k references of smallest squared Euclidean distance (ties between distances as
    ``torch.topk``); the predicted class is the most frequent among their labels. **Ties between classes** are
    broken towards the class of the nearest neighbour among the tied classes (with k = 2 and two different labels,
    the nearest neighbour's). It is the argmax of :func:`soft_knn` with ``method="hard"`` (and of
    :class:`SoftKNN` in ``eval()``) with that tie rule.

    Args:
        query: query embeddings of shape (..., n_query, dim), as :func:`soft_knn`.
        reference: reference embeddings of shape (..., n_reference, dim).
        labels: the references' classes, an integer tensor of shape (..., n_reference).
        k: the number of neighbours, an int in [1, n_reference] ([1, n_reference − 1] with ``exclude_self``).
        num_classes: the number of classes (None: ``labels.max() + 1``); only checks the labels here.
        exclude_self: the query is the reference; each query's own distance is excluded.

    Returns:
        The predicted labels, a ``torch.long`` tensor of shape (..., n_query).

    Example:
        >>> import torch
        >>> from softtopk.nn import knn_predict
        >>> reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> knn_predict(torch.tensor([[0.4], [2.7], [1.6]]), reference, labels, 2)  # 1.6: a tie, 2.0 is nearest
        tensor([0, 1, 1])
    """
    fn = "knn_predict"
    s, onehot, k = _knn_scores(query, reference, labels, k, num_classes, exclude_self, fn)
    idx = s.topk(k, dim=-1).indices  # (..., n_query, k), nearest first
    ref_labels = labels.to(device=s.device, dtype=torch.long).unsqueeze(-2)  # (..., 1, n_reference)
    lab = ref_labels.expand(s.shape).gather(-1, idx)  # the neighbours' labels, nearest first
    counts = torch.zeros(lab.shape[:-1] + onehot.shape[-1:], dtype=torch.long, device=s.device)
    counts.scatter_add_(-1, lab, torch.ones_like(lab))
    tied = counts == counts.amax(-1, keepdim=True)  # the classes with the most votes
    first = tied.gather(-1, lab).to(torch.int8).argmax(-1, keepdim=True)  # the nearest neighbour in one of them
    return lab.gather(-1, first).squeeze(-1)


class SoftKNN(nn.Module):
    r"""A differentiable k-nearest-neighbour classifier: :func:`soft_knn` in ``train()``, the exact kNN vote in
    ``eval()``. ``SoftKNN(k, method=..., temperature=...)(query, reference, labels)``.

    In ``train()`` it returns the soft vote of :func:`soft_knn` (class scores (..., n_query, num_classes),
    differentiable with respect to the query and reference embeddings). In ``eval()`` it returns the **exact** kNN
    vote: the hard top-k of the same scores with the same normalisation, p_c = the fraction of the k nearest
    references in class c (its argmax with :func:`knn_predict`'s tie rule is :func:`knn_predict`). So it trains
    soft and evaluates exact, as ``SoftTopK(..., hard_in_eval=True)``. ``num_classes`` is an argument of the call
    (None: ``labels.max() + 1``). The arguments are checked when the module is built; ``temperature`` may be an
    ``nn.Parameter``.

    Example:
        >>> import torch
        >>> from softtopk.nn import SoftKNN
        >>> knn = SoftKNN(3, temperature=1.0)
        >>> reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> query = torch.tensor([[1.4]])
        >>> knn(query, reference, labels), knn.eval()(query, reference, labels)
        (tensor([[0.5896, 0.4104]]), tensor([[0.6667, 0.3333]]))
    """

    def __init__(
        self,
        k: int,
        *,
        method: str = "sigmoid",
        temperature: Union[float, Tensor, None] = None,
        scale: Union[str, None] = None,
        exclude_self: bool = False,
        **options,
    ):
        super().__init__()
        fn = "SoftKNN"
        k = _check_knn_k(k, math.inf, fn)
        check_bool(exclude_self, "exclude_self", fn=fn)
        _check_mask_args(method, temperature, scale, options, k, fn)
        self.k: int = k
        self.method: str = method
        self.temperature: Union[float, Tensor, None] = temperature
        self.scale: Union[str, None] = scale
        self.exclude_self: bool = exclude_self
        self.options: dict = options

    def forward(self, query: Tensor, reference: Tensor, labels: Tensor, *, num_classes: Union[int, None] = None):
        if not self.training:
            return _exact_vote(query, reference, labels, self.k, num_classes, self.exclude_self, "SoftKNN")
        return soft_knn(
            query, reference, labels, self.k, num_classes=num_classes, method=self.method,
            temperature=self.temperature, scale=self.scale, exclude_self=self.exclude_self, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"k={self.k}", f"method={self.method!r}"]
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        if self.scale is not None:
            parts.append(f"scale={self.scale!r}")
        parts.append(f"exclude_self={self.exclude_self}")
        parts += [f"{key}={val!r}" for key, val in self.options.items()]
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-experts router
# ----------------------------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """The result of :class:`TopKRouter`, for T tokens (the leading dims of the input flattened) and E experts.

    - ``indices`` (T, k) long: the k experts of each token, ``torch.topk`` of the selection logits;
    - ``weights`` (T, k): the combine weights at those experts (0 for a slot dropped by the capacity);
    - ``dense`` (T, E): the weights scattered to all experts, 0 elsewhere;
    - ``routing_map`` (T, E) bool: the dispatch map (True where a token is sent to an expert);
    - ``load`` (E,): the fraction of the T·k token slots the router selects for each expert (before any capacity
      drop; it sums to 1);
    - ``aux_loss``: the load-balancing loss E · Σ_e f_e P_e (a scalar; 0 unless ``load_balance="aux"``);
    - ``dropped``: the fraction of the T·k slots dropped by the capacity (a scalar, 0 without capacity);
    - ``outside`` (T,): the soft mask's mass outside the k selected experts (dropped from the weights; detached).
    """

    indices: Tensor
    weights: Tensor
    dense: Tensor
    routing_map: Tensor
    load: Tensor
    aux_loss: Tensor
    dropped: Tensor
    outside: Tensor


_SCORES = ("softmax", "sigmoid", None)
_BALANCES = ("aux", "bias", None)


def _check_positive_int(value: Any, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value}")
    return int(value)


def _check_real(value: Any, name: str, fn: str, low: float, high: float, *, closed_low: bool) -> float:
    """A real number in [low, high) (``closed_low``) or (low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}")
    v = float(value)
    ok = (low <= v if closed_low else low < v) and v < high
    if not ok:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise ValueError(f"{fn}: `{name}` must lie in {interval}, got {value}")
    return v


def _check_router_args(n_experts: int, k: Any, score: Any, load_balance: Any, capacity_factor: Any, fn: str) -> int:
    k = _check_positive_int(k, "k", fn)
    if k > n_experts:
        raise ValueError(f"{fn}: `k`={k} is out of range [1, n_experts={n_experts}]")
    for name, value, choices in (("score", score, _SCORES), ("load_balance", load_balance, _BALANCES)):
        if value not in choices:
            raise ValueError(f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if capacity_factor is not None:
        _check_real(capacity_factor, "capacity_factor", fn, 0.0, math.inf, closed_low=False)
    return k


def _router_options(method: str, k: int, n_experts: int, options: dict) -> dict:
    """The options passed to :func:`softtopk.topk`: a method with a data-dependent support (``"sparse"``) gets
    ``max_support = k + 1`` unless given, the smallest bound that keeps a gradient (k would give the hard mask)."""
    spec = lookup("mask", method, {key: v for key, v in options.items() if key != "straight_through"}, fn="TopKRouter")
    if spec.boundable and spec.exact_zeros and k < n_experts and options.get("max_support") is None:
        return {**options, "max_support": k + 1}
    return dict(options)


def _capacity_keep(dense: Tensor, routing_map: Tensor, capacity: int) -> Tensor:
    """(T, E) bool: the slots each expert keeps, its ``capacity`` largest weights (ties by token order)."""
    priority = dense.detach().masked_fill(~routing_map, -math.inf)
    order = torch.sort(priority, dim=0, descending=True, stable=True).indices
    positions = torch.arange(order.shape[0], device=order.device).unsqueeze(1).expand_as(order)
    rank = torch.empty_like(order).scatter_(0, order, positions)  # rank[t, e]: token t's place in expert e's queue
    return routing_map & (rank < capacity)


def _aux_loss(logits: Tensor, load: Tensor) -> Tensor:
    """Switch / GShard: E · Σ_e f_e P_e, f the selected fraction (no gradient), P the mean router probability."""
    probs = torch.softmax(logits, dim=-1).mean(0)
    return logits.shape[-1] * (load.to(probs.dtype) * probs).sum()


class TopKRouter(nn.Module):
    r"""A mixture-of-experts router: a linear gate and a soft top-k over the experts.

    ``TopKRouter(d_model, n_experts, k)(tokens)`` maps tokens of shape (..., d_model) to the gate logits
    :math:`\ell = x W^\top` (an ``nn.Linear(d_model, n_experts, bias=False)``, ``router.gate``), flattened to
    (T, n_experts), and returns a :class:`Routing`. Each token goes to the k experts of largest logit
    (``indices``, exactly ``torch.topk``). Its combine weights there are, in ``train()``,

    .. math:: w_j = \frac{m_j\, s_j}{\sum_{i \in \mathrm{top}k} m_i\, s_i},

    m = ``softtopk.topk(logits, k, method=method, temperature=temperature).weights`` the soft top-k mask at the k
    experts, s the expert scores (``score="softmax"``: softmax of the logits; ``"sigmoid"``: sigmoid of the logits;
    None: 1), the division only with ``normalize=True``. The gradient reaches the gate through the weights (and
    through ``aux_loss``). ``method="hard"`` with ``score="softmax"`` is the standard top-k softmax gate (GShard,
    Mixtral); ``"hard"`` with ``"sigmoid"`` and ``load_balance="bias"`` is DeepSeek-V3's. As the temperature → 0 a
    soft method tends to that hard gate. In ``eval()`` with ``hard_in_eval=True`` (default) the mask is the exact
    top-k: the weights are the normalised scores at the top k.

    - ``load_balance="aux"``: ``aux_loss`` = E · Σ_e f_e P_e (Switch Transformer, GShard), f_e = ``load[e]`` the
      fraction of the T·k slots selecting expert e, P_e the mean of softmax(logits)[:, e]; add it (times a small
      coefficient, e.g. 1e-2) to the training loss. It is 1 for a uniform router.
    - ``load_balance="bias"``: auxiliary-loss-free balancing (DeepSeek-V3; Wang et al. 2024): a buffer
      ``expert_bias`` (E,), not learned, is added to the logits that **select** the experts (``indices``, and the
      mask, which is the soft selection), not to the scores. After each forward in ``train()``,
      ``expert_bias += bias_update_rate · sign(mean(load) − load)``: overloaded experts are pushed down. With
      ``method="hard"`` the weights of a given selection do not depend on the bias.
    - ``jitter`` > 0: in ``train()`` the tokens are multiplied by uniform noise in [1 − jitter, 1 + jitter] (Switch).
    - ``capacity_factor``: each expert takes at most C = ⌈capacity_factor · T · k / E⌉ tokens; beyond C, the slots
      of lowest weight for that expert (ties: the later tokens) are **dropped, not rerouted**: weight 0 and
      ``routing_map`` False there, the token's other weights unchanged. ``dropped`` is the fraction of the T·k slots
      dropped.
    - A method with a data-dependent support (``"sparse"``) is bounded with ``max_support = k + 1`` (unless given):
      its mask is nonzero on at most k + 1 experts; ``max_support = k`` would give the hard mask and no gradient.
      The mask's mass outside the k selected experts is dropped from the weights and reported per token as
      ``outside`` (as :func:`softtopk.topk`'s ``.outside``).

    Args:
        d_model: the token size, a positive int.
        n_experts: the number of experts E, a positive int.
        k: the number of experts per token, an int in [1, n_experts].
        method: a method of :func:`softtopk.topk_mask` (default ``"sigmoid"``).
        temperature: T > 0 of the soft mask, in logit units (None: 1.0); may be an ``nn.Parameter``.
        score: ``"softmax"``, ``"sigmoid"`` or None, the expert scores multiplying the mask.
        normalize: divide the weights by their sum over the k experts.
        jitter: the multiplicative noise on the tokens in ``train()``, in [0, 1).
        capacity_factor: None (no capacity) or a positive number.
        load_balance: ``"aux"``, ``"bias"`` or None.
        bias_update_rate: the step of the bias update (``load_balance="bias"``), a number ≥ 0.
        hard_in_eval: the exact top-k mask in ``eval()``.
        **options: the method's options, as :func:`softtopk.topk_mask` (``straight_through`` and ``max_support``
            included).

    Example:
        >>> import torch
        >>> from softtopk.nn import TopKRouter
        >>> router = TopKRouter(2, 3, 2, temperature=0.5)
        >>> with torch.no_grad():
        ...     _ = router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        >>> tokens = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # logits [2, 0, 1] and [0, 1, 0.5]
        >>> r = router(tokens)
        >>> r.indices
        tensor([[0, 2],
                [1, 2]])
        >>> r.weights.detach(), router.eval()(tokens).weights.detach()  # soft mask · softmax; exact top-k softmax
        (tensor([[0.7346, 0.2654],
                [0.6509, 0.3491]]), tensor([[0.7311, 0.2689],
                [0.6225, 0.3775]]))
        >>> r.routing_map, r.load
        (tensor([[ True, False,  True],
                [False,  True,  True]]), tensor([0.2500, 0.2500, 0.5000]))
    """

    expert_bias: Union[Tensor, None]  # the buffer of load_balance="bias" (None otherwise)

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        *,
        method: str = "sigmoid",
        temperature: Union[float, Tensor, None] = None,
        score: Union[str, None] = "softmax",
        normalize: bool = True,
        jitter: float = 0.0,
        capacity_factor: Union[float, None] = None,
        load_balance: Union[str, None] = "aux",
        bias_update_rate: float = 1e-3,
        hard_in_eval: bool = True,
        **options,
    ):
        super().__init__()
        fn = "TopKRouter"
        d_model = _check_positive_int(d_model, "d_model", fn)
        n_experts = _check_positive_int(n_experts, "n_experts", fn)
        k = _check_router_args(n_experts, k, score, load_balance, capacity_factor, fn)
        _check_mask_args(method, temperature, None, options, k, fn)
        for name, flag in (("normalize", normalize), ("hard_in_eval", hard_in_eval)):
            check_bool(flag, name, fn=fn)
        self.jitter: float = _check_real(jitter, "jitter", fn, 0.0, 1.0, closed_low=True)
        self.bias_update_rate: float = _check_real(bias_update_rate, "bias_update_rate", fn, 0.0, math.inf,
                                                   closed_low=True)  # fmt: skip
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.method, self.temperature, self.score, self.normalize = method, temperature, score, normalize
        self.capacity_factor: Union[float, None] = None if capacity_factor is None else float(capacity_factor)
        self.load_balance: Union[str, None] = load_balance
        self.hard_in_eval: bool = hard_in_eval
        self.options: dict = options
        self._topk_options = _router_options(method, k, n_experts, options)
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts) if load_balance == "bias" else None)

    def _logits(self, tokens: Tensor) -> Tensor:
        check_finite(tokens, "tokens", fn="TopKRouter")
        if tokens.dim() < 1 or tokens.shape[-1] != self.d_model:
            raise ValueError(
                f"TopKRouter: `tokens` must have shape (..., d_model) = (..., {self.d_model}), got "
                f"{tuple(tokens.shape)}"
            )
        x = tokens.reshape(-1, self.d_model)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return nn.functional.linear(x, self.gate.weight.to(x.dtype))

    def _select(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, mask at the indices, outside) of the selection logits."""
        sel = logits if self.expert_bias is None else logits + self.expert_bias.to(logits.dtype)
        if self.hard_in_eval and not self.training:
            r = topk(sel, self.k, method="hard")
        else:
            r = topk(sel, self.k, method=self.method, temperature=self.temperature, **self._topk_options)
        return r.indices, r.weights, getattr(r, "outside")  # noqa: B009 (TopK's extra attribute)

    def _weights(self, logits: Tensor, indices: Tensor, mask: Tensor) -> Tensor:
        if self.score == "softmax":
            mask = mask * torch.softmax(logits, dim=-1).gather(-1, indices)
        elif self.score == "sigmoid":
            mask = mask * torch.sigmoid(logits).gather(-1, indices)
        if self.normalize:
            mask = mask / mask.sum(-1, keepdim=True).clamp_min(torch.finfo(mask.dtype).tiny)
        return mask

    def forward(self, tokens: Tensor) -> Routing:
        logits = self._logits(tokens)
        indices, mask, outside = self._select(logits)
        weights = self._weights(logits, indices, mask)
        n_tokens, n_slots = logits.shape[0], indices.numel()
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, indices, True)
        load = routing_map.sum(0).to(logits.dtype) / max(n_slots, 1)
        dropped = logits.new_zeros(())
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n_slots / self.n_experts)
            dense = torch.zeros_like(logits).scatter(-1, indices, weights)
            routing_map = _capacity_keep(dense, routing_map, capacity)
            weights = weights * routing_map.gather(-1, indices)
            dropped = (n_slots - routing_map.sum()).to(logits.dtype) / max(n_slots, 1)
        dense = torch.zeros_like(logits).scatter(-1, indices, weights)
        aux = _aux_loss(logits, load) if self.load_balance == "aux" and n_tokens else logits.new_zeros(())
        if self.expert_bias is not None and self.training:
            with torch.no_grad():
                self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)
        return Routing(indices, weights, dense, routing_map, load, aux, dropped, outside.to(logits.dtype))

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}", f"n_experts={self.n_experts}", f"k={self.k}", f"method={self.method!r}"]
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        defaults = (("score", "softmax"), ("normalize", True), ("jitter", 0.0), ("capacity_factor", None))
        parts += [f"{name}={getattr(self, name)!r}" for name, default in defaults if getattr(self, name) != default]
        parts.append(f"load_balance={self.load_balance!r}")
        if self.load_balance == "bias":
            parts.append(f"bias_update_rate={self.bias_update_rate}")
        parts.append(f"hard_in_eval={self.hard_in_eval}")
        parts += [f"{key}={val!r}" for key, val in self.options.items()]
        return ", ".join(parts)
