"""Mixture-of-experts routing: a tiny MoE MLP (8 experts, k = 2, each a 2-layer MLP) trained with each router gate,
on a synthetic mixture-of-regimes regression and on scikit-learn's digits.

Sander et al. 2023 ("Fast, differentiable and sparse top-k: a convex analysis perspective") route tokens with a
soft top-k; the standard is the top-k softmax gate (Shazeer et al. 2017, GShard, Mixtral): the softmax of the k
largest logits, whose gradient reaches the gate only through the selected experts. Compared, all with the Switch
load-balancing loss (coefficient 1e-2): the softmax top-k gate (``method="hard"``), straight-through (the hard gate
forward, the sigmoid mask's gradient backward) with only the selected experts run and with ``dense_backward=True``
(every expert run, the full straight-through gradient), the sparse, sigmoid and dftopk soft masks, and the dense
mixture (every expert, softmax weights; k = 8). In ``eval()`` every router uses the exact top-k. At the end, the
cost of one larger MoE layer (forward + backward) with each way of running the experts.

Run: ``python -m examples.moe`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from softtopk.nn import MixtureOfExperts, TopKRouter

from . import _common

N_EXPERTS, K, HIDDEN = 8, 2, 32
AUX = 1e-2  # the load-balancing loss's coefficient, for every gate
T = 1.0  # the soft masks' temperature, in logit units
#: config name -> (TopKRouter keyword arguments, dense_backward)
GATES: dict[str, tuple[dict, bool]] = {
    "softmax top-k (hard)": ({"method": "hard"}, False),
    "straight-through, selected experts": ({"method": "sigmoid", "temperature": T, "straight_through": True}, False),
    "straight-through, dense_backward": ({"method": "sigmoid", "temperature": T, "straight_through": True}, True),
    "sparse": ({"method": "sparse", "temperature": T}, False),
    "sigmoid": ({"method": "sigmoid", "temperature": T}, False),
    "dftopk": ({"method": "dftopk", "temperature": T}, False),
    "dense: all 8 experts, softmax": ({"method": "hard", "k": N_EXPERTS}, False),
}
GRAD_TOL = 1e-3  # an expert's gate logit "receives" a token's gradient above this fraction of the token's largest


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def regimes(seed: int, n_train: int, n_test: int, d: int = 8, n_regimes: int = 6) -> tuple[Tensor, ...]:
    """Inputs around one of ``n_regimes`` hidden cluster centres; the cluster decides which map gives the target:
    a linear map, a sine of a projection, or the absolute value of one (in turn). Targets standardised."""
    g = torch.Generator().manual_seed(1000 + seed)
    centres = 3.0 * torch.randn(n_regimes, d, generator=g)
    a = torch.randn(n_regimes, d, generator=g) / d**0.5
    b = 0.5 * torch.randn(n_regimes, generator=g)
    n = n_train + n_test
    c = torch.randint(n_regimes, (n,), generator=g)
    x = centres[c] + torch.randn(n, d, generator=g)
    proj = ((x - centres[c]) * a[c]).sum(-1) * 1.5 + b[c]
    kind = c % 3
    y = torch.where(kind == 0, proj, torch.where(kind == 1, 2.0 * torch.sin(proj), proj.abs()))
    y = y + 0.05 * torch.randn(n, generator=g)
    y = (y - y[:n_train].mean()) / y[:n_train].std()
    return x[:n_train], y[:n_train, None], x[n_train:], y[n_train:, None]


def digits(seed: int, n_train: int | None = None) -> tuple[Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    as_t = torch.tensor
    return as_t(x_tr, dtype=torch.float32), as_t(y_tr), as_t(x_te, dtype=torch.float32), as_t(y_te)


# ------------------------------------------------------------------------------------------------------------------
# Model and measurements
# ------------------------------------------------------------------------------------------------------------------
def make_moe(config: str, d_in: int, d_out: int) -> MixtureOfExperts:
    kw, dense_backward = GATES[config]
    kw = dict(kw)
    k = kw.pop("k", K)
    router = TopKRouter(d_in, N_EXPERTS, k, load_balance="aux", **kw)
    experts = [nn.Sequential(nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d_out)) for _ in range(N_EXPERTS)]
    return MixtureOfExperts(router, experts, dense_backward=dense_backward)


def task_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y) if y.is_floating_point() else F.cross_entropy(out, y)


def step(moe: MixtureOfExperts, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One training step: Adam on the task loss + AUX · aux_loss."""
    loss = task_loss(moe(x), y) + AUX * moe.routing.aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def train(moe: MixtureOfExperts, x: Tensor, y: Tensor, epochs: int, bar, batch: int = 64, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(moe.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            step(moe, opt, x[idx], y[idx])
        bar.update()


def time_steps(models: dict[str, MixtureOfExperts], x: Tensor, y: Tensor, rounds: int = 5) -> dict[str, float]:
    """ms per training step (batch 64) of each model: the median of 8 steps, the least over ``rounds`` rounds that
    interleave the models, so that a shared machine's slow spells hit them alike. Run after the measurements (the
    steps, at a learning rate of 1e-9, leave the models as they are in effect)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(x), (64,), generator=g) for _ in range(8)]
    opts = {name: torch.optim.Adam(m.train().parameters(), lr=1e-9) for name, m in models.items()}
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, moe in models.items():
            seconds = []
            for idx in batches:
                start = time.perf_counter()
                step(moe, opts[name], x[idx], y[idx])
                seconds.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(seconds)))
    return {name: 1e3 * sec for name, sec in best.items()}


def gate_gradient(moe: MixtureOfExperts, x: Tensor, y: Tensor, dense_backward: bool) -> tuple[Tensor, Tensor]:
    """The task loss's gradient (train mode, no aux loss) at the gate weight and at the logits (T, E)."""
    probe = MixtureOfExperts(moe.router, moe.experts, dense_backward=dense_backward).train()
    out, routing = probe(x, return_routing=True)
    routing.logits.retain_grad()
    moe.router.gate.weight.grad = None
    task_loss(out, y).backward()
    grad = moe.router.gate.weight.grad.flatten().clone()
    moe.zero_grad(set_to_none=True)
    return grad, routing.logits.grad


def measure(moe: MixtureOfExperts, data: tuple[Tensor, ...]) -> dict[str, float]:
    """Test loss / accuracy, load max/mean and dead experts in eval(); gradient reach and cosine in train()."""
    _, _, x_te, y_te = data
    moe.eval()
    with torch.no_grad():
        out, routing = moe(x_te, return_routing=True)
    load = routing.load
    metrics = {"load": float(load.max() / load.mean()), "dead": float((load < 0.01).sum())}
    if y_te.is_floating_point():
        metrics["loss"] = float(F.mse_loss(out, y_te))
    else:
        metrics["acc"] = float((out.argmax(-1) == y_te).float().mean())
    probe_x, probe_y = x_te[:256], y_te[:256]
    grad, logit_grad = gate_gradient(moe, probe_x, probe_y, moe.dense_backward)
    top = logit_grad.abs().amax(-1, keepdim=True)
    metrics["reach"] = float(((logit_grad.abs() > GRAD_TOL * top) & (top > 0)).sum(-1).float().mean())
    if moe.router.k < N_EXPERTS:  # the gate gradient against the full straight-through / soft-mask gradient
        dense, _ = gate_gradient(moe, probe_x, probe_y, True)
        metrics["cos"] = float(F.cosine_similarity(grad, dense, dim=0))
    return metrics


def layer_cost(tokens: int = 1024, d: int = 64, hidden: int = 256, rounds: int = 7) -> dict[str, float]:
    """ms per forward + backward of one MoE layer at a size where the experts' compute, not Python, dominates:
    1024 tokens of 64, experts 64 → 256 → 64; the median of 3 calls, the least over ``rounds`` interleaved rounds."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    st = {"method": "sigmoid", "temperature": T, "straight_through": True}
    experts = [nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)) for _ in range(N_EXPERTS)]
    layers = {
        "softmax top-k (hard)": MixtureOfExperts(TopKRouter(d, N_EXPERTS, K, method="hard"), experts),
        "straight-through, selected experts": MixtureOfExperts(TopKRouter(d, N_EXPERTS, K, **st), experts),
        "straight-through, dense_backward": MixtureOfExperts(
            TopKRouter(d, N_EXPERTS, K, **st), experts, dense_backward=True
        ),  # fmt: skip
        "dense: all 8 experts, softmax": MixtureOfExperts(TopKRouter(d, N_EXPERTS, N_EXPERTS, method="hard"), experts),
    }
    best = dict.fromkeys(layers, float("inf"))
    for _ in range(rounds):
        for name, layer in layers.items():
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                layer(x).square().mean().backward()
                seconds.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(seconds)))
    return {name: 1e3 * sec for name, sec in best.items()}


def trivial(data: tuple[Tensor, ...]) -> dict[str, float]:
    """The train mean (regression) or the most frequent train class (digits)."""
    y_tr, y_te = data[1], data[3]
    if y_te.is_floating_point():
        return {"loss": float(F.mse_loss(y_tr.mean().expand_as(y_te), y_te))}
    return {"acc": float((y_te == torch.bincount(y_tr).argmax()).float().mean())}


# ------------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("load", "load max/mean", ".2f"),
    ("dead", "dead experts", ".1f"),
    ("reach", "experts reached by a token's gradient", ".2f"),
    ("cos", "gate-grad cosine vs dense_backward", ".3f"),
    ("ms", "ms / step", ".2f"),
]
TASKS = {
    "mixture of regimes": ("loss", "test MSE (targets of variance 1)", ".3f"),
    "digits": ("acc", "test accuracy", ".3f"),
}


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("moe", __doc__.split("\n\n")[0], argv)
    # (training points, epochs, Adam's learning rate)
    sizes = {"mixture of regimes": (800, 4, 1e-2), "digits": (400, 6, 3e-3)} if args.tiny else {}
    sizes = sizes or {"mixture of regimes": (4000, 10, 1e-2), "digits": (None, 25, 3e-3)}
    bar = _common.progress(args.seeds * len(GATES) * sum(e for _, e, _ in sizes.values()), "MoE gates")
    out: dict[str, _common.Results] = {}
    with _common.Timer("moe"):
        for task, (n_train, epochs, lr) in sizes.items():

            def run(seed: int, task=task, n_train=n_train, epochs=epochs, lr=lr) -> dict[str, dict[str, float]]:
                data = regimes(seed, n_train, 2000) if task == "mixture of regimes" else digits(seed, n_train)
                d_in = data[0].shape[1]
                d_out = 1 if data[1].is_floating_point() else 10
                rows, models = {"trivial predictor": trivial(data)}, {}
                for config in GATES:
                    bar.set_postfix_str(f"{task}, {config}, seed {seed}")
                    torch.manual_seed(seed)
                    models[config] = make_moe(config, d_in, d_out)
                    train(models[config], data[0], data[1], epochs, bar, lr=lr)
                    rows[config] = measure(models[config], data)
                for config, ms in time_steps(models, data[0], data[1], rounds=1 if args.tiny else 5).items():
                    rows[config]["ms"] = ms
                return rows

            out[task] = _common.run_seeds(args.seeds, run)
        bar.close()
    for task, results in out.items():
        print(f"\n### {task}\n")
        print(_common.format_table(results, [TASKS[task], *COLUMNS], first="gate", n_seeds=args.seeds))
    print(
        f"\n(dead: experts with < 1 % of the test slots; reached: experts whose gate logit gets at least {GRAD_TOL:g} "
        "of the token's largest logit gradient of the task loss, in train(); cosine: the gate weight's gradient "
        "against the same model's with dense_backward=True; ms / step: the median of 8 training steps of batch 64, "
        "the least of 5 rounds interleaving the gates)"
    )
    cost = {} if args.tiny else layer_cost()
    if cost:
        print("\n### one MoE layer, 1024 tokens of 64, experts 64 → 256 → 64: ms per forward + backward\n")
        print("| gate | ms |\n|---|---|\n" + "\n".join(f"| {name} | {ms:.1f} |" for name, ms in cost.items()))
    if args.plot is not None:
        _plot(out, args.plot)
    return {"results": out, "layer_cost": cost}


def _plot(out: dict[str, _common.Results], path) -> None:
    fig, axes = _common.plt.subplots(1, 3, figsize=(16, 4.2))
    names = list(GATES)
    ypos = np.arange(len(names))
    for ax, (task, (key, label, _)) in zip(axes[:2], TASKS.items()):
        ms = [_common.mean_std(out[task][n][key]) for n in names]
        ax.barh(ypos, [m for m, _ in ms], xerr=[s for _, s in ms], color="C0")
        trivial = _common.mean(out[task]["trivial predictor"][key])
        ax.set_title(f"{task} (trivial predictor: {trivial:.2f})")
        ax.set_xlabel(label)
        lo, hi = min(m - s for m, s in ms), max(m + s for m, s in ms)
        ax.set_xlim(max(0.0, lo - (hi - lo) - 0.01), hi + (hi - lo) + 0.01)  # the differences, not the bars' length
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, names)
    axes[1].set_yticks(ypos, [])
    for j, task in enumerate(TASKS):
        cos = [_common.mean(out[task][n]["cos"]) if "cos" in out[task][n] else np.nan for n in names]
        axes[2].barh(ypos + (j - 0.5) * 0.4, cos, 0.4, label=task)
    axes[2].set_yticks(ypos, [])
    axes[2].set_xlim(-0.1, 1.05)
    axes[2].set_xlabel("gate-gradient cosine vs dense_backward (trained model)")
    axes[2].legend(loc="lower left", ncol=2, fontsize="small")
    axes[2].grid(axis="x", alpha=0.3)
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
