"""Differentiable k-nearest neighbours (SOFT, Xie et al. 2020): ``soft_knn``, ``knn_predict`` and the module
``SoftKNN``."""

from __future__ import annotations

import math
import numbers
from typing import Any, Union

import torch
from torch import Tensor, nn

from .._prepare import (
    can_read_data,
    check_bool,
    check_finite,
    compute_dtype,
)
from ..masks import topk_mask
from ._checks import check_mask_args

__all__ = ["SoftKNN", "knn_predict", "soft_knn"]


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
    check_mask_args(method, temperature, scale, options, k, fn)
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
        check_mask_args(method, temperature, scale, options, k, fn)
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
