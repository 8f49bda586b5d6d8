"""Top-k classification: an MLP trained with cross-entropy and with the top-k losses of softtopk.losses, on two
tasks where top-5 is what can be learnt.

Petersen, Kuehne, Borgelt & Deussen 2022, "Differentiable Top-k Classification Learning" (the top-k cross-entropy
through a soft sorted top-k: SOFT's optimal transport or a bitonic sorting network); Garcin, Servajean, Joly &
Salmon 2022, "Stochastic smoothing of the top-K calibrated hinge loss for deep imbalanced classification" (the
balanced and imbalanced smoothed hinge); Amos, Koltun & Kolter 2019 (the LML loss).

- **ambiguous digits**: two of scikit-learn's 8x8 digits side by side (no download), the label their two-digit
  number (100 classes); each digit of the label is swapped, with probability 0.3, with its look-alike
  (1-7, 3-8, 4-9, 5-6; 0 and 2 are kept), in the training and the test labels alike. Top-1 is capped by the noise
  (the "Bayes" row, which knows the clean digits); the at most 4 readings of an image fit in a top-5.
- **heavy-tailed**: a synthetic 100-class problem, class frequencies Zipf(1) (the rarest class is 1/100 as frequent
  as the commonest), classes in 20 groups of 5 whose means are close (ambiguity within a group); macro top-5
  averages the per-class top-5 accuracy, so the rare classes count as much as the common ones (Garcin's metric).

Run: ``python -m examples.topk_classification`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from softtopk.losses import LMLLoss, SmoothTopKHingeLoss, TopKCrossEntropyLoss

from . import _common

K = 5
LOOK_ALIKE = {1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4, 5: 6, 6: 5}
SWAP_P = 0.3


# ----------------------------------------------------------------------------------------------------------------
# data: (x_train, y_train, x_test, y_test, bayes) with bayes the Bayes classifier's (top-1, top-5) on the test set
# or None
# ----------------------------------------------------------------------------------------------------------------
def _swap(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    other = np.array([LOOK_ALIKE.get(d, d) for d in range(10)])[digits]
    return np.where(rng.random(digits.shape) < SWAP_P, other, digits)


def ambiguous_digits(seed: int, n_train: int, n_test: int):
    """Pairs of digits (128 pixels), labelled 10·left + right after the look-alike swaps."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)

    def pairs(xs, ys, n):
        i, j = rng.integers(len(ys), size=(2, n))
        label = 10 * _swap(ys[i], rng) + _swap(ys[j], rng)
        return torch.tensor(np.concatenate([xs[i], xs[j]], 1), dtype=torch.float32), torch.tensor(label), ys[i], ys[j]

    xtr, ytr, _, _ = pairs(x_tr, y_tr, n_train)
    xte, yte, left, right = pairs(x_te, y_te, n_test)
    # the Bayes classifier knows the clean digits: P(reading) is a product of (1 − p or p) per swappable digit
    swappable = np.isin(left, list(LOOK_ALIKE)).astype(int) + np.isin(right, list(LOOK_ALIKE)).astype(int)
    bayes_top1 = float(np.mean((1 - SWAP_P) ** swappable))
    return xtr, ytr, xte, yte, (bayes_top1, 1.0)


def heavy_tailed(seed: int, n_train: int, n_test: int, classes: int = 100, groups: int = 20, dim: int = 32):
    """Gaussian classes, Zipf(1) frequencies, means in groups: centroid ~ N(0, 0.4²I), class = centroid +
    N(0, 0.15²I), sample = class mean + N(0, I)."""
    g = torch.Generator().manual_seed(1000 + seed)
    centroids = 0.4 * torch.randn(groups, dim, generator=g)
    means = centroids.repeat_interleave(classes // groups, 0) + 0.15 * torch.randn(classes, dim, generator=g)
    freq = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64)
    freq = freq[torch.randperm(classes, generator=g)]  # head and tail classes in every group

    def sample(n):
        y = torch.multinomial(freq, n, replacement=True, generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return xtr, ytr, xte, yte, None


# ----------------------------------------------------------------------------------------------------------------
# losses, model, metrics
# ----------------------------------------------------------------------------------------------------------------
def losses(class_counts: Sequence[float]) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """The losses compared, as in the papers: P_K = (1/2, 0, 0, 0, 1/2) over the m = 16 largest logits (Petersen
    et al.'s setting for many classes); the hinge at σ = 1, 5 noise samples, margin 1 (Garcin et al.'s code's
    defaults; the imbalanced one with margins ∝ n_c^(−1/4)); LML at the paper's unit temperature (t = 1, i.e.
    softtopk's temperature 4)."""
    counts = [max(float(c), 1.0) for c in class_counts]  # a class absent from the training set counts as 1
    return {
        "cross-entropy": nn.CrossEntropyLoss(),
        "top-5 CE, SOFT (sinkhorn)": TopKCrossEntropyLoss(K, candidates=16, method="sinkhorn"),
        "top-5 CE, bitonic network": TopKCrossEntropyLoss(K, candidates=16, method="bitonic", temperature=1.0),
        "top-5 CE, bitonic, top1=cross_entropy": TopKCrossEntropyLoss(
            K, candidates=16, method="bitonic", temperature=1.0, top1="cross_entropy"
        ),
        "smooth top-5 hinge, balanced": SmoothTopKHingeLoss(K, temperature=1.0, n_samples=5),
        "smooth top-5 hinge, imbalanced": SmoothTopKHingeLoss(
            K, temperature=1.0, n_samples=5, balanced=False, class_counts=counts
        ),
        "LML, k = 5": LMLLoss(K, temperature=4.0),
    }


def mlp(d_in: int, classes: int, hidden: int = 128) -> nn.Module:
    layers = [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def metrics(logits: Tensor, y: Tensor, classes: int) -> dict[str, float]:
    """top-1, top-5 and macro top-5 (per-class top-5 accuracy averaged over the classes present)."""
    top = logits.topk(K, dim=1).indices
    hit1 = (top[:, 0] == y).float()
    hit5 = (top == y[:, None]).any(1).float()
    per_class = torch.zeros(classes).index_add_(0, y, hit5) / torch.bincount(y, minlength=classes).clamp_min(1)
    present = torch.bincount(y, minlength=classes) > 0
    return {"top1": hit1.mean().item(), "top5": hit5.mean().item(), "macro5": per_class[present].mean().item()}


def train(loss_fn, data, classes: int, epochs: int, bar, batch: int = 200, lr: float = 3e-3) -> tuple[nn.Module, float]:
    xtr, ytr = data[0], data[1]
    model = mlp(xtr.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(batch):
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.update()
    return model.eval(), (time.perf_counter() - start) / epochs


TASKS = {"ambiguous digits": ambiguous_digits, "heavy-tailed": heavy_tailed}


def main(argv: Sequence[str] | None = None) -> dict[str, _common.Results]:
    args = _common.parse_args("topk_classification", __doc__.split("\n\n")[0], argv)
    n_train, n_test, n_test_heavy, epochs = (1500, 1000, 3000, 5) if args.tiny else (5000, 3000, 20000, 12)
    configs = list(losses([1.0] * 100))
    bar = _common.progress(args.seeds * len(TASKS) * len(configs) * epochs, "top-k classification")
    out: dict[str, _common.Results] = {}
    with _common.Timer("topk_classification"):
        for task, make in TASKS.items():

            def run(seed: int, task=task, make=make) -> dict[str, dict[str, float]]:
                data = make(seed, n_train, n_test if task == "ambiguous digits" else n_test_heavy)
                xtr, ytr, xte, yte, bayes = data
                counts = torch.bincount(ytr, minlength=100).tolist()
                rows: dict[str, dict[str, float]] = {}
                common = torch.tensor(counts).topk(K).indices  # the 5 most frequent training labels
                rows["trivial: 5 most frequent labels"] = metrics(
                    torch.zeros(len(yte), 100).index_fill_(1, common, 1.0) + torch.linspace(0, 1e-3, 100), yte, 100
                )
                if bayes is not None:
                    rows["Bayes (knows the clean digits)"] = {"top1": bayes[0], "top5": bayes[1]}
                for name, loss_fn in losses(counts).items():
                    bar.set_postfix_str(f"{task}, {name}, seed {seed}")
                    torch.manual_seed(seed)
                    model, sec = train(loss_fn, data, 100, epochs, bar)
                    with torch.no_grad():
                        rows[name] = dict(metrics(model(xte), yte, 100), sec=sec)
                return rows

            out[task] = _common.run_seeds(args.seeds, run)
        bar.close()
    columns = [("top1", "top-1", ".3f"), ("top5", "top-5", ".3f"), ("macro5", "macro top-5", ".3f")]
    columns.append(("sec", "s / epoch", ".2f"))
    for task, results in out.items():
        print(f"\n### {task}\n")
        print(_common.format_table(results, columns, first="loss", n_seeds=args.seeds))
    if args.plot is not None:
        _plot(out, args.plot)
    return out


def _plot(out: dict[str, _common.Results], path) -> None:
    fig, axes = _common.plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    for ax, (task, results) in zip(axes, out.items()):
        names = [n for n in results if "top1" in results[n] and not n.startswith(("trivial", "Bayes"))]
        ypos = np.arange(len(names))
        for j, (key, label) in enumerate((("top1", "top-1"), ("top5", "top-5"), ("macro5", "macro top-5"))):
            ms = [_common.mean_std(results[n][key]) for n in names]
            ax.barh(ypos + (j - 1) * 0.27, [m for m, _ in ms], 0.27, xerr=[s for _, s in ms], label=label)
        ax.set_yticks(ypos, names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(task)
        ax.set_xlabel("test accuracy (mean ± std over seeds)")
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
