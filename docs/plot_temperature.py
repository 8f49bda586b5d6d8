"""Distance to the hard mask against the temperature, per method: docs/temperature.png and docs/temperature.md.

Rows of standard normal scores (n = 1000, k = 50, 16 rows, float64); distance ‖y − hard‖₁ / 2k (0: the hard
mask, 1: disjoint). Because the temperature is the width of the transition in the units of the scores for every
method, the curves should nearly coincide. Run: ``python docs/plot_temperature.py`` (a few seconds).
"""

from __future__ import annotations

import pathlib

import torch

import softtopk

OUT = pathlib.Path(__file__).resolve().parent
METHODS = {
    "sigmoid": {},
    "sparse": {},
    "sparse p=4/3": {"p": 4 / 3},
    "lapsum": {},
    "dftopk": {},
    "perturbed": {"n_samples": 2000},
}


def distances(temperatures, n=1000, k=50, rows=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    hard = softtopk.topk_mask(x, k, method="hard")
    out = {}
    for label, opts in METHODS.items():
        method = label.split()[0]
        if method == "perturbed":
            opts = dict(opts, generator=torch.Generator().manual_seed(1))
        out[label] = [
            float(
                (softtopk.topk_mask(x, k, method=method, temperature=t, **opts) - hard).abs().sum(-1).mean() / (2 * k)
            )
            for t in temperatures
        ]
    return out


def main():
    temps = [0.01 * 10 ** (i / 4) for i in range(13)]  # 0.01 … 10
    d = distances(temps)
    lines = ["| temperature | " + " | ".join(d) + " |", "|---" * (len(d) + 1) + "|"]
    for i, t in enumerate(temps):
        lines.append(f"| {t:.3g} | " + " | ".join(f"{d[m][i]:.3f}" for m in d) + " |")
    (OUT / "temperature.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, ys in d.items():
        ax.plot(temps, ys, marker="o", ms=3, label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("temperature (width of the transition, in score units)")
    ax.set_ylabel("‖y − hard‖₁ / 2k")
    ax.set_title("N(0, 1) scores, n = 1000, k = 50 (dftopk: not normalised, Σy > k)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "temperature.png", dpi=120)


if __name__ == "__main__":
    main()
