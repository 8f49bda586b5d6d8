"""Beam search with a relaxed top-k (Xie et al. 2020, section 5.3; BT-Cell, Ray Chowdhury & Caragea 2023):
``soft_beam_search`` and its result ``Beams``."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor

from .._prepare import check_bool, check_temperature, reject_unused
from .._registry import lookup, parse
from ..masks import topk_mask
from ..permutations import topk_permutation
from ._checks import check_mask_args, check_positive_int

__all__ = ["BEAM_METHODS", "Beams", "soft_beam_search"]

#: The methods of :func:`soft_beam_search`: the three of :func:`softtopk.topk_permutation` (a soft permutation Γ
#: replaces the selection), BT-Cell's hard top-k with soft weights, and plain beam search.
BEAM_METHODS: tuple[str, ...] = ("sinkhorn", "bitonic", "odd_even", "hard_soft_weights", "hard")
_PERMUTATION = ("sinkhorn", "bitonic", "odd_even")
#: Non-finite candidate scores entering a soft permutation are replaced by the row's lowest finite one minus this
#: many temperatures (so that they take no weight and no gradient).
_FLOOR = 30.0

State = Union[Tensor, tuple[Tensor, ...]]
Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


class Beams(NamedTuple):
    """The result of :func:`soft_beam_search` for B inputs, beam size K, L steps run and V tokens.

    - ``sequences`` (B, K, L) long: the K hypotheses of each input (``bos`` not included), best first; after its
      ``eos`` a finished hypothesis is padded with ``eos``;
    - ``scores`` (B, K): the hypotheses' scores, the sums of their tokens' log-probabilities up to and including
      ``eos`` (``"hard"``, ``"hard_soft_weights"``; differentiable whenever gradients are enabled) or their soft
      sorted values Γ·c (the permutation methods in training, differentiable with respect to the M candidates Γ
      sees at each step);
    - ``weights`` (B, K): ``softmax(scores)`` over the beam, the beam's renormalised distribution over its
      hypotheses (BT-Cell's weights: an expected loss Σ_j w_j loss_j, or a mixture Σ_j w_j h_j, carries the
      gradient to the scores);
    - ``finished`` (B, K) bool: the hypotheses that emitted ``eos``;
    - ``soft_tokens`` (B, K, L, V) or None: with ``soft_tokens=True``, the tokens of each hypothesis as
      distributions over the vocabulary: the Γ-mixtures of the candidates' tokens and histories (permutation
      methods in training), one-hot vectors otherwise (carrying the straight-through gradient of
      ``"hard_soft_weights"`` in training);
    - ``state``: the decoder state after the last step (leading dim B·K), Γ-mixed as the hypotheses were.
    """

    sequences: Tensor
    scores: Tensor
    weights: Tensor
    finished: Tensor
    soft_tokens: Union[Tensor, None]
    state: Any


@dataclass(frozen=True)
class _Config:
    beam: int
    max_len: int
    bos: int
    eos: Union[int, None]
    method: str
    temperature: Union[float, Tensor]
    candidates: Union[int, None]
    soft_tokens: bool
    options: dict
    mask_method: str


class _Selection(NamedTuple):
    """One step's selection: the hard parents and tokens (B, K) that define the hypotheses, their scores, and for
    the permutation methods the parent mixing matrix A (B, K, K) and the token distributions D (B, K, V) of Γ; for
    ``"hard_soft_weights"`` the straight-through factor (B, K), exactly 1 in the forward."""

    parents: Tensor
    tokens: Tensor
    scores: Tensor
    mix: Union[Tensor, None] = None
    token_dist: Union[Tensor, None] = None
    factor: Union[Tensor, None] = None


def _token(value: Any, name: str, fn: str, *, optional: bool = False) -> Union[int, None]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an int (a token id), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{fn}: `{name}` must be a token id ≥ 0, got {value}")
    return int(value)


def _check_options(method: str, temperature: Any, candidates: Any, options: dict, beam: int, fn: str) -> tuple:
    """(temperature, candidates, options, mask_method) of a method, validated."""
    if method == "hard":
        reject_unused(fn, "method='hard'", temperature=temperature, candidates=candidates, **options)
        return 1.0, None, {}, "hard"
    if method == "sinkhorn":
        reject_unused(fn, "method='sinkhorn' (smoothed by its option `epsilon`)", temperature=temperature)
    elif temperature is not None:
        check_temperature(temperature, fn=fn)
    temperature = 1.0 if temperature is None else temperature
    if method == "hard_soft_weights":
        reject_unused(fn, "method='hard_soft_weights'", candidates=candidates)
        options = dict(options)
        mask_method = options.pop("mask_method", "sigmoid")
        check_mask_args(mask_method, temperature, None, options, beam, fn)
        return temperature, None, options, mask_method
    spec = lookup("permutation", method, options, fn=fn)
    parse(spec, options, fn=fn)
    if candidates is not None and check_positive_int(candidates, "candidates", fn) < beam:
        raise ValueError(f"{fn}: `candidates` must be at least beam_size={beam}, got {candidates}")
    return temperature, candidates, dict(options), method


def _check_args(beam_size, max_len, bos, eos, method, temperature, candidates, soft_tokens, options) -> _Config:
    fn = "soft_beam_search"
    beam = check_positive_int(beam_size, "beam_size", fn)
    max_len = check_positive_int(max_len, "max_len", fn)
    bos, eos = _token(bos, "bos", fn), _token(eos, "eos", fn, optional=True)
    if not isinstance(method, str):
        raise TypeError(f"{fn}: `method` must be a string, got {type(method).__name__}")
    if method not in BEAM_METHODS:
        raise ValueError(f"{fn}: unknown `method`={method!r}; choose one of {', '.join(map(repr, BEAM_METHODS))}")
    check_bool(soft_tokens, "soft_tokens", fn=fn)
    t, candidates, options, mask_method = _check_options(method, temperature, candidates, options, beam, fn)
    return _Config(beam, max_len, bos, eos, method, t, candidates, soft_tokens, options, mask_method)


def _map(state: Any, f: Callable[[Tensor], Tensor]) -> Any:
    """``f`` on the state's tensor, or on each tensor of a tuple (other entries kept)."""
    if isinstance(state, Tensor):
        return f(state)
    return tuple(f(s) if isinstance(s, Tensor) else s for s in state)


def _check_state(state: Any, fn: str) -> int:
    tensors = [state] if isinstance(state, Tensor) else list(state) if isinstance(state, tuple) else None
    if not tensors or not all(isinstance(s, Tensor) and s.dim() >= 1 for s in tensors):
        raise TypeError(f"{fn}: `state` must be a tensor or a tuple of tensors, each of shape (B, ...)")
    batch = {s.shape[0] for s in tensors}
    if len(batch) != 1:
        raise ValueError(f"{fn}: the tensors of `state` must share their leading dim B, got sizes {sorted(batch)}")
    return batch.pop()


def _device(state: Any) -> torch.device:
    return (state if isinstance(state, Tensor) else state[0]).device


def _check_log_probs(log_probs: Any, rows: int, cfg: _Config, first: bool) -> int:
    fn = "soft_beam_search"
    if not isinstance(log_probs, Tensor) or not log_probs.dtype.is_floating_point:
        raise TypeError(f"{fn}: `step` must return (log_probs, state) with log_probs a floating tensor")
    if log_probs.dim() != 2 or log_probs.shape[0] != rows:
        raise ValueError(
            f"{fn}: `step` must return log_probs of shape (B·beam_size, V) = ({rows}, V), got {tuple(log_probs.shape)}"
        )
    if bool((torch.isnan(log_probs) | (log_probs == math.inf)).any()):
        raise ValueError(f"{fn}: `step` returned log_probs with NaN or +inf entries")
    vocab = log_probs.shape[1]
    if first:
        if cfg.eos is not None and cfg.eos >= vocab:
            raise ValueError(f"{fn}: `eos`={cfg.eos} is not a token of the V={vocab} that `step` scores")
        if cfg.beam > vocab:
            raise ValueError(f"{fn}: `beam_size`={cfg.beam} exceeds the vocabulary size V={vocab}")
    return vocab


def _candidates(scores: Tensor, log_probs: Tensor, finished: Tensor, eos: Union[int, None], first: bool) -> Tensor:
    """The candidate scores (B, n): at the first step the V tokens after ``bos`` (the K hypotheses are equal); then
    score + log-prob over beam × vocabulary, a finished hypothesis continuing only with ``eos`` at its own score."""
    if first:
        return log_probs[:, 0]
    cand = scores.unsqueeze(-1) + log_probs
    if eos is not None:
        only_eos = torch.full_like(cand, -math.inf).index_fill(-1, torch.tensor([eos], device=cand.device), 0.0)
        cand = torch.where(finished.unsqueeze(-1), scores.unsqueeze(-1) + only_eos, cand)
    return cand.flatten(1)


def _hard(cand: Tensor, vocab: int, cfg: _Config, training: bool) -> _Selection:
    values, idx = torch.topk(cand, cfg.beam, dim=-1)
    sel = _Selection(idx // vocab, idx % vocab, values)
    if cfg.method != "hard_soft_weights" or not training:
        return sel
    # BT-Cell / straight-through: the selection's soft top-k weights m at the chosen candidates; 1 + (m − m̄)
    # (m̄ = m detached) is exactly 1 in the forward, and its gradient is the soft mask's, w.r.t. every candidate
    finite = torch.isfinite(cand)
    low = torch.where(finite, cand, math.inf).amin(-1, keepdim=True).detach()
    safe = torch.where(finite, cand, low - _FLOOR * _value(cfg.temperature))
    m = topk_mask(safe, cfg.beam, method=cfg.mask_method, temperature=cfg.temperature, **cfg.options).gather(-1, idx)
    return sel._replace(factor=1.0 + (m - m.detach()))


def _value(t: Union[float, Tensor]) -> float:
    return float(t.detach().max()) if isinstance(t, Tensor) else float(t)


def _permutation(cand: Tensor, vocab: int, cfg: _Config) -> _Selection:
    """SOFT / sorting networks: Γ (B, K, M) over the M best candidates replaces the hard selection."""
    k, n = cfg.beam, cand.shape[-1]
    m = min(n, cfg.candidates or min(2 * k, vocab + k - 1))
    values, idx = torch.topk(cand, m, dim=-1)
    finite = torch.isfinite(values)
    low = torch.where(finite, values, math.inf).amin(-1, keepdim=True).detach()
    if cfg.method == "sinkhorn":  # min-max onto SOFT's anchors: the best candidate at k, the M-th at 0 (detached)
        spread = (values[:, :1].detach() - low).clamp_min(torch.finfo(values.dtype).tiny)
        x = torch.where(finite, k * (values - low) / spread, -1.0)
        gamma = topk_permutation(x, k, method="sinkhorn", **cfg.options)
    else:  # in units of the temperature (the networks are shift-invariant)
        t = cfg.temperature
        t = t.unsqueeze(-1) if isinstance(t, Tensor) and t.dim() else t
        z = torch.where(finite, values, low - _FLOOR * t) / t
        gamma = topk_permutation(z, k, method=cfg.method, temperature=1.0, **cfg.options)
    done = ~finite[:, k:].any(-1) if m > k else torch.zeros_like(finite[:, 0])
    if bool(done.any()):  # only k finite candidates (every hypothesis finished): the hard selection
        gamma = torch.where(done.view(-1, 1, 1), torch.eye(k, m, dtype=gamma.dtype, device=gamma.device), gamma)
    parents, tokens = idx // vocab, idx % vocab
    scores = (gamma @ torch.where(finite, values, low).unsqueeze(-1)).squeeze(-1)
    mix = cand.new_zeros(cand.shape[0], k, k).scatter_add_(-1, parents.unsqueeze(1).expand(-1, k, m), gamma)
    dist = cand.new_zeros(cand.shape[0], k, vocab).scatter_add_(-1, tokens.unsqueeze(1).expand(-1, k, m), gamma)
    return _Selection(parents[:, :k], tokens[:, :k], scores, mix, dist)


def _reorder(x: Tensor, sel: _Selection, k: int) -> Tensor:
    """One (B·K, ...) state tensor for the selected hypotheses: the hard parents' rows (times the straight-through
    factor), or the Γ-mixture of the parents (float tensors of the permutation methods)."""
    b = x.shape[0] // k
    if sel.mix is not None and x.dtype.is_floating_point:
        return torch.bmm(sel.mix.to(x.dtype), x.reshape(b, k, -1)).reshape(x.shape)
    rows = (sel.parents + k * torch.arange(b, device=x.device).unsqueeze(-1)).flatten()
    out = x.index_select(0, rows)
    if sel.factor is not None and x.dtype.is_floating_point:
        out = out * sel.factor.flatten().to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return out


def _soft_history(hist: Union[Tensor, None], sel: _Selection, vocab: int, dtype: torch.dtype) -> Tensor:
    """The (B, K, t + 1, V) token distributions of the selected hypotheses."""
    if sel.token_dist is not None:
        assert sel.mix is not None  # a soft selection has both
        new = sel.token_dist.unsqueeze(2)
        old = None if hist is None else torch.einsum("bji,bitv->bjtv", sel.mix.to(hist.dtype), hist)
    else:
        new = torch.nn.functional.one_hot(sel.tokens, vocab).to(dtype).unsqueeze(2)
        index = sel.parents.view(*sel.parents.shape, 1, 1)
        old = None if hist is None else hist.gather(1, index.expand(-1, -1, *hist.shape[2:]))
        if sel.factor is not None:
            new = new * sel.factor.view(*sel.factor.shape, 1, 1).to(dtype)
            old = None if old is None else old * sel.factor.view(*sel.factor.shape, 1, 1).to(dtype)
    return new if old is None else torch.cat([old, new.to(old.dtype)], dim=2)


def _search(step: Step, state: Any, cfg: _Config, training: bool) -> Beams:
    batch, k = _check_state(state, "soft_beam_search"), cfg.beam
    state = _map(state, lambda s: s.repeat_interleave(k, dim=0))
    inputs = torch.full((batch * k,), cfg.bos, dtype=torch.long, device=_device(state))  # the first step: bos ids
    scores = finished = hist = None
    seqs: list[Tensor] = []
    soft = training and cfg.method in _PERMUTATION
    for t in range(cfg.max_len):
        log_probs, new_state = step(inputs, state)
        vocab = _check_log_probs(log_probs, batch * k, cfg, t == 0)
        if t == 0:
            scores = log_probs.new_zeros(batch, k)
            finished = torch.zeros(batch, k, dtype=torch.bool, device=log_probs.device)
        assert scores is not None and finished is not None  # set at the first step
        cand = _candidates(scores, log_probs.view(batch, k, vocab), finished, cfg.eos, t == 0)
        sel = _permutation(cand, vocab, cfg) if soft else _hard(cand, vocab, cfg, training)
        state = _map(new_state, functools.partial(_reorder, sel=sel, k=k))
        scores = sel.scores
        seqs = [s.gather(1, sel.parents) for s in seqs] + [sel.tokens]
        finished = finished.gather(1, sel.parents)
        if cfg.eos is not None:
            finished = finished | (sel.tokens == cfg.eos)
        if cfg.soft_tokens:
            hist = _soft_history(hist, sel, vocab, log_probs.dtype)
            inputs = hist[:, :, -1].reshape(batch * k, vocab)
        else:
            inputs = sel.tokens.flatten()
        if cfg.eos is not None and bool(finished.all()):
            break
    sequences = torch.stack(seqs, dim=-1)
    assert scores is not None and finished is not None  # max_len >= 1
    return Beams(sequences, scores, torch.softmax(scores, dim=-1), finished, hist, state)


def soft_beam_search(
    step: Step,
    state: State,
    *,
    beam_size: int,
    max_len: int,
    bos: int,
    eos: Union[int, None] = None,
    method: str = "sinkhorn",
    temperature: Union[float, Tensor, None] = None,
    training: Union[bool, None] = None,
    candidates: Union[int, None] = None,
    soft_tokens: bool = False,
    **options,
) -> Beams:
    r"""Beam search for an autoregressive decoder whose top-k over beam × vocabulary is relaxed in training.

    Plain beam search keeps, at each step, the K = ``beam_size`` best of the candidates (hypothesis j, token v)
    scored :math:`c_{jv} = s_j + \log p(v \mid \text{hypothesis } j)`: a hard top-k, through which no gradient
    reaches the candidates that were not kept nor the choice itself. Here, in training, the top-k is relaxed:

    - ``"sinkhorn"`` (SOFT, Xie et al. 2020, section 5.3), ``"bitonic"``, ``"odd_even"`` (relaxed sorting networks,
      Petersen et al. 2021): Γ (K, M) = :func:`softtopk.topk_permutation` of the M best candidates (``candidates``,
      default min(2K, V + K − 1), every candidate that can matter) replaces the selection. Row j softly picks the
      (j + 1)-th best candidate: the new hypothesis j has the score :math:`\sum_m \Gamma_{jm} c_m`, the decoder
      state :math:`\sum_m \Gamma_{jm} h_{\mathrm{parent}(m)}` (float tensors; others follow the hard parent) and,
      with ``soft_tokens``, the token distribution :math:`\sum_m \Gamma_{jm} e_{\mathrm{token}(m)}` (fed to
      ``step``, and mixed with the parents' histories into ``soft_tokens``). The sorting networks see the
      candidate scores divided by ``temperature`` (log-probability units); ``"sinkhorn"`` sees them mapped
      linearly onto SOFT's anchors, the best at k and the M-th at 0 (the map detached), and its option
      ``epsilon`` (default 0.1, relative to the largest cost) is its smoothing: it takes no ``temperature``. The
      tokens of ``sequences`` are the hard top-k's, the limit of Γ as the temperature (ε) → 0. Cost: Γ per step,
      O(M log² M) comparators (bitonic) or Sinkhorn iterations on (K + 1) × M, plus the mixing, O(K²) per state
      entry.
    - ``"hard_soft_weights"`` (BT-Cell, Ray Chowdhury & Caragea 2023): the exact top-k selects, so the forward is
      plain beam search; the scores stay differentiable sums of log-probabilities and ``weights`` = softmax(scores)
      carries their gradient. In addition the states and ``soft_tokens`` of each kept candidate are multiplied by
      :math:`1 + m - \mathrm{sg}(m)` (exactly 1), m its soft top-k weight ``topk_mask(c, K, method=mask_method,
      temperature=temperature)`` (option ``mask_method``, default ``"sigmoid"``): a straight-through gradient of the
      selection with respect to every candidate.
    - ``"hard"``: plain beam search in training too.

    **Inference** (``training=False``; None: ``torch.is_grad_enabled()``, so under ``torch.no_grad()``) is plain
    beam search for every method, exactly: ``torch.topk`` over beam × vocabulary of the summed log-probabilities,
    the first step from ``bos`` over the V tokens. A hypothesis that emits ``eos`` is finished: it stays in the
    beam with its score (no length normalisation) and continues with ``eos`` only, and the search stops when all are
    finished or after ``max_len`` steps.

    Args:
        step: ``step(tokens, state) -> (log_probs, state)``: ``tokens`` the (B·K,) long ids of the last tokens
            (``bos`` at the first call) or, with ``soft_tokens`` after the first call, their (B·K, V) float
            distributions (one-hot in hard selections; ``tokens @ embedding.weight`` embeds both exactly);
            ``log_probs`` (B·K, V) normalised log-probabilities; the state as given, leading dim B·K.
        state: the initial decoder state, a tensor or a tuple of tensors with leading dim B (repeated K times).
        beam_size: K, an int in [1, V].
        max_len: the number of steps at most, a positive int.
        bos: the token id fed to the first step (it need not be one of the V tokens scored).
        eos: the id of the end token among the V, or None (no hypothesis finishes).
        method: one of :data:`BEAM_METHODS`.
        temperature: the temperature (default 1.0) of ``"bitonic"``, ``"odd_even"`` and ``"hard_soft_weights"``,
            in log-probability units: a number, or a tensor of shape (B,) (one per input).
        training: relax the top-k (None: when gradients are enabled).
        candidates: M, the candidates a permutation method sees (≥ K; more cost more).
        soft_tokens: feed ``step`` token distributions and return ``soft_tokens``.
        **options: the options of :func:`softtopk.topk_permutation` (``epsilon``, ``relaxation``, ...), or
            ``mask_method`` and the options of :func:`softtopk.topk_mask` for ``"hard_soft_weights"``.

    Returns:
        :class:`Beams` ``(sequences, scores, weights, finished, soft_tokens, state)``.

    Example:
        >>> import torch
        >>> from softtopk.nn import soft_beam_search
        >>> logits = torch.tensor([[0.0, 2.0, 1.0], [1.5, 0.0, 1.0], [0.5, 0.0, 0.0]], requires_grad=True)
        >>> step = lambda tokens, state: (logits.log_softmax(-1)[tokens], state)  # a bigram model; no state
        >>> with torch.no_grad():  # inference: plain beam search
        ...     beams = soft_beam_search(step, torch.zeros(1, 1), beam_size=2, max_len=3, bos=0, eos=2)
        >>> beams.sequences, beams.scores, beams.finished
        (tensor([[[2, 2, 2],
                 [1, 0, 1]]]), tensor([[-1.4076, -1.4193]]), tensor([[ True, False]]))
        >>> beams = soft_beam_search(step, torch.zeros(1, 1), beam_size=2, max_len=3, bos=0, eos=2,
        ...                          method="bitonic", temperature=0.5)  # training: soft sorted scores
        >>> beams.scores.detach()
        tensor([[-1.6157, -1.6643]])
        >>> beams.scores.sum().backward()
        >>> logits.grad  # every candidate of rows 0 and 1 gets a gradient, chosen or not
        tensor([[-0.4064,  0.0641,  0.3423],
                [ 0.5188, -0.2209, -0.2979],
                [ 0.0000,  0.0000,  0.0000]])
    """
    cfg = _check_args(beam_size, max_len, bos, eos, method, temperature, candidates, soft_tokens, options)
    if not callable(step):
        raise TypeError(f"soft_beam_search: `step` must be callable, got {type(step).__name__}")
    if training is None:
        training = torch.is_grad_enabled()
    check_bool(training, "training", fn="soft_beam_search")
    return _search(step, state, cfg, training)
