r"""Differentiable sorting networks: relaxed odd-even transposition and bitonic networks, top-k rows only.

Petersen et al. 2021, "Differentiable Sorting Networks for Scalable Sorting and Ranking Supervision" (ICML);
Petersen et al. 2022, "Monotonic Differentiable Sorting Networks" (ICLR); Petersen et al. 2022, "Differentiable
Top-k Classification Learning" (ICML).

**Definition.** A sorting network is a fixed sequence of m layers; a layer is a set of comparators on disjoint
pairs of wires. Here every comparator is an ordered pair (u, v): the larger value goes to wire u. With a, b the
values on u, v and t the temperature (1/steepness β), the relaxed comparator is

.. math::
    \alpha = f\!\left(\frac{b - a}{t}\right),\qquad u \leftarrow (1 - \alpha)\, a + \alpha\, b,\qquad
    v \leftarrow \alpha\, a + (1 - \alpha)\, b,

with f the logistic sigmoid :math:`1/(1 + e^{-z})` (``relaxation="logistic"``, Petersen et al. 2021) or the
Cauchy CDF :math:`\tfrac12 + \arctan(z)/\pi` (``"cauchy"``, the monotonic relaxation of Petersen et al. 2022). So
α is the soft probability that the comparator *swaps* its inputs: α → 1 when b > a (b moves up to u), α → 0 when
a > b, α = 1/2 on a tie. Layer l is the doubly stochastic matrix :math:`L_l`, the identity but for a symmetric
block :math:`\begin{pmatrix}1-\alpha & \alpha\\ \alpha & 1-\alpha\end{pmatrix}` on each comparator's wires, and
the network the relaxed permutation :math:`P = L_m \cdots L_1`: :math:`P x` are the values softly sorted in
decreasing order. The result is its first k rows,

.. math::
    \Gamma = E_k\, L_m \cdots L_1 \in \mathbb{R}^{k \times n},

row j softly indicating the (j + 1)-th largest entry: rows sum to 1, columns to at most 1 (P is doubly stochastic).
As t → 0 every α tends to the hard decision 1[b > a], P to the permutation matrix that sorts x (on distinct
values), and Γ to the rows of the hard top-k in order. The logistic α approaches it exponentially fast in
gap / t, the Cauchy α only like t / (π · gap).

**Networks** on n wires (positions 0, …, n − 1, top to bottom):

- ``"odd_even"`` (odd-even transposition): n layers; layer l compares (i, i + 1) for every i ≡ l (mod 2),
  the larger value to i. ⌊n/2⌋ or ⌊(n − 1)/2⌋ comparators a layer, C = n(n − 1)/2 in all.
- ``"bitonic"`` (Batcher): on N = 2^⌈log2 n⌉ wires, log2 N (log2 N + 1)/2 layers of N/2 comparators
  (C = N log2 N (log2 N + 1)/4): for stage s = 2, 4, …, N and, within it, distance j = s/2, …, 2, 1, one layer
  comparing wires i and i + j for every i with i & j = 0; the larger value goes to i when ⌊i/s⌋ is even and to
  i + j when it is odd (the last stage, s = N, sorts in decreasing order). When n is not a power of 2 the wires
  n, …, N − 1 carry −∞ sentinels: a comparator between a score and a sentinel is hard (the score goes to the
  larger side), one between two sentinels does nothing. The wires that hold pure sentinels then follow the hard
  network on a 0/1 input, which sorts it: no score ever mixes with a sentinel, the scores end on wires 0, …, n − 1
  and the sentinel columns of P, which are exactly zero on those rows, are dropped.

**Memory.** The forward pass runs the network on the values (n numbers a row) and keeps, per row, only the C
comparator input differences d = b − a (C numbers: the α are recomputed from them); Γ is then obtained by applying
the layers' transposes in reverse to the k rows of :math:`E_k` (:math:`B_m = E_k`,
:math:`B_{l-1} = B_l L_l`, :math:`B_0 = \Gamma`), O(kN) live, skipping the comparators outside the support of
:math:`B_l` (which starts at the wires [0, k) and grows layer by layer). The backward needs, for layer l,
:math:`B_l` (which it runs again from :math:`E_k`, m → 1) and :math:`H_l = G L_1 \cdots L_{l-1}`
(G = ∂loss/∂Γ), which runs the other way; the :math:`H_l` are recomputed from checkpoints every s = ⌈√(2m)⌉
layers (undoing a layer instead would divide by 1 − 2α, singular on ties). Training memory per row, besides Γ and
its gradient, is therefore exactly C numbers kept between forward and backward plus a backward workspace of at
most (⌈m/s⌉ + s/2 + 2) k N + 4N numbers (the checkpoints, one segment of :math:`H` differences at the
comparators, B and temporaries), ≈ (√(2m) + 2) k N: O(C + √m · k N), against m k N for an autograd graph of the
layers. For n = 1024, k = 10 in float32 that is 2.0 MiB + 1.9 MiB a row (odd-even; a graph: 40 MiB) and
0.11 MiB + 0.5 MiB (bitonic; a graph: 2.1 MiB). No autograd graph is recorded: time is O(k C) forward and about
four times that backward.

Example:
    >>> import torch, softtopk
    >>> x = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    >>> softtopk.topk_permutation(x, 2, method="odd_even", temperature=1e-3)
    tensor([[0., 0., 1., 0., 0.],
            [0., 0., 0., 0., 1.]])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["NETWORKS", "RELAXATIONS", "network_permutation"]

#: The sorting networks of :func:`softtopk.topk_permutation`.
NETWORKS = ("odd_even", "bitonic")
#: The relaxations f of the comparator: logistic (Petersen et al. 2021), Cauchy (monotonic, Petersen et al. 2022).
RELAXATIONS = ("logistic", "cauchy")


@dataclass(frozen=True)
class _Layer:
    """One layer: ``count`` blocks of 2·``dist`` wires from ``offset``; block c compares its wire (c, 0, i) with
    (c, 1, i), i < ``dist``. ``sign`` (count, 1) is −1 where the larger value goes to the second wire (None: all
    to the first); ``soft`` (count, dist) marks score-score comparators, the others take the swap probability
    ``hard`` (None: no sentinel). ``start`` is the layer's first column in the (R, C) buffer of differences."""

    offset: int
    count: int
    dist: int
    start: int
    sign: Tensor | None
    soft: Tensor | None
    hard: Tensor | None

    @property
    def size(self) -> int:
        return self.count * self.dist

    def pair(self, t: Tensor, count: int | None = None) -> tuple[Tensor, Tensor]:
        """Views of the first and second wires of the first ``count`` (default: all) comparator blocks, shape
        ``t.shape[:-1] + (count, dist)``."""
        count = self.count if count is None else count
        w = t.narrow(-1, self.offset, 2 * count * self.dist).unflatten(-1, (count, 2, self.dist))
        return w.select(-2, 0), w.select(-2, 1)

    def blocks_within(self, width: int) -> int:
        """The number of comparator blocks that touch a wire < ``width`` (blocks are in increasing wire order)."""
        return min(self.count, max(0, -(-(width - self.offset) // (2 * self.dist))))


@functools.lru_cache(maxsize=64)
def _network(network: str, n: int, device: torch.device, dtype: torch.dtype) -> tuple[int, tuple[_Layer, ...]]:
    """The wires N and the layers of ``network`` on n scores (static: independent of the values)."""
    if network not in NETWORKS:
        raise ValueError(f"unknown sorting network {network!r}; choose one of {', '.join(map(repr, NETWORKS))}")
    specs: list[tuple[int, int, int, Tensor | None]] = []  # (offset, count, dist, larger-to-first mask or None)
    if network == "odd_even":
        wires = n
        specs = [(layer % 2, (n - layer % 2) // 2, 1, None) for layer in range(n)]
    else:
        wires = 1 << max(0, (n - 1).bit_length())
        s = 2
        while s <= wires:
            j = s // 2
            while j >= 1:
                count = wires // (2 * j)
                first = (torch.arange(count) * (2 * j)) // s % 2 == 0
                specs.append((0, count, j, None if bool(first.all()) else first))
                j //= 2
            s *= 2
    real = torch.arange(wires) < n  # wires holding scores (the others hold sentinels)
    layers, start = [], 0
    for offset, count, dist, larger_first in specs:
        if count == 0:
            continue
        idx = torch.arange(offset, offset + 2 * count * dist).view(count, 2, dist)
        rp, rq = real[idx[:, 0]], real[idx[:, 1]]
        soft = hard = None
        if not bool((rp & rq).all()):
            up = torch.ones(count, 1, dtype=torch.bool) if larger_first is None else larger_first.view(count, 1)
            swap = torch.where(up, ~rp & rq, rp & ~rq)  # the sentinel sits on the larger side: swap
            real[idx[:, 0]], real[idx[:, 1]] = torch.where(swap, rq, rp), torch.where(swap, rp, rq)
            soft = (rp & rq).to(device)
            hard = swap.to(device=device, dtype=dtype)
        sign = None if larger_first is None else (larger_first.to(dtype) * 2 - 1).view(count, 1).to(device)
        layers.append(_Layer(offset, count, dist, start, sign, soft, hard))
        start += count * dist
    return wires, tuple(layers)


def _swap_prob(z: Tensor, relaxation: str) -> Tensor:
    if relaxation == "logistic":
        return torch.sigmoid(z)
    # 1/2 + atan(z)/π written as atan2(1, −z)/π: accurate in the tail z → −∞ as well
    return torch.atan2(torch.ones_like(z), -z).div_(math.pi)


def _swap_density(z: Tensor, relaxation: str) -> Tensor:
    """f'(z)."""
    if relaxation == "logistic":
        return torch.sigmoid(z) * torch.sigmoid(-z)
    return 1.0 / (math.pi * (1.0 + z * z))


def _z(layer: _Layer, d: Tensor, t: Tensor) -> Tensor:
    z = d / t
    return z if layer.sign is None else z * layer.sign


def _alpha(layer: _Layer, d: Tensor, t: Tensor, relaxation: str) -> Tensor:
    """The swap probabilities (R, count, dist) of a layer from its input differences d = b − a."""
    a = _swap_prob(_z(layer, d, t), relaxation)
    return a if layer.soft is None else torch.where(layer.soft, a, layer.hard)  # type: ignore[arg-type]


def _mix(layer: _Layer, rows: Tensor, a: Tensor, count: int | None = None) -> Tensor:
    """``rows ← rows L_l`` in place for ``rows`` (R, K, N) and swap probabilities ``a`` (R, count, dist); returns
    the differences (second − first) of the input at the comparators, (R, K, count, dist). With ``count``, only
    the first ``count`` blocks (the others must have equal columns: zero, outside the support of ``rows``)."""
    count = layer.count if count is None else count
    p, q = layer.pair(rows, count)
    delta = q - p
    a = a[:, :count].unsqueeze(1)
    p.addcmul_(delta, a)
    q.addcmul_(delta, a, value=-1)
    return delta


def _grow(layer: _Layer, width: int) -> tuple[int, int]:
    """For rows supported on the wires [0, width): the blocks of ``layer`` that touch them, and the support after."""
    count = layer.blocks_within(width)
    return count, max(width, layer.offset + 2 * count * layer.dist)


def _diffs(layer: _Layer, buf: Tensor) -> Tensor:
    return buf[:, layer.start : layer.start + layer.size].view(buf.shape[0], layer.count, layer.dist)


def _selector(like: Tensor, k: int, wires: int) -> Tensor:
    e = like.new_zeros(like.shape[0], k, wires)
    e.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return e


class _NetworkTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, k, network, relaxation):
        rows, n = x.shape
        wires, layers = _network(network, n, x.device, x.dtype)
        total = sum(layer.size for layer in layers)
        tt = t.reshape(rows, 1, 1)
        v = x.new_zeros(rows, wires)  # sentinel wires hold 0: every comparator touching them is hard
        v[:, :n] = x
        buf = x.new_empty(rows, total)
        for layer in layers:  # the network on the values: records d = b − a at every comparator
            p, q = layer.pair(v)
            d = torch.sub(q, p, out=_diffs(layer, buf))
            a = _alpha(layer, d, tt, relaxation)
            # (1 − α) p + α q as p − α p + α q, not p + α (q − p): exact for α = 0 and 1, where q − p would round
            # away the smaller value next to a large one (1e8 − 9 is 99999992 in float32)
            ap, aq = a * p, a * q
            p.sub_(ap).add_(aq)
            q.sub_(aq).add_(ap)
        gam = _selector(x, k, wires)
        width = k  # the rows of E_k L_m ⋯ L_l vanish outside the wires [0, width): skip the comparators there
        for layer in reversed(layers):  # Γ = E_k L_m ⋯ L_1, one layer at a time from the left
            count, width = _grow(layer, width)
            _mix(layer, gam, _alpha(layer, _diffs(layer, buf), tt, relaxation), count)
        ctx.save_for_backward(buf, t)
        ctx.network, ctx.relaxation = network, relaxation
        return gam if wires == n else gam[..., :n]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # Γ = B_l L_l (L_{l-1} ⋯ L_1) with B_l = E_k L_m ⋯ L_{l+1}. With H_l = G L_1 ⋯ L_{l-1} (L_l is symmetric),
        #     ∂loss/∂L_l = B_lᵀ H_l,   so for a comparator (p, q) of layer l with Δ = column q − column p,
        #     ᾱ = −Σ_r ΔB_l[r] ΔH_l[r].
        # α = f(σ d / t) depends on the layer's input values (d = v_q − v_p, σ = ±1 its direction), which the
        # layer mixes as v ← L_l v; back through the values network (v̄ = 0 after the last layer):
        #     ᾱ_tot = ᾱ − d (v̄_q − v̄_p),   g = ∂α/∂v_q = −∂α/∂v_p = σ f'(z)/t,
        #     v̄_p ← v̄_p + e,  v̄_q ← v̄_q − e  with  e = α (v̄_q − v̄_p) − g ᾱ_tot,   t̄ += −ᾱ_tot f'(z) z/t.
        # B_l runs m → 1 from E_k; H_l runs 1 → m, so it is recomputed from checkpoints every s layers.
        buf, t = ctx.saved_tensors
        relaxation = ctx.relaxation
        rows, k, n = grad.shape
        wires, layers = _network(ctx.network, n, buf.device, buf.dtype)
        m = len(layers)
        if m == 0 or k == 0:
            return grad.new_zeros(rows, n), torch.zeros_like(t), None, None, None
        tt = t.reshape(rows, 1, 1)
        seg = math.ceil(math.sqrt(2 * m))
        starts = range(0, m, seg)
        h = grad.new_zeros(rows, k, wires)
        h[..., :n] = grad
        checkpoints = []
        for i, l0 in enumerate(starts):
            if i == len(starts) - 1:
                checkpoints.append(h)
                break
            checkpoints.append(h.clone())
            for layer in layers[l0 : l0 + seg]:
                _mix(layer, h, _alpha(layer, _diffs(layer, buf), tt, relaxation))
        del h
        b = _selector(buf, k, wires)
        width = k
        vbar = buf.new_zeros(rows, wires)
        tbar = torch.zeros_like(tt)
        for l0 in reversed(starts):
            segment = layers[l0 : l0 + seg]
            h = checkpoints.pop()
            dh = []
            for i, layer in enumerate(segment):
                if i < len(segment) - 1:
                    dh.append(_mix(layer, h, _alpha(layer, _diffs(layer, buf), tt, relaxation)))
                else:
                    p, q = layer.pair(h)
                    dh.append(q - p)
            del h
            for layer in reversed(segment):
                d = _diffs(layer, buf)
                z = _z(layer, d, tt)
                a = _swap_prob(z, relaxation)
                fp = _swap_density(z, relaxation)
                if layer.soft is not None:
                    a = torch.where(layer.soft, a, layer.hard)
                    fp = torch.where(layer.soft, fp, torch.zeros_like(fp))
                count, width = _grow(layer, width)
                db = _mix(layer, b, a, count)  # b: B_l → B_{l-1}
                abar = torch.zeros_like(d)  # ΔB_l = 0 outside the support
                abar[:, :count] = db.mul_(dh.pop()[:, :, :count]).sum(1).neg_()
                del db
                vp, vq = layer.pair(vbar)
                dv = vq - vp
                abar = abar - d * dv
                g = fp / tt if layer.sign is None else fp * layer.sign / tt
                e = a * dv - g * abar
                vp.add_(e)
                vq.sub_(e)
                zf = torch.where(fp > 0, fp * z, torch.zeros_like(fp))
                tbar -= (abar * zf).sum(dim=(-2, -1), keepdim=True) / tt
        gx = vbar[:, :n] if ctx.needs_input_grad[0] else None
        gt = tbar.reshape(t.shape) if ctx.needs_input_grad[1] else None
        return gx, gt, None, None, None


def network_permutation(x: Tensor, k: int, t: Tensor, *, network: str, relaxation: str = "logistic") -> Tensor:
    """The first k rows Γ (R, k, n) of the relaxed sorting network on rows ``x`` (R, n) (float32/64, finite) at
    temperatures ``t`` (R, 1), larger values first, with the hand-written backward. Low level, no validation; see
    :func:`softtopk.topk_permutation`."""
    return _NetworkTopK.apply(x, t, int(k), network, relaxation)
