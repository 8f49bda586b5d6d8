"""Cascade ranking: a retrieval stage keeps 30 of 200 candidates, a pre-ranking stage keeps 20 of those 30; both
two-tower models are trained together, with pointwise, listwise, soft-permutation and joint top-k losses.

Zhu et al. 2025, "Differentiable Fast Top-K Selection for Large-Scale Recommendation" (DFTopK: the joint cascade
loss over O(n) soft top-k masks, ``softtopk.losses.JointCascadeLoss``) against the soft-permutation losses it
replaces: LCRON (Wang et al. 2025, "Learning Cascade Ranking as One Network") and ARF (Wang et al. 2024), which
relax Recall@K@k through NeuralSort (Grover et al. 2019), written here.

The data are a synthetic RecFlow-like benchmark generated on the fly: every request has a user and N = 200
candidate items; a hidden relevance model, user x item latent factors plus an item bias plus noise, defines the
ground-truth top-10 G. The towers see noisy features of the latents (never the noise of the relevance), the
retrieval towers are linear with 8-dimensional embeddings, the pre-ranking towers MLPs with 16. Metrics on 2000
held-out requests: joint Recall@10@20 (of G, the fraction inside the final 20 after the retrieval stage's 30, the
papers' metric), NDCG@10 of the final ranking (binary gains on G), and the wall time of an epoch (20 steps of 64
requests). A second panel measures the papers' efficiency claim: one training step's time (forward and backward
of the loss on the scores of 2 stages, batch 256) as N grows from 1e2 to 1e4.

Run: ``python -m examples.cascade_ranking`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import softtopk
from softtopk.losses import JointCascadeLoss

from . import _common

N, K, K1, K2 = 200, 10, 30, 20  # candidates, ground truth, retrieval keeps, pre-ranking keeps
D_LATENT, D_FEAT_NOISE, REL_NOISE = 16, 0.5, 0.5
BATCH, STEPS_PER_EPOCH = 64, 20
TEMPERATURE = 1.0  # softtopk's width convention, in score units (the towers' dot products)


# ----------------------------------------------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------------------------------------------
def requests(b: int, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(user features (b, d), item features (b, n, d + 1), relevance (b, n), G's indicator (b, n))."""
    u = torch.randn(b, D_LATENT, generator=g)
    v = torch.randn(b, n, D_LATENT, generator=g)
    bias = 0.5 * torch.randn(b, n, generator=g)
    rel = (v @ u.unsqueeze(-1)).squeeze(-1) / math.sqrt(D_LATENT) + bias + REL_NOISE * torch.randn(b, n, generator=g)
    truth = torch.zeros(b, n, dtype=torch.bool).scatter_(1, rel.topk(K, dim=1).indices, True)
    xu = u + D_FEAT_NOISE * torch.randn(u.shape, generator=g)
    xv = torch.cat([v, bias.unsqueeze(-1)], -1) + D_FEAT_NOISE * torch.randn(b, n, D_LATENT + 1, generator=g)
    return xu, xv, rel, truth


class TwoTower(nn.Module):
    """score(user, item) = <user_tower(user), item_tower(item)>."""

    def __init__(self, dim: int, hidden: int | None):
        super().__init__()

        def tower(d_in: int) -> nn.Module:
            if hidden is None:
                return nn.Linear(d_in, dim)
            return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, dim))

        self.user, self.item = tower(D_LATENT), tower(D_LATENT + 1)

    def forward(self, xu: Tensor, xv: Tensor) -> Tensor:
        return (self.item(xv) @ self.user(xu).unsqueeze(-1)).squeeze(-1)


def cascade(retrieval: Tensor, prerank: Tensor) -> Tensor:
    """The items the cascade keeps, in the pre-ranker's order: top-30 by retrieval, then top-20 by pre-ranking."""
    kept = retrieval.topk(K1, dim=1).indices
    order = prerank.gather(1, kept).topk(K2, dim=1).indices
    return kept.gather(1, order)


def evaluate(stages: Sequence[nn.Module], data) -> dict[str, float]:
    xu, xv, _, truth = data
    with torch.no_grad():
        final = cascade(*(m(xu, xv) for m in stages))
    hits = truth.gather(1, final).float()  # (b, 20), in the final order
    discount = 1.0 / torch.log2(torch.arange(2, K + 2, dtype=torch.float32))
    ndcg = (hits[:, :K] * discount).sum(1) / discount.sum()
    return {"recall": hits.sum(1).mean().item() / K, "ndcg": ndcg.mean().item()}


# ----------------------------------------------------------------------------------------------------------------
# losses: each takes the list of the stages' scores (b, n) and G's indicator (b, n)
# ----------------------------------------------------------------------------------------------------------------
def bce_loss(scores: Sequence[Tensor], truth: Tensor) -> Tensor:
    """Pointwise: each stage a binary classifier of G."""
    return sum(F.binary_cross_entropy_with_logits(s, truth.float()) for s in scores)


def listnet_loss(scores: Sequence[Tensor], truth: Tensor) -> Tensor:
    """Listwise (ListNet / softmax cross-entropy): each stage's softmax against the uniform distribution on G."""
    target = truth.float() / truth.sum(1, keepdim=True)
    return sum(-(target * F.log_softmax(s, dim=1)).sum(1).mean() for s in scores)


def neuralsort_topk(s: Tensor, k: int, tau: float) -> Tensor:
    """The first k rows of NeuralSort's relaxed permutation matrix, (b, k, n): row i is
    softmax(((n + 1 − 2i) s − A_s 1) / τ), A_s 1 = Σ_j |s − s_j| (Grover et al. 2019; LCRON's operator), the sum
    computed through one sort in O(n log n) rather than the n × n matrix A_s."""
    n = s.shape[1]
    srt, idx = s.sort(dim=1, descending=True)
    rank = torch.arange(1, n + 1, dtype=s.dtype)
    before = srt.cumsum(1) - srt  # Σ of the larger scores
    after = srt.sum(1, keepdim=True) - srt.cumsum(1)  # Σ of the smaller ones
    a1_sorted = (before - (rank - 1) * srt) + ((n - rank) * srt - after)
    a1 = torch.empty_like(s).scatter(1, idx, a1_sorted)
    i = torch.arange(1, k + 1, dtype=s.dtype).view(1, k, 1)
    return torch.softmax(((n + 1 - 2 * i) * s.unsqueeze(1) - a1.unsqueeze(1)) / tau, dim=-1)


def make_lcron_loss(tau: float = TEMPERATURE, permutation: str | None = None) -> Callable:
    """LCRON / ARF-style: relaxed Recall@K@k of each stage and of the cascade through soft top-k memberships
    m_s = Σ_{i < k_s} P̂_i (NeuralSort rows, or ``softtopk.topk_permutation(method=permutation)``), clipped at 1:
    −log(Σ_G m_1 / K) − log(Σ_G m_2 / K) − log(Σ_G m_1 m_2 / K), equal weights."""

    def membership(s: Tensor, k: int) -> Tensor:
        if permutation is None:
            rows = neuralsort_topk(s, k, tau)
        else:
            rows = softtopk.topk_permutation(s, k, method=permutation)
        return rows.sum(1).clamp_max(1.0)

    def loss(scores: Sequence[Tensor], truth: Tensor) -> Tensor:
        m1, m2 = membership(scores[0], K1), membership(scores[1], K2)
        g = truth.float()

        def nll(m: Tensor) -> Tensor:
            return -((m * g).sum(1) / K).clamp_min(1e-12).log().mean()

        return nll(m1) + nll(m2) + nll(m1 * m2)

    return loss


def losses() -> dict[str, Callable[[], object]]:
    """name -> a factory of the loss (a module with parameters, or a function). The joint cascade loss uses the
    paper's k = K per stage (k=None) and learnable uncertainty weights."""
    out: dict[str, Callable[[], object]] = {
        "pointwise BCE": lambda: bce_loss,
        "listwise softmax CE (ListNet)": lambda: listnet_loss,
        "LCRON/ARF-style, NeuralSort": make_lcron_loss,
    }
    for method in ("dftopk", "sigmoid", "lapsum", "sparse"):
        out[f"joint cascade, {method}"] = lambda m=method: JointCascadeLoss(2, method=m, temperature=TEMPERATURE)
    return out


def train(make_loss, seed: int, steps_per_epoch: int, epochs: int, bar, eval_data) -> dict[str, float]:
    torch.manual_seed(seed)
    stages = [TwoTower(8, None), TwoTower(16, 64)]
    loss_fn = make_loss()
    params = [p for m in stages for p in m.parameters()]
    if isinstance(loss_fn, nn.Module):
        params += list(loss_fn.parameters())  # the uncertainty weights
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            xu, xv, _, truth = requests(BATCH, N, g)
            loss = loss_fn([m(xu, xv) for m in stages], truth)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.update()
    sec = (time.perf_counter() - start) / epochs * STEPS_PER_EPOCH / steps_per_epoch
    return dict(evaluate(stages, eval_data), sec=sec)


# ----------------------------------------------------------------------------------------------------------------
# efficiency: one training step of the loss alone (2 stages, batch 256) as N grows
# ----------------------------------------------------------------------------------------------------------------
def step_time(loss_fn, n: int, batch: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(batch, n, generator=g, requires_grad=True) for _ in range(2)]
    truth = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, torch.randn(batch, n, generator=g).topk(K, 1)[1], True)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(scores, truth).backward()
        best = min(best, time.perf_counter() - start)
    return best


def efficiency(ns: Sequence[int], batch: int, bar) -> dict[str, dict[int, float]]:
    """Seconds per step (best of a few) for each loss and N; the library's Sinkhorn permutation only where it
    takes under a few seconds a step (N ≤ 1e3)."""
    fns = {
        "LCRON-style, NeuralSort (O(n log n) + O(kn))": make_lcron_loss(),
        "LCRON-style, topk_permutation sinkhorn": make_lcron_loss(permutation="sinkhorn"),
        "joint cascade, dftopk": JointCascadeLoss(2, method="dftopk", temperature=TEMPERATURE),
        "joint cascade, lapsum": JointCascadeLoss(2, method="lapsum", temperature=TEMPERATURE),
    }
    out: dict[str, dict[int, float]] = {name: {} for name in fns}
    for name, fn in fns.items():
        step_time(fn, 100, 8, 1)  # warm-up (first calls, lazy imports)
        for n in ns:
            bar.set_postfix_str(f"efficiency, {name}, N={n}")
            if "sinkhorn" in name and n > 1000:
                continue
            out[name][n] = step_time(fn, n, batch, 3 if n <= 1000 else 1)
        bar.update()
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("cascade_ranking", __doc__.split("\n\n")[0], argv)
    steps, epochs, n_eval = (10, 4, 500) if args.tiny else (STEPS_PER_EPOCH, 10, 2000)
    ns, eff_batch = ((100, 1000), 64) if args.tiny else ((100, 1000, 10000), 256)
    configs = losses()
    bar = _common.progress(args.seeds * (len(configs) - 1) * epochs + 4, "cascade ranking")
    notes = []
    with _common.Timer("cascade_ranking"):

        def run(seed: int) -> dict[str, dict[str, float]]:
            eval_data = requests(n_eval, N, torch.Generator().manual_seed(10_000 + seed))
            # the reference: a cascade of random scores
            rows = {"random scores": evaluate([lambda a, b: torch.rand(b.shape[:2])] * 2, eval_data)}
            for name, make in configs.items():
                bar.set_postfix_str(f"{name}, seed {seed}")
                try:
                    make()
                except ValueError as err:  # sparse: exact zeros, rejected by the cross-entropy
                    if seed == 0:
                        notes.append(f"{name}: not trainable, the loss raises ValueError: {err}")
                    continue
                rows[name] = train(make, seed, steps, epochs, bar, eval_data)
            return rows

        results = _common.run_seeds(args.seeds, run)
        eff = efficiency(ns, eff_batch, bar)
        bar.close()
    print("\n### training (N = 200, Recall@10@20 of the cascade 200 → 30 → 20)\n")
    columns = [("recall", "Recall@10@20", ".3f"), ("ndcg", "NDCG@10", ".3f"), ("sec", "s / epoch", ".2f")]
    print(_common.format_table(results, columns, first="loss", n_seeds=args.seeds))
    for note in notes:
        print("\n" + note)
    print(f"\n### time per training step (loss forward + backward, 2 stages, batch {eff_batch}), ms\n")
    print("| loss | " + " | ".join(f"N = {n:g}" for n in ns) + " |")
    print("|---" * (len(ns) + 1) + "|")
    for name, times in eff.items():
        cells = [f"{times[n] * 1e3:.1f}" if n in times else "not run (> 1 min a step)" for n in ns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.plot is not None:
        _plot(results, eff, args.plot)
    return {"results": results, "efficiency": eff, "notes": notes}


def _plot(results: _common.Results, eff: dict[str, dict[int, float]], path) -> None:
    fig, (ax1, ax2) = _common.plt.subplots(1, 2, figsize=(12, 4.2))
    names = [n for n in results if n != "random scores"]
    ms = [_common.mean_std(results[n]["recall"]) for n in names]
    ax1.barh(range(len(names)), [m for m, _ in ms], xerr=[s for _, s in ms], color="tab:blue")
    ax1.set_yticks(range(len(names)), names)
    ax1.invert_yaxis()
    lo = min(m for m, _ in ms)
    ax1.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax1.set_xlabel("Recall@10@20 of the cascade (mean ± std over seeds)")
    ax1.grid(axis="x", alpha=0.3)
    for name, times in eff.items():
        xs = sorted(times)
        ax2.loglog(xs, [times[n] * 1e3 for n in xs], "o-", label=name)
    ax2.set_xlabel("candidates N")
    ax2.set_ylabel("ms per training step (batch 256)")
    ax2.set_title("loss forward + backward, 2 stages")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
