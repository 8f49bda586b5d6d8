r"""Magnitude pruning and sparse training with top-k: ``TopKMagnitudePruning`` (Sander et al. 2023's sparse soft
top-k in magnitude as a parametrization, with :func:`prune_topk_magnitude` and :func:`make_pruning_permanent`),
``TopKAST`` (Jayakumar et al. 2020, with :func:`topkast_regularizer`) and ``SWATLinear`` (Raihan & Aamodt 2020).

All three keep, in a weight tensor of n entries, the k entries of largest magnitude, where ``k`` is given or
``k = round((1 − sparsity) · n)`` (at least 1), n being the whole tensor's size (``dim=None``, the default) or the
size along ``dim`` (each slice along ``dim`` keeps k: ``dim=1`` for an ``nn.Linear`` weight of shape (out, in) keeps
k inputs per output unit). The hard selection is ``torch.topk`` of ``|w|``: exactly k entries, ties broken as
``torch.topk`` breaks them. A kept entry that is itself 0 makes the count of nonzeros smaller than k.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._prepare import check_bool, check_finite
from ..masks import topk_mask
from ..permutahedron import topk_magnitude
from ._checks import check_positive_int, check_real

__all__ = [
    "SWATLinear",
    "TopKAST",
    "TopKMagnitudePruning",
    "make_pruning_permanent",
    "prune_topk_magnitude",
    "topkast_regularizer",
]


def _check_sparsity(sparsity: Any, name: str, fn: str) -> float:
    return check_real(sparsity, name, fn, 0.0, 1.0, closed_low=True)


def _check_selection(k: Any, sparsity: Any, dim: Any, fn: str) -> tuple[Union[int, None], Union[float, None]]:
    """Exactly one of ``k`` (a positive int) and ``sparsity`` (in [0, 1)); ``dim`` None or an int."""
    if (k is None) == (sparsity is None):
        raise TypeError(f"{fn}: give exactly one of `k` and `sparsity`, got k={k!r}, sparsity={sparsity!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
        raise TypeError(f"{fn}: `dim` must be None or an int, got {type(dim).__name__}")
    if k is not None:
        return check_positive_int(k, "k", fn), None
    return None, _check_sparsity(sparsity, "sparsity", fn)


def _keep_count(n: int, k: Union[int, None], sparsity: Union[float, None], fn: str) -> int:
    """The number of entries kept out of ``n``: ``k``, or round((1 − sparsity) · n) and at least 1."""
    if k is None:
        return min(n, max(1, round((1.0 - float(sparsity)) * n)))  # type: ignore[arg-type]
    if k > n:
        raise ValueError(f"{fn}: `k`={k} is out of range [1, n={n}] (n: the entries selected from)")
    return k


def _selection_size(weight: Tensor, dim: Union[int, None], fn: str) -> int:
    if weight.numel() == 0:
        raise ValueError(f"{fn}: the weight is empty (shape {tuple(weight.shape)})")
    if dim is None:
        return weight.numel()
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"{fn}: `dim`={dim} is out of range for a weight of shape {tuple(weight.shape)}")
    return weight.shape[dim]


def _hard_mask(weight: Tensor, k: int, dim: Union[int, None]) -> Tensor:
    """The 0/1 mask (weight's dtype) of the k entries of largest |weight| (along ``dim``, or of the whole tensor)."""
    scores = weight.detach().abs()
    if dim is None:
        return topk_mask(scores.reshape(-1), k, method="hard").reshape(weight.shape)
    return topk_mask(scores, k, dim=dim, method="hard")


class _MagnitudeSelection(nn.Module):
    """What the parametrizations share: ``k`` or ``sparsity``, ``dim``, and the hard mask of a weight."""

    def __init__(self, k: Union[int, None], sparsity: Union[float, None], dim: Union[int, None], fn: str):
        super().__init__()
        self._fn = fn
        self.k, self.sparsity = _check_selection(k, sparsity, dim, fn)
        self.dim: Union[int, None] = None if dim is None else int(dim)

    def keep(self, weight: Tensor) -> int:
        """The number of entries kept (per slice along ``dim``, or in the whole tensor)."""
        return _keep_count(_selection_size(weight, self.dim, self._fn), self.k, self.sparsity, self._fn)

    def hard_mask(self, weight: Tensor) -> Tensor:
        """The 0/1 mask of the ``keep(weight)`` entries of largest magnitude (weight's shape and dtype)."""
        check_finite(weight, "weight", fn=self._fn)
        return _hard_mask(weight, self.keep(weight), self.dim)

    def _selection_repr(self) -> list[str]:
        parts = [f"k={self.k}" if self.k is not None else f"sparsity={self.sparsity:g}"]
        return parts + ([f"dim={self.dim}"] if self.dim is not None else [])


class TopKMagnitudePruning(_MagnitudeSelection):
    r"""Magnitude pruning as a parametrization: the weight seen by the layer is its soft top-k in magnitude.

    For ``torch.nn.utils.parametrize.register_parametrization`` (or :func:`prune_topk_magnitude`). In ``train()``
    the layer uses :math:`\mathrm{topk\_magnitude}(w, k, t)` (:func:`softtopk.topk_magnitude`, Sander et al. 2023,
    "Fast, Differentiable and Sparse Top-k: a Convex Analysis Perspective"): the entries of ``w`` clearly inside
    the top-k of ``|w|`` pass unchanged, those near the k-th magnitude are shrunk, all others are exactly 0, and the
    gradient reaches the kept weights and those in the transition band (not the pruned ones). It is
    :math:`\nabla f_t(w)`, the gradient of :math:`f(w) = \tfrac12 \max_{y \in \mathcal{P}} \langle y, w \circ
    w\rangle` (:math:`\mathcal{P}` the permutahedron of (1, …, 1, 0, …, 0), k ones) smoothed by t times the p-norm
    regulariser in the dual, :math:`f_t = (f^* + t\Omega_p)^*`. Its support has at least k entries, more at a larger
    temperature; as t → 0 it is :math:`w \circ \mathrm{topkmask}(|w|)`.
    In ``eval()`` (and at ``temperature=0`` in ``train()``) it is exactly :math:`w \circ \mathrm{topkmask}(|w|)`,
    k nonzeros (the hard mask of ``torch.topk``; its gradient is g ∘ mask).

    Make the pruning permanent with :func:`make_pruning_permanent` (it evaluates the parametrization in ``eval()``,
    i.e. with the hard mask, then calls ``parametrize.remove_parametrizations(..., leave_parametrized=True)``):
    ``parametrize.remove_parametrizations`` alone, on a module in ``train()``, would bake in the soft weight.

    Args:
        k: the number of weights kept (per slice along ``dim``, or in the whole tensor), an int in [1, n]; or
        sparsity: the fraction pruned, in [0, 1): k = round((1 − sparsity) · n), at least 1. Give one of the two.
        temperature: t ≥ 0 of the soft top-k (0: the hard mask in ``train()`` too); may be changed between steps
            (annealing) through the attribute ``temperature``. It is dimensionless: with p = 2,
            ``topk_magnitude(c·w, k, t) = c·topk_magnitude(w, k, t)``, so one value suits layers of any weight
            scale; with p = 4/3 (not scale-equivariant) the weight is divided by its RMS (per slice along ``dim``,
            detached) before the operator and multiplied back after, to the same effect. The support grows with t
            and with the density of magnitudes near the threshold: at 90 % sparsity, for Gaussian weights, about
            1.1 k entries at t = 0.05, 1.5 k at 0.3, 2.5 k at 1; for uniform weights (the initialisation of
            ``nn.Linear``) 1.2 k, 2.2 k, 3.6 k; at 98 % sparsity, uniform, 2.2 k, 5.2 k, 9 k.
        p: the regulariser of :func:`softtopk.topk_magnitude`, 2 or 4/3.
        dim: None (default): the k largest of the whole tensor; an int: the k largest along ``dim`` in each slice
            (``dim=1`` for an ``nn.Linear`` weight: k inputs per output unit).

    Shapes: the weight, any shape, to the same shape and dtype.

    Example:
        >>> import torch
        >>> from softtopk.nn import TopKMagnitudePruning
        >>> w = torch.tensor([[0.5, -2.0, 0.1], [1.0, -0.9, 3.0]])
        >>> prune = TopKMagnitudePruning(k=3, temperature=0.5)
        >>> prune(w)  # train(): -2 and 3 pass, 1 and -0.9 (the 3rd and 4th) share the 3rd place
        tensor([[ 0.0000, -2.0000,  0.0000],
                [ 0.7200, -0.4200,  3.0000]])
        >>> prune.eval()(w)  # eval(): w ∘ topkmask(|w|)
        tensor([[ 0., -2.,  0.],
                [ 1., -0.,  3.]])
    """

    def __init__(
        self,
        k: Union[int, None] = None,
        *,
        sparsity: Union[float, None] = None,
        temperature: float = 0.1,
        p: float = 2,
        dim: Union[int, None] = None,
    ):
        super().__init__(k, sparsity, dim, "TopKMagnitudePruning")
        fn = self._fn
        self.temperature: float = check_real(temperature, "temperature", fn, 0.0, math.inf, closed_low=True)
        if isinstance(p, bool) or p not in (2, 4 / 3):
            raise ValueError(f"{fn}: `p` must be 2 or 4/3, got {p!r}")
        self.p = p

    def _soft(self, weight: Tensor, k: int) -> Tensor:
        """topk_magnitude along the last dim (p = 4/3: of the weight over its detached RMS, scaled back)."""
        if self.p == 2:
            return topk_magnitude(weight, k, temperature=self.temperature, p=2)
        rms = weight.detach().square().mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(weight.dtype).tiny)
        return topk_magnitude(weight / rms, k, temperature=self.temperature, p=self.p) * rms

    def forward(self, weight: Tensor) -> Tensor:
        check_finite(weight, "weight", fn=self._fn)
        n = _selection_size(weight, self.dim, self._fn)
        k = _keep_count(n, self.k, self.sparsity, self._fn)
        if not self.training or self.temperature == 0 or k == n:
            return weight * _hard_mask(weight, k, self.dim)
        if self.dim is None:
            return self._soft(weight.reshape(-1), k).reshape(weight.shape)
        return self._soft(weight.movedim(self.dim, -1), k).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return ", ".join(self._selection_repr()) + f", temperature={self.temperature:g}, p={self.p:g}"


def prune_topk_magnitude(
    module: nn.Module,
    name: str = "weight",
    *,
    sparsity: Union[float, None] = None,
    k: Union[int, None] = None,
    temperature: float = 0.1,
    p: float = 2,
    dim: Union[int, None] = None,
) -> TopKMagnitudePruning:
    """Registers :class:`TopKMagnitudePruning` on ``module``'s parameter ``name`` and returns it.

    ``module.<name>`` is then the soft top-k in magnitude of the stored dense parameter
    (``module.parametrizations.<name>.original``, which the optimiser updates) in ``train()``, and its exact
    magnitude pruning, k nonzeros, in ``eval()``. :func:`make_pruning_permanent` ends it with the hard mask.

    Args:
        module: the layer, e.g. an ``nn.Linear``.
        name: the parameter's name.
        sparsity, k, temperature, p, dim: as :class:`TopKMagnitudePruning` (one of ``sparsity`` and ``k``).

    Returns:
        The parametrization (change its ``temperature`` to anneal).

    Example:
        >>> import torch
        >>> from softtopk.nn import prune_topk_magnitude
        >>> layer = torch.nn.Linear(20, 10)
        >>> pruning = prune_topk_magnitude(layer, sparsity=0.9, temperature=0.05)
        >>> int((layer.eval().weight != 0).sum())  # 10 % of 200
        20
    """
    fn = "prune_topk_magnitude"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: `module` must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not isinstance(getattr(module, name, None), Tensor):
        raise ValueError(f"{fn}: `name`={name!r} is not a tensor of {type(module).__name__}")
    pruning = TopKMagnitudePruning(k, sparsity=sparsity, temperature=temperature, p=p, dim=dim)
    parametrize.register_parametrization(module, name, pruning)
    return pruning


def make_pruning_permanent(module: nn.Module, name: str = "weight") -> Tensor:
    """Ends the parametrizations of ``module.<name>`` and leaves the parameter hard-pruned.

    The parametrizations (:class:`TopKMagnitudePruning`, :class:`TopKAST`) are evaluated in ``eval()`` mode, i.e.
    with the hard mask :math:`w \\circ \\mathrm{topkmask}(|w|)`, and removed with
    ``torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)``; ``module``
    keeps its own mode. Nothing keeps the zeros at zero afterwards: further training regrows them.

    Args:
        module: a module with a parametrized tensor ``name``.
        name: the tensor's name.

    Returns:
        The (detached) hard-pruned parameter.

    Example:
        >>> import torch
        >>> from softtopk.nn import make_pruning_permanent, prune_topk_magnitude
        >>> layer = torch.nn.Linear(20, 10)
        >>> _ = prune_topk_magnitude(layer, k=15)
        >>> int((make_pruning_permanent(layer) != 0).sum()), type(layer.weight).__name__
        (15, 'Parameter')
    """
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"make_pruning_permanent: `{name}` of {type(module).__name__} is not parametrized")
    modes = [(m, m.training) for m in module.parametrizations[name]]  # type: ignore[index, union-attr]
    for m, _ in modes:
        m.eval()
    try:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    finally:
        for m, training in modes:
            m.train(training)
    return getattr(module, name).detach()


class _TopKASTGrad(torch.autograd.Function):
    """Top-KAST's sparse backward: forward y = w ∘ m_A, backward ∂L/∂w := g ∘ m_B (m_B ⊇ m_A).

    Not the Jacobian of the forward where m_B ≠ m_A (by design: the entries of B \\ A are updated though unused).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask_a: Tensor, mask_b: Tensor) -> Tensor:
        ctx.save_for_backward(mask_b)
        return weight * mask_a

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask_b,) = ctx.saved_tensors
        return grad * mask_b, None, None  # ∂L/∂w := g ∘ m_B


def _nested_masks(weight: Tensor, k_a: int, k_b: int, dim: Union[int, None]) -> tuple[Tensor, Tensor]:
    """(m_A, m_B): the k_a and k_b entries of largest |w| from one sorted ``torch.topk``, so A ⊆ B even with ties."""
    scores = weight.detach().abs()
    scores = scores.reshape(-1) if dim is None else scores.movedim(dim, -1)
    order = torch.topk(scores, k_b, dim=-1, sorted=True).indices
    zeros = torch.zeros_like(scores)
    mask_a = zeros.scatter(-1, order[..., :k_a], 1.0)
    mask_b = zeros.scatter(-1, order, 1.0)
    if dim is None:
        return mask_a.reshape(weight.shape), mask_b.reshape(weight.shape)
    return mask_a.movedim(-1, dim), mask_b.movedim(-1, dim)


class TopKAST(_MagnitudeSelection):
    r"""Top-KAST (Jayakumar et al. 2020, "Top-KAST: Top-K Always Sparse Training") as a parametrization.

    The dense weights θ are stored; each forward selects A, the top-k of ``|θ|`` at ``forward_sparsity`` (the
    forward uses :math:`\alpha = \theta \circ m_A`, k_A nonzeros), and B ⊇ A, the top-k' at ``backward_sparsity``
    ≤ ``forward_sparsity``. In ``train()`` the gradient reaching θ is :math:`\partial L/\partial\alpha \circ m_B`
    (a custom backward, not the Jacobian of the forward): the weights of B \ A are trained although unused, so they
    can enter A; those outside B are frozen. Add :func:`topkast_regularizer` to the loss: Top-KAST's exploration
    penalty, an L2 penalty that weighs the weights of B \ A 1/D times more than those of A (D = 1 −
    ``forward_sparsity``, the forward density), so that a weight must earn its way into A. In ``eval()`` the
    forward is the same :math:`\theta \circ m_A` with the plain gradient g ∘ m_A. Sets are recomputed every
    forward; ties as ``torch.topk``, one sorted ``torch.topk`` giving both so that A ⊆ B.

    Args:
        forward_sparsity: the fraction of zeros in the forward, in [0, 1).
        backward_sparsity: the fraction of weights not receiving a gradient, in [0, ``forward_sparsity``]
            (default: ``forward_sparsity``, B = A, the plain gradient).
        dim: None (whole tensor, default) or the dim along which each slice keeps its top-k.

    Shapes: the weight, any shape, to the same shape and dtype.

    Example:
        >>> import torch
        >>> from softtopk.nn import TopKAST
        >>> w = torch.tensor([4.0, -3.0, 2.0, 1.0], requires_grad=True)
        >>> topkast = TopKAST(0.75, 0.5)  # A: 1 entry, B: 2 entries
        >>> out = topkast(w)
        >>> out.sum().backward()
        >>> out.detach(), w.grad
        (tensor([4., -0., 0., 0.]), tensor([1., 1., 0., 0.]))
    """

    def __init__(
        self,
        forward_sparsity: float,
        backward_sparsity: Union[float, None] = None,
        *,
        dim: Union[int, None] = None,
    ):
        fwd = _check_sparsity(forward_sparsity, "forward_sparsity", "TopKAST")
        bwd = fwd if backward_sparsity is None else _check_sparsity(backward_sparsity, "backward_sparsity", "TopKAST")
        if bwd > fwd:
            raise ValueError(
                f"TopKAST: `backward_sparsity` must not exceed `forward_sparsity`={fwd:g} (B ⊇ A), got {bwd:g}"
            )
        super().__init__(None, fwd, dim, "TopKAST")
        self.forward_sparsity: float = fwd
        self.backward_sparsity: float = bwd

    def masks(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(m_A, m_B), the 0/1 masks (weight's shape and dtype) of the forward set A and the backward set B ⊇ A."""
        check_finite(weight, "weight", fn=self._fn)
        n = _selection_size(weight, self.dim, self._fn)
        k_a = _keep_count(n, None, self.forward_sparsity, self._fn)
        k_b = max(k_a, _keep_count(n, None, self.backward_sparsity, self._fn))
        return _nested_masks(weight, k_a, k_b, self.dim)

    def forward(self, weight: Tensor) -> Tensor:
        mask_a, mask_b = self.masks(weight)
        if not self.training:
            return weight * mask_a
        return _TopKASTGrad.apply(weight, mask_a, mask_b)

    def regularizer(self, weight: Tensor) -> Tensor:
        r""":math:`\sum_{i\in A} \theta_i^2 + \frac1D \sum_{i \in B\setminus A} \theta_i^2` of the dense weight θ
        (D = 1 − ``forward_sparsity``); differentiable, a scalar of θ's dtype. Weights outside B are not
        penalised (they get no gradient)."""
        mask_a, mask_b = self.masks(weight)
        density = 1.0 - self.forward_sparsity
        return (weight.square() * (mask_a + (mask_b - mask_a) / density)).sum()

    def extra_repr(self) -> str:
        dim = "" if self.dim is None else f", dim={self.dim}"
        return f"forward_sparsity={self.forward_sparsity:g}, backward_sparsity={self.backward_sparsity:g}{dim}"


def topkast_regularizer(model: nn.Module) -> Tensor:
    r"""The sum of :meth:`TopKAST.regularizer` over every tensor of ``model`` parametrized with :class:`TopKAST`.

    Top-KAST's exploration penalty (Jayakumar et al. 2020): the squared L2 norm of the weights in the forward
    set A plus 1/D times that of the weights in B \ A, D the forward density. Multiply it by a coefficient (like
    weight decay) and add it to the loss.

    Args:
        model: any module; its submodules' parametrized tensors are searched.

    Returns:
        A scalar (0 if there is no Top-KAST parametrization).

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> from softtopk.nn import TopKAST, topkast_regularizer
        >>> layer = torch.nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[4.0, -3.0, 2.0, 1.0]]))
        >>> _ = parametrize.register_parametrization(layer, "weight", TopKAST(0.75, 0.5))
        >>> topkast_regularizer(layer).item()  # 4² + 3² / 0.25 (A = {4}, B = {4, -3})
        52.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"topkast_regularizer: `model` must be an nn.Module, got {type(model).__name__}")
    total: Union[Tensor, None] = None
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():  # type: ignore[union-attr, operator]
            for param in plist:
                if isinstance(param, TopKAST):
                    original = getattr(module.parametrizations, name).original
                    term = param.regularizer(original)
                    total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


class _SWATFunction(torch.autograd.Function):
    """SWAT's linear layer on 2-D input: forward y = x W_sᵀ + b (W_s the top-k of W, the activations dense);
    backward ∂L/∂x = g W_s, ∂L/∂W = gᵀ x_s (x_s: each row's top-k of |x|; dense over W: every weight is updated),
    ∂L/∂b = Σ g."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Union[Tensor, None], k_w: int, k_a: int) -> Tensor:
        w_sparse = weight * _hard_mask(weight, k_w, None)
        x_sparse = x * _hard_mask(x, k_a, -1)  # stored for the backward instead of x
        ctx.save_for_backward(x_sparse, w_sparse)
        ctx.has_bias = bias is not None
        out = x @ w_sparse.T
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Any, ...]:
        x_sparse, w_sparse = ctx.saved_tensors
        grad_x = grad @ w_sparse  # ∂L/∂x = g W_s (exact for the forward)
        grad_w = grad.T @ x_sparse  # ∂L/∂W := gᵀ x_s (sparse activations; straight through W's mask)
        grad_b = grad.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


class SWATLinear(nn.Linear):
    r"""A linear layer trained with SWAT (Raihan & Aamodt 2020, "Sparse Weight Activation Training").

    Forward: :math:`y = x W_s^\top + b`, :math:`W_s = W \circ \mathrm{topkmask}(|W|)` the top-k of the whole
    weight (k = round((1 − ``weight_sparsity``) · in · out)); the input x is used dense, as in the paper, which
    sparsifies weights only in the forward pass. Backward (in ``train()``): the input gradient with the sparse
    weights, :math:`\partial L/\partial x = g W_s`; the weight gradient with the sparsified activations,
    :math:`\partial L/\partial W = g^\top x_s`, :math:`x_s` keeping the k_a = round((1 − ``activation_sparsity``)
    · in) entries of largest ``|x|`` of each input row (that is what the layer stores for its backward). The
    weight gradient is dense (straight through W's mask, as SWAT's dense weight update): every weight is updated,
    so the top-k set can change from step to step. In ``eval()`` the forward is the same; the gradient (if any) is
    the plain one, g ∘ topkmask on W and x dense. ``sparse_weight()`` is :math:`W_s`.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        weight_sparsity: the fraction of zero weights in the forward, in [0, 1).
        activation_sparsity: the fraction of each input row dropped from the weight gradient, in [0, 1).

    Shapes: (..., in_features) → (..., out_features).

    Example:
        >>> import torch
        >>> from softtopk.nn import SWATLinear
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layer = SWATLinear(8, 4, weight_sparsity=0.75, activation_sparsity=0.5)
        >>> layer(torch.randn(3, 8)).shape, int((layer.sparse_weight() != 0).sum())
        (torch.Size([3, 4]), 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_sparsity: float,
        activation_sparsity: float = 0.0,
        device: Any = None,
        dtype: Union[torch.dtype, None] = None,
    ):
        fn = "SWATLinear"
        in_features = check_positive_int(in_features, "in_features", fn)
        out_features = check_positive_int(out_features, "out_features", fn)
        check_bool(bias, "bias", fn=fn)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_sparsity: float = _check_sparsity(weight_sparsity, "weight_sparsity", fn)
        self.activation_sparsity: float = _check_sparsity(activation_sparsity, "activation_sparsity", fn)
        self.k_weight: int = _keep_count(in_features * out_features, None, self.weight_sparsity, fn)
        self.k_activation: int = _keep_count(in_features, None, self.activation_sparsity, fn)

    def sparse_weight(self) -> Tensor:
        """:math:`W_s = W \\circ \\mathrm{topkmask}(|W|)`, the weight of the forward (``k_weight`` nonzeros)."""
        return self.weight * _hard_mask(self.weight, self.k_weight, None)

    def forward(self, x: Tensor) -> Tensor:
        check_finite(x, "x", fn="SWATLinear")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SWATLinear: `x` must have shape (..., in_features) = (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if not self.training:
            return nn.functional.linear(x, self.sparse_weight(), self.bias)
        flat = x.reshape(-1, self.in_features)
        out = _SWATFunction.apply(flat, self.weight, self.bias, self.k_weight, self.k_activation)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", weight_sparsity={self.weight_sparsity:g}, activation_sparsity={self.activation_sparsity:g}"
        )
