"""The mixture-of-experts layer ``MixtureOfExperts``: a ``TopKRouter`` and its experts, with index-based dispatch."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from .._prepare import check_bool
from .routing import Routing, TopKRouter

__all__ = ["MixtureOfExperts"]


def _check_moe_args(router: object, experts: object, dense_backward: object, fn: str) -> list:
    if not isinstance(router, TopKRouter):
        raise TypeError(f"{fn}: `router` must be a softtopk.nn.TopKRouter, got {type(router).__name__}")
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
        raise TypeError(f"{fn}: `experts` must be a sequence of nn.Module (or an nn.ModuleList), got one module")
    if not isinstance(experts, (Sequence, nn.ModuleList)):
        raise TypeError(f"{fn}: `experts` must be a sequence of nn.Module, got {type(experts).__name__}")
    experts = list(experts)
    bad = [type(e).__name__ for e in experts if not isinstance(e, nn.Module)]
    if bad:
        raise TypeError(f"{fn}: `experts` must hold nn.Module instances, got {bad[0]}")
    if len(experts) != router.n_experts:
        raise ValueError(f"{fn}: `experts` must hold router.n_experts = {router.n_experts} modules, got {len(experts)}")
    check_bool(dense_backward, "dense_backward", fn=fn)
    return experts


class MixtureOfExperts(nn.Module):
    r"""A mixture-of-experts layer: each token goes to the k experts its router selects, and the layer returns the
    combine-weighted sum of their outputs.

    With :math:`w \in \mathbb{R}^{T \times E}` the router's dense weights (``routing.dense``: the combine weights at
    each token's k selected experts, 0 elsewhere and at slots dropped by the capacity) and :math:`f_e` the experts,

    .. math:: y_t = \sum_{e:\ \mathrm{map}_{te}} w_{te}\, f_e(x_t),

    computed by dispatch: each expert runs only on its tokens (gathered by index), and its weighted outputs are
    added back with ``index_add``. A token every one of whose slots was dropped by the capacity gets 0 (add a
    residual around the layer). The router's soft top-k (Sander et al. 2023, "Fast, differentiable and sparse
    top-k: a convex analysis perspective", ICML) makes the weights differentiable with respect to the gate; with
    ``method="hard"`` this is the standard top-k softmax gate (Shazeer et al. 2017; GShard, Lepikhin et al. 2021;
    Switch, Fedus et al. 2022).

    **Straight-through and the experts not run.** With ``TopKRouter(..., straight_through=True)`` the forward uses
    the hard mask and the backward the sigmoid mask's gradient. That gradient has a term at every expert, but at an
    expert e not selected it is :math:`\partial L / \partial w_{te} = \langle \partial L / \partial y_t,
    f_e(x_t)\rangle`, which needs :math:`f_e(x_t)`, never computed by a layer running only the selected experts:
    the gradient is silently truncated. The two correct options:

    - ``dense_backward=False`` (default): only the selected experts run; the gate's gradient is that of the
      selected-only formula :math:`y_t = \sum_{j \le k} w_{tj} f_{i_{tj}}(x_t)`, reaching the gate through the
      selected experts' weights (their scores, and the mask's threshold that couples all logits).
    - ``dense_backward=True``: every expert runs on every token and the combine uses ``routing.surrogate``, whose
      values are ``routing.dense``'s (0 off the selection: the output is the same, bit for bit when an expert's
      output row does not depend on the batch it runs in; a GEMM may round a row differently at another batch
      size, a difference of an ulp) and whose gradient is the dense
      surrogate's, :math:`\tilde w = m \odot s / \sum_e m_e s_e` over all E experts; the gate then gets the full
      straight-through gradient. It costs E/k times the expert compute. With a soft method (no straight-through) it
      gives the gradient of the full soft mask, the mass ``outside`` the k experts included; with ``"hard"`` it is
      the selected-only gradient again. It applies only while autograd records (``torch.is_grad_enabled()``):
      under ``torch.no_grad()`` the layer dispatches, with the same output.

    In ``eval()`` the router decides (by default the exact top-k, ``hard_in_eval=True``).

    The last :class:`Routing` is kept as ``moe.routing`` (its tensors hold the graph until the next call), so that
    the load-balancing loss is at hand: ``loss = task_loss + 1e-2 * moe.routing.aux_loss``; ``forward(tokens,
    return_routing=True)`` returns ``(output, routing)`` instead.

    Args:
        router: a :class:`TopKRouter` with ``n_experts`` = ``len(experts)``.
        experts: E modules, each mapping (n, d_model) to (n, d_out), the same d_out for all.
        dense_backward: run every expert on every token and combine with ``routing.surrogate`` (see above).

    Shapes: tokens (..., d_model) → output (..., d_out).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from softtopk.nn import MixtureOfExperts, TopKRouter
        >>> _ = torch.manual_seed(0)
        >>> router = TopKRouter(4, 3, 2, method="sigmoid", straight_through=True)
        >>> moe = MixtureOfExperts(router, [nn.Linear(4, 5) for _ in range(3)], dense_backward=True)
        >>> moe
        MixtureOfExperts(
          n_experts=3, k=2, dense_backward=True
          (router): TopKRouter(
            d_model=4, n_experts=3, k=2, method='sigmoid', load_balance='aux', hard_in_eval=True, straight_through=True
            (gate): Linear(in_features=4, out_features=3, bias=False)
          )
          (experts): ModuleList(
            (0-2): 3 x Linear(in_features=4, out_features=5, bias=True)
          )
        )
        >>> tokens = torch.randn(2, 6, 4)
        >>> out = moe(tokens)
        >>> out.shape, moe.routing.indices.shape
        (torch.Size([2, 6, 5]), torch.Size([12, 2]))
        >>> sparse = MixtureOfExperts(router, moe.experts)  # the same weights, only the selected experts run
        >>> torch.equal(sparse(tokens), out)
        True
        >>> (out.square().mean() + 1e-2 * moe.routing.aux_loss).backward()
    """

    routing: Union[Routing, None]  # the Routing of the last forward (None before the first)

    def __init__(
        self,
        router: TopKRouter,
        experts: Union[Sequence[nn.Module], nn.ModuleList],
        *,
        dense_backward: bool = False,
    ):
        super().__init__()
        experts = _check_moe_args(router, experts, dense_backward, "MixtureOfExperts")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.dense_backward: bool = dense_backward
        self.routing = None

    def forward(self, tokens: Tensor, *, return_routing: bool = False) -> Union[Tensor, tuple[Tensor, Routing]]:
        routing = self.router(tokens)  # validates tokens (..., d_model)
        flat = tokens.reshape(-1, tokens.shape[-1])
        if self.dense_backward and torch.is_grad_enabled():
            out = self._dense(flat, routing.surrogate)
        else:
            out = self._dispatch(flat, routing)
        out = out.reshape(*tokens.shape[:-1], out.shape[-1])
        self.routing = routing
        return (out, routing) if return_routing else out

    def _dispatch(self, flat: Tensor, routing: Routing) -> Tensor:
        """Each expert on its own tokens; the weighted outputs added back in expert order."""
        pairs = routing.routing_map.t().nonzero()  # (slots, 2): (expert, token), by expert then token
        tokens_of = pairs[:, 1].split(routing.routing_map.sum(0).tolist())
        out = None
        for e, (expert, idx) in enumerate(zip(self.experts, tokens_of)):
            if idx.numel() == 0:
                continue
            y = expert(flat[idx]) * routing.dense[idx, e].unsqueeze(-1)
            out = (y.new_zeros(flat.shape[0], y.shape[-1]) if out is None else out).index_add(0, idx, y)
        if out is None:  # no token routed anywhere: the output size from an empty batch
            y = self.experts[0](flat[:0]) * routing.dense[:0, :1]
            out = y.new_zeros(flat.shape[0], y.shape[-1])
        return out

    def _dense(self, flat: Tensor, weights: Tensor) -> Tensor:
        """Every expert on every token, combined with the (T, E) ``weights``, added in expert order (so that the
        values equal the dispatch's exactly: the terms off the selection are zeros)."""
        out: Union[Tensor, None] = None
        for e, expert in enumerate(self.experts):
            y = expert(flat) * weights[:, e : e + 1]
            out = y if out is None else out + y
        assert out is not None  # a router has at least one expert
        return out

    def extra_repr(self) -> str:
        return f"n_experts={self.router.n_experts}, k={self.router.k}, dense_backward={self.dense_backward}"
