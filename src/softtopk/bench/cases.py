"""The one registry of benchmark cases and the shapes they run on.

A :class:`Case` is one operator called the way users call it; its tags say which tables it belongs to. A
:class:`Shape` is a (rows, n, k) input; :data:`SHAPES` says which shapes each tag measures. A run measures every
selected case once at every shape of its tags, so a case at a shape has exactly one number per run, whichever
tables show it.

Temperatures are each operator's own parameter: ``temperature`` in softtopk's width convention for its masks
(the width of the transition in score units), the peers' defaults for the peers (see each case's note).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

import softtopk

__all__ = [
    "APP_SHAPES",
    "CORE_METHODS",
    "EXTRA_TAGS",
    "GRID_SIZES",
    "SHAPES",
    "TAGS",
    "Case",
    "Shape",
    "fmt_n",
    "grid",
    "softtopk_cases",
    "tags",
]

TAGS = ("core", "apps", "peers", "operators", "permutahedron", "quality")
#: tags that run only when named (``--tag distributed``: spawns gloo processes; see :mod:`.distributed`)
EXTRA_TAGS = ("distributed",)
#: the temperature of every timed softtopk mask (width convention; scores are randn, so about a third of their std)
SPEED_T = 0.3

Fn = Callable[[], object]


def fmt_n(n: int) -> str:
    """1000 -> ``1e3``, 128000 -> ``1.28e5``, 8 -> ``8``."""
    if n < 100:
        return str(n)
    e = len(str(n)) - 1
    return f"{n / 10**e:g}e{e}"


@dataclass(frozen=True)
class Shape:
    """Scores of shape (rows, n), top-k along n; ``use`` names the application the shape comes from."""

    rows: int
    n: int
    k: int
    use: str = ""

    @property
    def label(self) -> str:
        return f"{self.rows} × {self.n if self.n < 10**5 else fmt_n(self.n)}, k={self.k}"


def grid(sizes: tuple[int, ...], rows: int = 32) -> list[Shape]:
    """Batch ``rows`` × n for each n, k = n/100 (at least 1)."""
    return [Shape(rows, n, max(n // 100, 1)) for n in sizes]


GRID_SIZES = (10**2, 10**3, 10**4, 10**5, 10**6)
APP_SHAPES = [
    Shape(4096, 8, 2, "MoE router, 8 experts"),
    Shape(4096, 64, 8, "MoE router, 64 experts"),
    Shape(1024, 200, 20, "cascade pre-ranking, 200 candidates"),
    Shape(256, 1000, 5, "top-k classification, 1000 classes"),
    Shape(128, 1024, 10, "kNN over a batch of references"),
    Shape(8, 4096, 512, "mixture-of-depths token router"),
    Shape(8, 128000, 4, "beam search over beam × vocabulary"),
    Shape(2, 10**6, 1000, "retrieval over a large catalogue"),
]
#: tag -> the shapes it measures (--quick keeps the grid's two smallest sizes; the app shapes stay)
SHAPES = {
    "core": grid(GRID_SIZES),
    "apps": APP_SHAPES,
    "peers": grid(GRID_SIZES),
    "operators": grid(GRID_SIZES[:4]),
    "permutahedron": grid(GRID_SIZES[:4]),
}


@dataclass
class Case:
    """One benchmarked operator.

    Attributes:
        name: the label in tables and plots.
        source: where it comes from: ``softtopk``, ``torch``, a peer package, or ``in-house`` (written here).
        tags: the tables it belongs to (:data:`TAGS`).
        call: (x, k) -> the differentiable output that is timed (forward, then backward with a fixed random
            upstream gradient of the output's shape); ``None`` when ``mask`` is given.
        mask: (x, k, t) -> a (rows, n) top-k mask at temperature t: timed at ``temperature``, and what the quality
            metrics measure.
        temperature: the temperature of the timed call of ``mask``.
        fixed_k: run at k = min(fixed_k, n) instead of the shape's k (stated in the name).
        order: growth exponent in n of one call's time and memory (predicts when the next size exceeds the caps).
        heavy: left out of ``--quick`` (compiles, or one call takes seconds).
        memory_visible: its allocations are torch's (the JAX peers' are not).
        build: a custom (x, k, g) -> forward+backward callable, replacing ``call``/``mask`` for the timing.
        grad: a custom (x, k, t, g) -> (mask, gradient of <g, mask>) for the quality metrics.
        note: how it is called, shown under the tables.
    """

    name: str
    source: str
    tags: frozenset[str]
    call: Callable[[Tensor, int], Tensor] | None = None
    mask: Callable[[Tensor, int, float], Tensor] | None = None
    temperature: float = SPEED_T
    fixed_k: int | None = None
    order: float = 1.0
    heavy: bool = False
    memory_visible: bool = True
    build: Callable[[Tensor, int, Tensor], Fn] | None = None
    grad: Callable[[Tensor, int, float, Tensor], tuple[Tensor, Tensor]] | None = None
    note: str = ""
    kind: str = field(default="softtopk")  # softtopk, baseline, peer

    def k_at(self, shape: Shape) -> int:
        return min(self.fixed_k, shape.n) if self.fixed_k is not None else shape.k

    def output(self, x: Tensor, k: int) -> Tensor:
        """The timed forward."""
        if self.call is not None:
            return self.call(x, k)
        assert self.mask is not None
        return self.mask(x, k, self.temperature)

    def mask_and_grad(self, x: Tensor, k: int, t: float, g: Tensor) -> tuple[Tensor, Tensor]:
        """The mask at temperature t and the gradient of <g, mask> with respect to x (for the quality metrics)."""
        if self.grad is not None:
            return self.grad(x, k, t, g)
        assert self.mask is not None
        xr = x.detach().clone().requires_grad_()
        y = self.mask(xr, k, t)
        (grad,) = torch.autograd.grad((y * g).sum(), xr, allow_unused=True)
        return y.detach(), (torch.zeros_like(xr) if grad is None else grad)


def tags(*names: str) -> frozenset[str]:
    """The tag set of a case."""
    return frozenset(names)


# ----------------------------------------------------------------------------------------------------------------
# baselines and softtopk
# ----------------------------------------------------------------------------------------------------------------
BASELINE = "torch.topk"
SOFTMAX = "softmax"
ALL = tags("core", "apps", "peers", "operators", "permutahedron")


def baseline_cases() -> list[Case]:
    return [
        Case(BASELINE, "torch", ALL, call=lambda x, k: torch.topk(x, k).values, kind="baseline",
             note="torch.topk(x, k).values forward+backward: the reference of every ratio"),
        Case(SOFTMAX, "torch", tags("core", "apps"), call=lambda x, k: torch.softmax(x, -1), kind="baseline",
             note="torch.softmax(x, -1) forward+backward: the floor of any smooth normalised weighting"),
        Case("torch.sort", "torch", tags("peers"), call=lambda x, k: torch.sort(x, -1).values, kind="baseline",
             order=1.1, note="torch.sort(x).values forward+backward: the floor of every sorting-based method"),
    ]  # fmt: skip


def _topk_mask(method: str, **kw: Any) -> Callable[[Tensor, int, float], Tensor]:
    if method == "hard":
        return lambda x, k, t: softtopk.topk_mask(x, k, method="hard")
    return lambda x, k, t: softtopk.topk_mask(x, k, method=method, temperature=t, **kw)


#: the threshold family as users call it: name -> (method, options)
CORE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "hard": ("hard", {}),
    "straight_through": ("sigmoid", {"straight_through": True}),
    "dftopk": ("dftopk", {}),
    "sigmoid": ("sigmoid", {}),
    "soft": ("soft", {}),
    "sparse": ("sparse", {}),
    "sparse(p=4/3)": ("sparse", {"p": 4 / 3}),
    "lapsum": ("lapsum", {}),
}


def _soft_rank_mask(x: Tensor, k: int, t: float) -> Tensor:
    return (k + 1 - softtopk.soft_rank(x, temperature=t, descending=True)).clamp(0.0, 1.0)


def _permutation_mask(method: str) -> Callable[[Tensor, int, float], Tensor]:
    key = "epsilon" if method == "sinkhorn" else "temperature"
    return lambda x, k, t: softtopk.topk_permutation(x, k, method=method, **{key: t}).sum(-2)  # type: ignore[arg-type]


def _core_cases() -> list[Case]:
    notes = {
        "straight_through": "topk_mask(method='sigmoid', straight_through=True): the hard mask forward, the sigmoid "
        "mask's gradient backward",
    }
    return [
        Case(name, "softtopk", tags("core", "apps", "peers", "quality"), mask=_topk_mask(m, **kw),
             note=notes.get(name, ""))
        for name, (m, kw) in CORE_METHODS.items()
    ]  # fmt: skip


def _family_cases() -> list[Case]:
    """The other softtopk masks compared with the peers (and in the quality table)."""
    pq = tags("peers", "quality")
    return [
        Case("perturbed(S=10)", "softtopk", pq | {"operators"}, mask=_topk_mask("perturbed", n_samples=10),
             note="10 noise samples: its cost grows linearly with n_samples"),
        Case("soft_rank→mask", "softtopk", pq, mask=_soft_rank_mask, order=1.1, temperature=1.0,
             note="clamp(k + 1 - soft_rank(x, temperature=t), 0, 1), t = 1 (the regularisation strength): the "
             "permutahedron projection; soft ranks are exact while t is below the gaps between scores, above they "
             "pool towards the mean and this mask is 0"),
        Case("topk_permutation(sinkhorn)", "softtopk", pq, mask=_permutation_mask("sinkhorn"), temperature=0.1,
             order=2.0, note="SOFT sorted top-k (k + 1 anchors, implicit backward; epsilon = t = 0.1) summed over "
             "its k rows; O(n k)"),
        Case("topk_permutation(bitonic)", "softtopk", pq, mask=_permutation_mask("bitonic"), temperature=0.1,
             order=2.5, note="the bitonic sorting network (temperature 0.1) summed over its k rows"),
        Case("topk_permutation(odd_even)", "softtopk", pq, mask=_permutation_mask("odd_even"), temperature=0.1,
             order=3.0, heavy=True, note="the odd-even sorting network (temperature 0.1) summed over its k rows"),
    ]  # fmt: skip


def _labels(x: Tensor) -> Tensor:
    return torch.arange(x.shape[0], device=x.device) % x.shape[-1]


def _relevant(x: Tensor, k: int) -> Tensor:
    return torch.arange(k, device=x.device).expand(x.shape[0], k)


def _operator_cases() -> list[Case]:
    """Stochastic operators, threshold routing, the soft permutations, ``topk``'s weights and the losses."""
    op, L = tags("operators"), softtopk.losses
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    perm = _permutation_mask
    return [
        Case("perturbed(S=100)", "softtopk", op, order=1.1, mask=_topk_mask("perturbed", n_samples=100)),
        Case("gumbel_topk softmax (k=10)", "softtopk", op, fixed_k=10,
             call=lambda x, k: softtopk.gumbel_topk(x, k, generator=gen())),
        Case("gumbel_topk sigmoid", "softtopk", op,
             call=lambda x, k: softtopk.gumbel_topk(x, k, relaxation="sigmoid", generator=gen())),
        Case("threshold_mask", "softtopk", op, call=lambda x, k: softtopk.threshold_mask(x, 0.5, temperature=0.4)),
        Case("topk sigmoid (weights)", "softtopk", op,
             call=lambda x, k: softtopk.topk(x, k, temperature=SPEED_T).weights),
        Case("topk sparse max_support=2k", "softtopk", op,
             call=lambda x, k: softtopk.topk(x, k, method="sparse", temperature=1.0, max_support=2 * k).weights),
        Case("topk_permutation sinkhorn (k=10)", "softtopk", op, fixed_k=10,
             call=lambda x, k: perm("sinkhorn")(x, k, 0.1)),
        Case("topk_permutation bitonic (k=10)", "softtopk", op, fixed_k=10, order=2.0,
             call=lambda x, k: perm("bitonic")(x, k, 0.1)),
        Case("topk_permutation odd_even (k=10)", "softtopk", op, fixed_k=10, order=3.0, heavy=True,
             call=lambda x, k: perm("odd_even")(x, k, 0.1)),
        Case("lml_loss (k=5)", "softtopk", op, fixed_k=5, call=lambda x, k: L.lml_loss(x, _labels(x), k)),
        Case("topk_cross_entropy (sinkhorn, k=5)", "softtopk", op, fixed_k=5, order=1.5,
             call=lambda x, k: L.topk_cross_entropy(x, _labels(x), k)),
        Case("smooth_topk_hinge_loss (k=5)", "softtopk", op, fixed_k=5,
             call=lambda x, k: L.smooth_topk_hinge_loss(x, _labels(x), k)),
        Case("cascade_topk_loss", "softtopk", op, call=lambda x, k: L.cascade_topk_loss(x, _relevant(x, k))),
        Case("joint_cascade_loss (2 stages)", "softtopk", op,
             call=lambda x, k: L.joint_cascade_loss([x, 0.5 * x], _relevant(x, k))),
        Case("nn.soft_knn (k=5, rows as embeddings)", "softtopk", op, fixed_k=5, order=1.0,
             call=lambda x, k: softtopk.nn.soft_knn(x, x, _labels(x) % 4, min(k, x.shape[0] - 2), num_classes=4,
                                                    exclude_self=True)),
    ]  # fmt: skip


def _permutahedron_cases() -> list[Case]:
    pt = tags("permutahedron")
    return [
        Case("soft_rank", "softtopk", pt, order=1.1, call=lambda x, k: softtopk.soft_rank(x, temperature=1.0),
             note="soft_rank(x, temperature=1): ascending ranks, as torchsort's"),
        Case("soft_sort", "softtopk", pt, order=1.1, call=lambda x, k: softtopk.soft_sort(x, temperature=1.0),
             note="soft_sort(x, temperature=1): ascending, as torchsort's"),
        Case("topk_permutation sinkhorn (k=10)", "softtopk", pt, fixed_k=10,
             call=lambda x, k: _permutation_mask("sinkhorn")(x, k, 0.1)),
    ]  # fmt: skip


def softtopk_cases() -> list[Case]:
    """The baselines and every softtopk case, each name once (a case in several tables carries all their tags)."""
    merged: dict[str, Case] = {}
    for case in baseline_cases() + _core_cases() + _family_cases() + _operator_cases() + _permutahedron_cases():
        if case.name in merged:
            merged[case.name].tags = merged[case.name].tags | case.tags
        else:
            merged[case.name] = case
    return list(merged.values())
