"""Pruning and sparse training: an MLP (64-256-256-10) on scikit-learn's digits with 90 %, 95 % and 98 % of its
weights at zero.

Every Linear layer's weight keeps the same fraction of its entries, the largest in magnitude (biases are not
pruned). Compared, at each sparsity, with the dense model as the reference:

- **soft top-k (Sander et al. 2023)**: ``prune_topk_magnitude`` from the first step, trained through
  ``softtopk.topk_magnitude``; its (dimensionless) temperature is annealed geometrically from ``T_START`` = 0.3 to
  ``T_END`` = 0.01 over training: at 0.3 the support holds 1.5 to 5 times k entries (Gaussian weights at 90 % to
  uniform ones, like the initialisation, at 98 %), so the weights below the threshold get a gradient and can swap
  in; at 0.01 it holds 1.02 to 1.25 times k, near the hard top-k, so the hard mask of the test changes the model
  little;
- **hard top-k in training**: the same with temperature 0 (the forward is w ∘ topkmask(|w|) at every step, the
  gradient g ∘ mask): what the softness adds;
- **one-shot**: the dense model pruned after training, no fine-tuning; and with a short fine-tune (the hard mask
  recomputed each step, ``FINETUNE`` epochs);
- **Top-KAST (Jayakumar et al. 2020)**: forward on the top-k, backward on twice as many weights (backward density
  2 × the forward density), plus its exploration penalty (``topkast_regularizer``, coefficient ``TOPKAST_REG``);
- **SWAT (Raihan & Aamodt 2020)**: ``SWATLinear`` layers, the forward with the top-k weights, the weight gradient
  from the top-k activations of each input row (activation sparsity ``SWAT_ACTIVATION``) and dense over the
  weights.

At test time every model runs with the hard mask (``eval()``, or the pruning made permanent); the fraction of zero
weights is counted there, over all the pruned weights.

Run: ``python -m examples.pruning`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from softtopk.nn import (
    SWATLinear,
    TopKAST,
    make_pruning_permanent,
    prune_topk_magnitude,
    topkast_regularizer,
)

from . import _common

SPARSITIES = (0.9, 0.95, 0.98)
WIDTHS = (64, 256, 256, 10)
T_START, T_END = 0.3, 0.01  # soft top-k temperature (dimensionless), annealed geometrically
FINETUNE = 5  # epochs of the one-shot model's fine-tune
TOPKAST_REG = 1e-4  # coefficient of Top-KAST's exploration penalty
SWAT_ACTIVATION = 0.5  # SWAT's activation sparsity (hidden ReLU activations are about half zero already)
LR, BATCH = 3e-3, 128
SOFT_NAME = f"soft top-k, T {T_START:g} → {T_END:g}"

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def data(seed: int) -> Data:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    as_t = torch.tensor
    return as_t(x_tr, dtype=torch.float32), as_t(y_tr), as_t(x_te, dtype=torch.float32), as_t(y_te)


def mlp(linear: Callable[[int, int], nn.Module] = nn.Linear) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [linear(n_in, n_out)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def train(model: nn.Module, d: Data, epochs: int, bar, step_hook=None, penalty=None) -> float:
    """Adam on the cross-entropy (+ ``penalty(model)``); ``step_hook(fraction done)`` before each epoch.
    Returns the seconds per epoch."""
    x_tr, y_tr = d[0], d[1]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        if step_hook is not None:
            step_hook(epoch / max(epochs - 1, 1))
        for idx in torch.randperm(len(y_tr)).split(BATCH):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.update()
    return (time.perf_counter() - start) / max(epochs, 1)


def evaluate(model: nn.Module, d: Data) -> tuple[float, float]:
    """(test accuracy, fraction of zero weights) in ``eval()``: the weights the layers use at test time."""
    model.eval()
    with torch.no_grad():
        acc = (model(d[2]).argmax(-1) == d[3]).float().mean().item()
        weights = [m.sparse_weight() if isinstance(m, SWATLinear) else m.weight for m in linears(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return acc, zeros / sum(w.numel() for w in weights)


def soft_pruned(sparsity: float, temperature: float) -> tuple[nn.Module, Callable[[float], None]]:
    """The MLP with ``prune_topk_magnitude`` on every weight, and the annealing hook (none at temperature 0)."""
    model = mlp()
    prunings = [prune_topk_magnitude(m, sparsity=sparsity, temperature=temperature) for m in linears(model)]

    def anneal(frac: float) -> None:  # geometric from T_START to T_END
        for p in prunings:
            p.temperature = T_START * (T_END / T_START) ** frac

    return model, (anneal if temperature > 0 else (lambda frac: None))


def topkast(sparsity: float) -> nn.Module:
    model = mlp()
    backward = 1.0 - min(1.0, 2.0 * (1.0 - sparsity))
    for m in linears(model):
        torch.nn.utils.parametrize.register_parametrization(m, "weight", TopKAST(sparsity, backward))
    return model


def one_shot(dense: nn.Module, sparsity: float) -> nn.Module:
    model = copy.deepcopy(dense)
    for m in linears(model):
        prune_topk_magnitude(m, sparsity=sparsity, temperature=0.0)
    return model


def permanent(model: nn.Module) -> nn.Module:
    for m in linears(model):
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            make_pruning_permanent(m)
    return model


def run_seed(seed: int, epochs: int, sparsities: Sequence[float], bar) -> dict[str, dict[str, float]]:
    d = data(seed)
    rows: dict[str, dict[str, float]] = {}

    def record(name: str, sparsity: float, model: nn.Module, sec: float | None) -> None:
        acc, zeros = evaluate(model, d)
        row = rows.setdefault(name, {})
        row.update(
            {f"acc{sparsity}": acc, f"zeros{sparsity}": zeros} | ({} if sec is None else {f"sec{sparsity}": sec})
        )

    torch.manual_seed(seed)
    bar.set_postfix_str(f"dense, seed {seed}")
    dense = mlp()
    sec = train(dense, d, epochs, bar)
    acc, _ = evaluate(dense, d)
    rows["dense (reference)"] = {f"acc{s}": acc for s in sparsities} | {f"sec{s}": sec for s in sparsities}
    for s in sparsities:
        record("one-shot, no fine-tune", s, permanent(one_shot(dense, s)), None)
        bar.set_postfix_str(f"sparsity {s}, seed {seed}")
        torch.manual_seed(seed)
        model = one_shot(dense, s)
        sec = train(model, d, FINETUNE, bar)
        record(f"one-shot + {FINETUNE}-epoch fine-tune", s, permanent(model), sec)
        for name, t in ((SOFT_NAME, T_START), ("hard top-k in training", 0.0)):
            torch.manual_seed(seed)
            model, hook = soft_pruned(s, t)
            sec = train(model, d, epochs, bar, step_hook=hook)
            record(name, s, permanent(model), sec)
        torch.manual_seed(seed)
        model = topkast(s)
        sec = train(model, d, epochs, bar, penalty=lambda m: TOPKAST_REG * topkast_regularizer(m))
        record("Top-KAST (backward density 2×)", s, permanent(model), sec)
        torch.manual_seed(seed)
        model = mlp(lambda i, o, s=s: SWATLinear(i, o, weight_sparsity=s, activation_sparsity=SWAT_ACTIVATION))
        sec = train(model, d, epochs, bar)
        record(f"SWAT (activation sparsity {SWAT_ACTIVATION:g})", s, model, sec)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("pruning", __doc__.split("\n\n")[0], argv)
    epochs = 5 if args.tiny else 20
    sparsities = (0.9, 0.98) if args.tiny else SPARSITIES
    per_seed = epochs + len(sparsities) * (FINETUNE + 4 * epochs)
    bar = _common.progress(args.seeds * per_seed, "pruning")
    with _common.Timer("pruning"):
        results = _common.run_seeds(args.seeds, lambda seed: run_seed(seed, epochs, sparsities, bar))
        bar.close()
    columns = [(f"acc{s}", f"{s:.0%}: test accuracy", ".3f") for s in sparsities]
    columns += [(f"zeros{s}", f"{s:.0%}: zero weights", ".4f") for s in sparsities]
    print(f"\n### digits, MLP {'-'.join(map(str, WIDTHS))}, {epochs} epochs: test accuracy and zero weights\n")
    print(_common.format_table(results, columns, first="method", n_seeds=args.seeds))
    sec_cols = [(f"sec{s}", f"{s:.0%}", ".3f") for s in sparsities]
    print("\n### seconds per training epoch (1 thread)\n")
    print(_common.format_table(results, sec_cols, first="method"))
    if args.plot is not None:
        _plot(results, sparsities, args.plot)
    return {"results": results, "epochs": epochs, "sparsities": sparsities}


def _plot(results: _common.Results, sparsities: Sequence[float], path) -> None:
    """Accuracy against sparsity: all methods (left), and zoomed on the top (right)."""
    fig, axes = _common.plt.subplots(1, 2, figsize=(13, 4.6))
    xs = np.array([100 * s for s in sparsities])
    low = min(min(m[f"acc{s}"]) for m in results.values() for s in sparsities)
    for ax, ylim in zip(axes, ((max(0.0, math.floor(10 * low) / 10 - 0.1), 1.0), (0.85, 0.98))):
        for name, metrics in results.items():
            ms = [_common.mean_std(metrics[f"acc{s}"]) for s in sparsities]
            style = {"ls": "--", "color": "gray", "marker": ""} if name.startswith("dense") else {"marker": "o"}
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], label=name, capsize=3, **style)
        ax.set_xlabel("sparsity (% of weights at zero, every layer)")
        ax.set_xticks(xs)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.1, color="k", lw=0.8, ls=":", label="chance")
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[0].set_title(f"digits, MLP {'-'.join(map(str, WIDTHS))}: accuracy against sparsity")
    axes[1].set_title("zoom on 0.85–0.98")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
