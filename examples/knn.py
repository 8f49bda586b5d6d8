"""Differentiable k-nearest neighbours: an embedding (a small MLP) learnt on scikit-learn's digits with the soft kNN
loss, then classified by the exact kNN vote.

Xie et al. 2020, "Differentiable Top-k with Optimal Transport" (SOFT), section 5.1: a soft top-k of the negative
squared distances selects each query's k nearest references, and the loss is the negative log-likelihood of the true
class under the soft vote. As in the paper, the queries and references are one training batch, each query's own
point excluded (``SoftKNN(..., exclude_self=True)``); at test time the training set is the reference set and the
vote is exact (``knn_predict``). Compared: exact kNN on the raw pixels, on an untrained embedding, on the
penultimate layer of the same MLP trained with cross-entropy (a linear head on top), and on the embedding trained
with the soft kNN loss through each normalised mask method (soft, sigmoid, sparse, lapsum), at embedding dimension
16 and 2.

Run: ``python -m examples.knn`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
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

from softtopk.nn import SoftKNN, knn_predict

from . import _common

K = 5  # neighbours, in training and in the exact vote at test time
CLASSES = 10
# the soft methods, each at one temperature-like setting picked for both dims (scale="std": relative to each
# query's spread of squared distances, so that it holds while the embedding's scale changes)
METHODS = {
    "soft": {"method": "soft", "epsilon": 0.05},  # SOFT's own ε, relative to the largest transport cost
    "sigmoid": {"method": "sigmoid", "temperature": 0.05, "scale": "std"},
    "sparse": {"method": "sparse", "temperature": 0.05, "scale": "std"},
    "lapsum": {"method": "lapsum", "temperature": 0.05, "scale": "std"},
}


def data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    as_t = torch.tensor
    return as_t(x_tr, dtype=torch.float32), as_t(y_tr), as_t(x_te, dtype=torch.float32), as_t(y_te)


def embedding(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, dim))


def knn_accuracy(embed, d: tuple[Tensor, Tensor, Tensor, Tensor]) -> float:
    x_tr, y_tr, x_te, y_te = d
    with torch.no_grad():
        pred = knn_predict(embed(x_te), embed(x_tr), y_tr, K, num_classes=CLASSES)
    return (pred == y_te).float().mean().item()


def train(dim: int, how: str, d, epochs: int, bar, batch: int = 128, lr: float = 3e-3) -> tuple[nn.Module, float]:
    """``how``: "cross-entropy" (a linear head on the embedding) or a key of METHODS (the soft kNN loss)."""
    x_tr, y_tr = d[0], d[1]
    net = embedding(dim)
    head = nn.Linear(dim, CLASSES)
    params = list(net.parameters()) + (list(head.parameters()) if how == "cross-entropy" else [])
    opt = torch.optim.Adam(params, lr=lr)
    knn = None if how == "cross-entropy" else SoftKNN(K, exclude_self=True, **METHODS[how])
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_tr)).split(batch):
            if len(idx) <= K:
                continue
            e = net(x_tr[idx])
            if knn is None:
                loss = F.cross_entropy(head(e), y_tr[idx])
            else:  # −log of the true class's soft vote; the batch is both the queries and the references
                p = knn(e, e, y_tr[idx], num_classes=CLASSES)
                loss = -p.gather(1, y_tr[idx, None]).clamp_min(1e-6).log().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.update()
    return net.eval(), (time.perf_counter() - start) / epochs


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("knn", __doc__.split("\n\n")[0], argv)
    epochs = 5 if args.tiny else 40
    dims = (16, 2)
    trained = ["cross-entropy", *METHODS]
    bar = _common.progress(args.seeds * len(dims) * len(trained) * epochs, "soft kNN")
    out: dict[int, _common.Results] = {}
    embeddings: dict[str, tuple[Tensor, Tensor]] = {}
    with _common.Timer("knn"):
        for dim in dims:

            def run(seed: int, dim=dim) -> dict[str, dict[str, float]]:
                d = data(seed)
                torch.manual_seed(seed)
                rows = {"raw pixels (64-d)": {"acc": knn_accuracy(nn.Identity(), d)}}
                rows["untrained embedding"] = {"acc": knn_accuracy(embedding(dim).eval(), d)}
                for how in trained:
                    bar.set_postfix_str(f"dim {dim}, {how}, seed {seed}")
                    torch.manual_seed(seed)
                    net, sec = train(dim, how, d, epochs, bar)
                    name = how if how == "cross-entropy" else f"soft kNN loss, {how}"
                    rows[name] = {"acc": knn_accuracy(net, d), "sec": sec}
                    if dim == 2 and seed == 0:
                        with torch.no_grad():
                            embeddings[name] = (net(d[2]), d[3])
                return rows

            out[dim] = _common.run_seeds(args.seeds, run)
        bar.close()
    merged: _common.Results = {}
    for dim, results in out.items():
        for name, metrics in results.items():
            row = merged.setdefault(name, {})
            for key, values in metrics.items():
                row[f"{key}{dim}"] = values
    columns = [("acc16", "dim 16: test accuracy", ".3f"), ("acc2", "dim 2: test accuracy", ".3f")]
    columns += [("sec16", "s / epoch (dim 16)", ".2f")]
    print(f"\n### exact {K}-NN test accuracy on digits (references: the training set)\n")
    print(_common.format_table(merged, columns, first="embedding", n_seeds=args.seeds))
    if args.plot is not None:
        _plot(merged, embeddings, args.plot)
    return {"results": out}


def _plot(merged: _common.Results, embeddings: dict[str, tuple[Tensor, Tensor]], path) -> None:
    fig, axes = _common.plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    names = list(merged)
    ypos = np.arange(len(names))
    for j, dim in enumerate((16, 2)):
        ms = [_common.mean_std(merged[n][f"acc{dim}"]) if f"acc{dim}" in merged[n] else (0, 0) for n in names]
        axes[0].barh(ypos + (j - 0.5) * 0.4, [m for m, _ in ms], 0.4, xerr=[s for _, s in ms], label=f"dim {dim}")
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    axes[0].set_xlim(0.4, 1.0)
    axes[0].set_xlabel(f"exact {K}-NN test accuracy (mean ± std over seeds)")
    axes[0].legend(loc="lower left")
    axes[0].grid(axis="x", alpha=0.3)
    for ax, name in zip(axes[1:], ("cross-entropy", "soft kNN loss, sigmoid")):
        if name not in embeddings:
            continue
        e, y = embeddings[name]
        sc = ax.scatter(e[:, 0], e[:, 1], c=y, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
        ax.set_title(f"2-d test embedding: {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[2], ticks=range(10), label="digit")
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
