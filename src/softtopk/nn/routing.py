"""The mixture-of-experts router ``TopKRouter`` and its result ``Routing``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

from .._prepare import (
    check_bool,
    check_finite,
)
from .._registry import lookup
from ..masks import topk_mask
from ._checks import check_mask_args, check_positive_int, check_real

__all__ = ["Routing", "TopKRouter"]


class Routing(NamedTuple):
    r"""The result of :class:`TopKRouter`, for T tokens (the leading dims of the input flattened) and E experts.

    - ``indices`` (T, k) long: the k experts of each token, ``torch.topk`` of the selection logits;
    - ``weights`` (T, k): the combine weights at those experts (0 for a slot dropped by the capacity);
    - ``dense`` (T, E): the weights scattered to all experts, 0 elsewhere;
    - ``routing_map`` (T, E) bool: the dispatch map (True where a token is sent to an expert);
    - ``load`` (E,): the fraction of the T·k token slots the router selects for each expert (before any capacity
      drop; it sums to 1);
    - ``aux_loss``: the load-balancing loss E · Σ_e f_e P_e (a scalar; 0 unless ``load_balance="aux"``);
    - ``dropped``: the fraction of the T·k slots dropped by the capacity (a scalar, 0 without capacity);
    - ``outside`` (T,): the soft mask's mass outside the k selected experts (dropped from the weights; detached);
    - ``surrogate`` (T, E): the values of ``dense`` (exactly) with the gradient of the dense surrogate weights
      :math:`\tilde w = m \odot s / \sum_{e=1}^{E} m_e s_e` over **all** E experts (m the full soft mask, s the
      scores; without the division when ``normalize=False``): for ``straight_through=True`` the forward is the hard
      selection and the gradient is the sigmoid surrogate's also at the experts not selected (and at slots dropped by
      the capacity). ``dense`` carries a gradient only at the selected experts. Combining **every** expert's output
      with ``surrogate`` gives the full straight-through gradient (:class:`MixtureOfExperts` with
      ``dense_backward=True``);
    - ``logits`` (T, E): the gate logits :math:`x W^\top` (without ``expert_bias``), e.g. for a router z-loss.
    """

    indices: Tensor
    weights: Tensor
    dense: Tensor
    routing_map: Tensor
    load: Tensor
    aux_loss: Tensor
    dropped: Tensor
    outside: Tensor
    surrogate: Tensor
    logits: Tensor


_SCORES = ("softmax", "sigmoid", None)
_BALANCES = ("aux", "bias", None)


def _check_router_args(n_experts: int, k: Any, score: Any, load_balance: Any, capacity_factor: Any, fn: str) -> int:
    k = check_positive_int(k, "k", fn)
    if k > n_experts:
        raise ValueError(f"{fn}: `k`={k} is out of range [1, n_experts={n_experts}]")
    for name, value, choices in (("score", score, _SCORES), ("load_balance", load_balance, _BALANCES)):
        if value not in choices:
            raise ValueError(f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if capacity_factor is not None:
        check_real(capacity_factor, "capacity_factor", fn, 0.0, math.inf, closed_low=False)
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
    - ``straight_through=True`` (with a soft ``method``): the weights are the hard gate's, the gradient the soft
      mask's. ``dense`` and ``weights`` then carry a gradient only at the selected experts, through their scores and
      masks; the gradient at the other experts needs their outputs, which a layer running only the selected experts
      does not have. ``surrogate`` is the dense (T, E) weight tensor whose values are ``dense``'s and whose gradient
      is the soft mask's at every expert: see :class:`MixtureOfExperts` (``dense_backward``).

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
        d_model = check_positive_int(d_model, "d_model", fn)
        n_experts = check_positive_int(n_experts, "n_experts", fn)
        k = _check_router_args(n_experts, k, score, load_balance, capacity_factor, fn)
        check_mask_args(method, temperature, None, options, k, fn)
        for name, flag in (("normalize", normalize), ("hard_in_eval", hard_in_eval)):
            check_bool(flag, name, fn=fn)
        self.jitter: float = check_real(jitter, "jitter", fn, 0.0, 1.0, closed_low=True)
        self.bias_update_rate: float = check_real(bias_update_rate, "bias_update_rate", fn, 0.0, math.inf,
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
        """(indices, the full (T, E) mask, outside) of the selection logits; the mask is computed once (a stochastic
        method draws once) and gathered at ``torch.topk``'s indices, as :func:`softtopk.topk` does."""
        sel = logits if self.expert_bias is None else logits + self.expert_bias.to(logits.dtype)
        if self.hard_in_eval and not self.training:
            full = topk_mask(sel, self.k, method="hard")
        else:
            full = topk_mask(sel, self.k, method=self.method, temperature=self.temperature, **self._topk_options)
        indices = torch.topk(sel, self.k, dim=-1).indices
        outside = full.detach().scatter(-1, indices, 0.0).sum(-1)
        return indices, full, outside

    def _scores(self, logits: Tensor) -> Union[Tensor, None]:
        if self.score is None:
            return None
        return torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)

    def _scored(self, mask: Tensor, scores: Union[Tensor, None]) -> Tensor:
        """The mask times the scores (of the same shape), normalised over the last dim."""
        if scores is not None:
            mask = mask * scores
        if self.normalize:
            mask = mask / mask.sum(-1, keepdim=True).clamp_min(torch.finfo(mask.dtype).tiny)
        return mask

    def forward(self, tokens: Tensor) -> Routing:
        logits = self._logits(tokens)
        indices, full, outside = self._select(logits)
        scores = self._scores(logits)
        weights = self._scored(full.gather(-1, indices), None if scores is None else scores.gather(-1, indices))
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
        smooth = self._scored(full, scores)  # the dense surrogate weights
        surrogate = dense.detach() + (smooth - smooth.detach())  # the values of dense, the gradient of smooth
        aux = _aux_loss(logits, load) if self.load_balance == "aux" and n_tokens else logits.new_zeros(())
        if self.expert_bias is not None and self.training:
            with torch.no_grad():
                self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)
        outside = outside.to(logits.dtype)
        return Routing(indices, weights, dense, routing_map, load, aux, dropped, outside, surrogate, logits)

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
