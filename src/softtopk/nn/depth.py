"""The mixture-of-depths router ``DepthRouter`` and its result ``DepthRouting``."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._prepare import check_bool, check_finite
from ..masks import threshold_mask, topk
from ._checks import check_mask_args, check_positive_int, check_real

__all__ = ["DepthRouter", "DepthRouting"]


class DepthRouting(NamedTuple):
    """The result of :class:`DepthRouter` for tokens of shape (B, S, d_model); k is the number of slots per sequence.

    - ``indices`` (B, k) long: the positions of the tokens the block processes, in **sequence order** (increasing);
      ``mode="topk"``: k = ⌈capacity · S⌉ exactly; ``mode="threshold"`` or ``causal=True``: k = the largest count
      of the batch, shorter sequences padded (see ``valid``);
    - ``weights`` (B, k): the weights r_i of the block's output at those positions, x_i + r_i f(x_i) (0 at a
      padding slot); differentiable with respect to the router;
    - ``valid`` (B, k) bool: True at a selected token, False at a padding slot (all True in ``"topk"`` mode);
    - ``mask`` (B, S) bool: the selection, True where a token is processed;
    - ``fraction``: the fraction of the B · S tokens processed (a detached scalar);
    - ``aux_loss``: the causal predictor's binary cross-entropy (``causal="router"`` or ``"predictor"``), 0 without;
    - ``budget_loss``: ``mode="threshold"``: (mean soft mask − capacity)², which holds the average compute at
      ``capacity``; 0 in ``"topk"`` mode.
    """

    indices: Tensor
    weights: Tensor
    valid: Tensor
    mask: Tensor
    fraction: Tensor
    aux_loss: Tensor
    budget_loss: Tensor


_MODES = ("topk", "threshold")
_SCORES = (None, "sigmoid", "logit")
_CAUSAL = (None, "router", "predictor")


def _check_depth_args(mode: Any, score: Any, causal: Any, method: Any, fn: str) -> None:
    for name, value, choices in (("mode", mode, _MODES), ("score", score, _SCORES), ("causal", causal, _CAUSAL)):
        if value not in choices:
            raise ValueError(f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if mode == "threshold" and method not in ("sigmoid", "hard"):
        raise ValueError(f"{fn}: mode='threshold' takes `method` 'sigmoid' or 'hard' got {method!r}")
    if mode == "threshold" and causal is not None:
        raise ValueError(
            f"{fn}: `causal`={causal!r} is for mode='topk' only: the threshold selection σ(r_i) > threshold is made "
            "token by token, so it is causal already"
        )
    if method == "hard" and score is None:
        raise ValueError(
            f"{fn}: method='hard' with score=None gives weights 1 and no gradient to the router; pass "
            "score='logit' (the paper's r_i) or 'sigmoid', or a soft method"
        )


def _sequence_order(indices: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``indices`` sorted increasingly along the last dim, ``others`` permuted alike."""
    indices, order = torch.sort(indices, dim=-1)
    return (indices, *(o.gather(-1, order) for o in others))


def _padded_selection(selected: Tensor, priority: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, valid), both (B, k) with k the largest count of ``selected`` (B, S): the selected positions of each
    row, padded with its unselected positions of largest ``priority``; in sequence order."""
    width = int(selected.sum(-1).max()) if selected.numel() else 0
    by_priority = torch.sort(priority.detach(), dim=-1, descending=True, stable=True).indices
    first = torch.sort(selected.gather(-1, by_priority).to(torch.uint8), dim=-1, descending=True, stable=True)
    indices = by_priority.gather(-1, first.indices[..., :width])  # the selected ones first, then by priority
    ordered, valid = _sequence_order(indices, selected.gather(-1, indices))
    return ordered, valid


class DepthRouter(nn.Module):
    r"""A mixture-of-depths router: which tokens of each sequence a block processes (the others skip it).

    Raposo et al. 2024, "Mixture-of-Depths: dynamically allocating compute in transformer-based language models":
    a linear router (``router.router``, ``nn.Linear(d_model, 1)``) gives each token x_i (tokens of shape
    (B, S, d_model)) a score r_i; the block f runs on the selected tokens only and the layer outputs
    :math:`x_i + w_i f(x_i)` there and :math:`x_i` elsewhere (:meth:`route` does this). The weight w_i is what lets
    the gradient reach the router: :math:`w_i = m_i\, s_i`, m the selection's soft mask and s the ``score``
    (None: 1; ``"sigmoid"``: σ(r_i); ``"logit"``: r_i, the paper's choice with a hard top-k).

    - ``mode="topk"`` (the paper): each sequence selects its k = ⌈capacity · S⌉ tokens of largest score (``indices``
      exactly ``torch.topk`` of the scores, then put in sequence order), and m = ``softtopk.topk(r, k,
      method=method, temperature=temperature).weights``, the soft top-k mask over the sequence (the problem it
      solves is :func:`softtopk.topk_mask`'s; it tends to the hard 0/1 mask as the temperature → 0). The compute
      is fixed: every sequence runs the block on k tokens, batched.
    - ``mode="threshold"`` (MoDification, Zhang et al. 2024, threshold-p): the tokens with σ(r_i) > ``threshold``,
      m = ``softtopk.threshold_mask(r, threshold, temperature=temperature, normalize="sigmoid")``, which tends to
      the hard mask 1[σ(r_i) > threshold] as the temperature → 0 (here the temperature is in units of σ(r), not of
      r: 0.1–0.3 is a soft but selective mask, the default 1.0 a very flat one); the count adapts to each
      sequence. Here ``capacity`` is the **target** fraction: ``budget_loss`` = (mean m − capacity)²
      (add it, times a coefficient, to the training loss), else the router would learn to process every token.
      Variable counts are handled by **padding** to the batch's largest count: the padding slots hold the
      sequence's best unselected tokens with weight 0 and ``valid`` False, so they change no output but do pass
      through the block (pass ``valid`` to a block that mixes tokens, as a key padding mask, with
      ``route(..., pass_valid=True)``); the saving is that of the batch's largest count.

    **Causal inference.** The top-k over the sequence is not causal: whether token i is selected depends on the
    later tokens, so it cannot be decided when decoding token i. As the paper proposes, ``causal`` trains a
    causal stand-in for the top-k selection with a binary cross-entropy ``aux_loss`` whose target is the top-k
    membership (detached): ``causal="router"``: the router's own σ(r_i) (the auxiliary-loss method; it also
    shapes the router), ``causal="predictor"``: a small MLP ``router.predictor`` on the **detached** tokens (the
    auxiliary-predictor method; it does not affect the router). ``forward(tokens, causal=True)`` then selects the
    tokens whose stand-in exceeds 1/2, token by token (counts vary: padded as in threshold mode), with weights
    w_i = s_i (the hard mask times the score). Add ``aux_loss`` to the training loss.

    In ``eval()`` with ``hard_in_eval=True`` (default) m is the exact 0/1 mask (weights w_i = s_i on the same
    selection, which is always exact); with False the soft mask is kept, as in training.

    Args:
        d_model: the token size, a positive int.
        capacity: ``"topk"``: the fraction of each sequence processed, in (0, 1]; ``"threshold"``: the target
            fraction of ``budget_loss``.
        method: ``"topk"``: a method of :func:`softtopk.topk_mask` (default ``"sigmoid"``); ``"threshold"``:
            ``"sigmoid"`` or ``"hard"``. ``"hard"`` needs a ``score`` (else no gradient reaches the router).
        temperature: T > 0 of the soft mask (None: 1.0); ``"topk"``: in the units of the router scores r;
            ``"threshold"``: in the units of σ(r).
        mode: ``"topk"`` or ``"threshold"``.
        threshold: p of ``mode="threshold"``, in (0, 1) (default 0.5: the tokens with r_i > 0).
        score: None, ``"sigmoid"`` or ``"logit"``: s_i in the weights.
        causal: None, ``"router"`` or ``"predictor"`` (``mode="topk"`` only).
        predictor_hidden: the hidden size of ``causal="predictor"``'s MLP.
        hard_in_eval: the exact mask in ``eval()``.
        **options: the method's options, as :func:`softtopk.topk_mask` (``straight_through`` included).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from softtopk.nn import DepthRouter
        >>> router = DepthRouter(2, capacity=0.5, temperature=0.5)
        >>> with torch.no_grad():
        ...     _ = router.router.weight.copy_(torch.tensor([[1.0, 0.0]]))
        ...     _ = router.router.bias.zero_()
        >>> tokens = torch.tensor([[[0.5, 0.0], [2.0, 1.0], [-1.0, 0.0], [1.0, 3.0]]])  # scores 0.5, 2, -1, 1
        >>> r = router(tokens)
        >>> r.indices, r.mask, r.fraction
        (tensor([[1, 3]]), tensor([[False,  True, False,  True]]), tensor(0.5000))
        >>> r.weights.detach()
        tensor([[1.0000, 0.8808]])
        >>> out = router.route(nn.Linear(2, 2), tokens)  # the block runs on the 2 selected tokens only
        >>> out.shape
        torch.Size([1, 4, 2])
    """

    def __init__(
        self,
        d_model: int,
        capacity: float = 0.5,
        *,
        method: str = "sigmoid",
        temperature: Union[float, Tensor, None] = None,
        mode: str = "topk",
        threshold: float = 0.5,
        score: Union[str, None] = None,
        causal: Union[str, None] = None,
        predictor_hidden: int = 32,
        hard_in_eval: bool = True,
        **options,
    ):
        super().__init__()
        fn = "DepthRouter"
        self.d_model = check_positive_int(d_model, "d_model", fn)
        self.capacity = _check_capacity(capacity, fn)
        self.threshold = check_real(threshold, "threshold", fn, 0.0, 1.0, closed_low=False)
        _check_depth_args(mode, score, causal, method, fn)
        if mode == "threshold" and set(options) - {"straight_through"}:
            raise TypeError(
                f"{fn}: mode='threshold' takes no option but `straight_through`, got {', '.join(map(repr, options))}"
            )
        check_mask_args(method, temperature, None, options, 1, fn)
        self.hard_in_eval: bool = check_bool(hard_in_eval, "hard_in_eval", fn=fn)
        self.predictor_hidden = check_positive_int(predictor_hidden, "predictor_hidden", fn)
        self.method, self.temperature, self.mode, self.score, self.causal = method, temperature, mode, score, causal
        self.options: dict = options
        self.router = nn.Linear(self.d_model, 1)
        self.predictor: Union[nn.Module, None] = None
        if causal == "predictor":
            hidden = self.predictor_hidden
            self.predictor = nn.Sequential(nn.Linear(self.d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def capacity_k(self, seq_len: int) -> int:
        """k = ⌈capacity · seq_len⌉ of ``mode="topk"`` (the product rounded to 9 digits first, so 0.3 · 10 → 3)."""
        return min(seq_len, math.ceil(round(self.capacity * seq_len, 9)))

    def scores(self, tokens: Tensor) -> Tensor:
        """The router scores r (B, S) of tokens (B, S, d_model)."""
        check_finite(tokens, "tokens", fn="DepthRouter")
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_model:
            raise ValueError(
                f"DepthRouter: `tokens` must have shape (batch, seq_len, d_model) = (B, S, {self.d_model}), got "
                f"{tuple(tokens.shape)}"
            )
        w, b = self.router.weight.to(tokens.dtype), self.router.bias.to(tokens.dtype)
        return F.linear(tokens, w, b).squeeze(-1)

    def forward(self, tokens: Tensor, *, causal: bool = False) -> DepthRouting:
        """Route ``tokens`` (B, S, d_model); ``causal=True`` selects with the trained causal stand-in (decoding)."""
        check_bool(causal, "causal", fn="DepthRouter")
        if causal and self.causal is None:
            raise ValueError("DepthRouter: `causal`=True needs a router built with causal='router' or 'predictor'")
        r = self.scores(tokens)
        hard = self.hard_in_eval and not self.training
        if self.mode == "threshold":
            return self._threshold(r, hard)
        k = self.capacity_k(r.shape[-1])
        if hard or self.method == "hard":
            res = topk(r, k, method="hard")
        else:
            res = topk(r, k, method=self.method, temperature=self.temperature, **self.options)
        target = torch.zeros_like(r).scatter(-1, res.indices, 1.0)
        aux = self._aux_loss(tokens, r, target)
        if causal:
            selected = self._causal_logits(tokens, r) > 0
            indices, valid = _padded_selection(selected, r)
            weights = self._score(r.gather(-1, indices)) * valid.to(r.dtype)
            return DepthRouting(indices, weights, valid, selected, _fraction(selected, r.dtype), aux, r.new_zeros(()))
        indices, weights = _sequence_order(res.indices, res.weights * self._score(r.gather(-1, res.indices)))
        valid = torch.ones_like(indices, dtype=torch.bool)
        return DepthRouting(indices, weights, valid, target > 0, _fraction(target, r.dtype), aux, r.new_zeros(()))

    def _score(self, r: Tensor) -> Tensor:
        if self.score == "sigmoid":
            return torch.sigmoid(r)
        return r if self.score == "logit" else torch.ones_like(r)

    def _causal_logits(self, tokens: Tensor, r: Tensor) -> Tensor:
        """The causal stand-in's logits (B, S): r itself, or the predictor on the detached tokens."""
        if self.predictor is None:
            return r
        dtype = next(self.predictor.parameters()).dtype
        return self.predictor(tokens.detach().to(dtype)).squeeze(-1).to(r.dtype)

    def _aux_loss(self, tokens: Tensor, r: Tensor, target: Tensor) -> Tensor:
        if self.causal is None or r.numel() == 0:
            return r.new_zeros(())
        return F.binary_cross_entropy_with_logits(self._causal_logits(tokens, r), target.detach())

    def _threshold(self, r: Tensor, hard: bool) -> DepthRouting:
        method = "hard" if hard else self.method
        kw = {} if method == "hard" else {"temperature": self.temperature, **self.options}
        soft = threshold_mask(r, self.threshold, normalize="sigmoid", method=method, **kw)
        selected = torch.sigmoid(r.detach()) > self.threshold  # threshold_mask's hard selection, σ(r_i) > p
        indices, valid = _padded_selection(selected, r)
        weights = (soft.gather(-1, indices) * self._score(r.gather(-1, indices))) * valid.to(r.dtype)
        budget = (soft.mean() - self.capacity) ** 2 if r.numel() else r.new_zeros(())
        return DepthRouting(indices, weights, valid, selected, _fraction(selected, r.dtype), r.new_zeros(()), budget)

    def route(
        self,
        block: Callable[..., Tensor],
        tokens: Tensor,
        routing: Union[DepthRouting, None] = None,
        *,
        causal: bool = False,
        pass_valid: bool = False,
    ) -> Tensor:
        """Apply ``block`` to the selected tokens only: gather → block → weighted scatter-add.

        Returns ``tokens`` (B, S, d) with :math:`x_i + w_i f(x_i)` at the selected positions, f = ``block`` run on
        the gathered (B, k, d) tokens (in sequence order, so a causal attention mask over the k slots is causal
        over the sequence), and :math:`x_i` elsewhere. ``block`` is the residual branch f: it must not add its
        input itself. ``routing``: a :class:`DepthRouting` of these tokens (default: ``self(tokens, causal=causal)``);
        ``pass_valid``: call ``block(h, valid)``, ``valid`` (B, k) bool marking the padding slots False.
        """
        r = self(tokens, causal=causal) if routing is None else routing
        index = r.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        h = tokens.gather(1, index)
        delta = block(h, r.valid) if pass_valid else block(h)
        return tokens.scatter_add(1, index, delta * r.weights.unsqueeze(-1).to(delta.dtype))

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}", f"capacity={self.capacity}", f"mode={self.mode!r}"]
        parts.append(f"method={self.method!r}")
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        if self.mode == "threshold":
            parts.append(f"threshold={self.threshold}")
        parts += [f"score={self.score!r}", f"causal={self.causal!r}", f"hard_in_eval={self.hard_in_eval}"]
        parts += [f"{key}={val!r}" for key, val in self.options.items()]
        return ", ".join(parts)


def _fraction(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return mask.detach().to(dtype).mean() if mask.numel() else torch.zeros((), dtype=dtype, device=mask.device)


def _check_capacity(capacity: Any, fn: str) -> float:
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real):
        raise TypeError(f"{fn}: `capacity` must be a number, got {type(capacity).__name__}")
    if not 0 < float(capacity) <= 1:
        raise ValueError(f"{fn}: `capacity` must lie in (0, 1], got {capacity}")
    return float(capacity)
