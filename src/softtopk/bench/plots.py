"""The plots of a run (matplotlib, from the ``bench`` extra): speed against n, the app shapes, the quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cases import APP_SHAPES, BASELINE, CORE_METHODS, SOFTMAX

__all__ = ["write_plots"]

Doc = dict[str, Any]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install 'softtopk[bench]' (or pass --no-files)") from None
    return plt


def _style(doc: Doc, name: str) -> dict[str, Any]:
    """One look per case, the same in every plot: softtopk solid with dots, peers dashed with crosses, each its own
    colour of tab20 (the default cycle of ten repeats within the legend)."""
    import matplotlib

    names = [c["name"] for c in doc["cases"] if c["kind"] != "baseline"]
    kind = next((c["kind"] for c in doc["cases"] if c["name"] == name), "peer")
    if kind == "baseline":
        return {"color": "black", "linestyle": "--" if name == BASELINE else ":", "linewidth": 1.2}
    color = matplotlib.colormaps["tab20"](names.index(name) % 20 if name in names else 0)
    look = {"marker": "o", "markersize": 3.5} if kind == "softtopk" else {"marker": "x", "linestyle": "--"}
    return {"color": color, **look}


def _speed(doc: Doc, plt: Any, title: str) -> Any:
    names = [c["name"] for c in doc["cases"] if {"core", "peers"} & set(c["tags"])]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        pts = sorted((r["n"], r["ratio"]) for r in doc["speed"]
                     if r["case"] == name and r["rows"] == 32 and r["skipped"] is None)  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **_style(doc, name))
    ax.set(xscale="log", yscale="log", xlabel="n (batch 32, k = n/100, float32)", title=title)
    ax.set_ylabel("forward+backward time / torch.topk")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _apps(doc: Doc, plt: Any, title: str) -> Any:
    shapes = [s for s in APP_SHAPES if any(r["use"] == s.use for r in doc["speed"])]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cols = (SOFTMAX, *CORE_METHODS)
    for j, name in enumerate(cols):
        at = {r["use"]: r["ratio"] for r in doc["speed"] if r["case"] == name and r["use"] and r["skipped"] is None}
        xs = [i + (j - len(cols) / 2) * 0.08 for i, s in enumerate(shapes) if s.use in at]
        look = {"color": "black", "marker": "s"} if name == SOFTMAX else {"color": _style(doc, name)["color"]}
        ax.scatter(xs, [at[s.use] for s in shapes if s.use in at], label=name, s=18, **look)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="torch.topk")
    ax.set_xticks(range(len(shapes)), [f"{s.label}\n{s.use.split(',')[0]}" for s in shapes], fontsize=7,
                  rotation=20, ha="right")  # fmt: skip
    ax.set(yscale="log", ylabel="forward+backward time / torch.topk", title=title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _quality(doc: Doc, plt: Any, title: str) -> Any:
    rows = doc["quality"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for name in dict.fromkeys(r["case"] for r in rows):
        for ax, key in zip(axes, ("dist", "cos")):
            pts = sorted((r["temperature"], r[key]) for r in rows if r["case"] == name and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **_style(doc, name))
    axes[0].set(xscale="log", xlabel="temperature", ylabel="‖y − hard‖₁ / 2k")
    axes[1].set(xscale="log", xlabel="temperature", ylabel="gradient cosine with the perturbed optimizer")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=9)
    return fig


def write_plots(doc: Doc, out: Path) -> list[Path]:
    """speed.png, apps.png and quality.png (those the document has data for) in ``out``."""
    plt = _pyplot()
    m = doc["machine"]
    title = f"softtopk {doc['versions']['softtopk']}, torch {doc['versions']['torch']}, {m['gpu'] or m['cpu']}"
    makers = {"speed.png": _speed, "apps.png": _apps, "quality.png": _quality}
    has = {"speed.png": any(r["rows"] == 32 for r in doc["speed"]), "apps.png": any(r["use"] for r in doc["speed"]),
           "quality.png": bool(doc.get("quality"))}  # fmt: skip
    written = []
    for name, make in makers.items():
        if has[name]:
            fig = make(doc, plt, title)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(out / name)
    return written
