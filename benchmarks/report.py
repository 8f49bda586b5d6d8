"""Tables, plots, files and the README section of ``softtopk-bench`` (from the document that ``suite.run`` returns)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = [
    "README_END",
    "README_START",
    "check_readme_markers",
    "replace_section",
    "peer_versions",
    "summary_markdown",
    "write_all",
    "write_plots",
    "write_readme",
]

README_START, README_END = "<!-- SUITE:START -->", "<!-- SUITE:END -->"
QUALITY_TS = (0.01, 0.1)
#: what could not be installed here, or only in part (fixed facts of the packages, not measured)
PEER_INSTALL_NOTES = (
    "torchsort: PyPI has no wheel of it (sdist only); `pip install torchsort` compiles a C++ extension against the "
    "installed torch (needs a compiler and the torch headers), so it is not in the [peers] extra; it is measured "
    "when importable ({origin}).",
    "difftopk: its sparse mode needs torch-sparse, a compiled extension with no wheel for this torch; the dense "
    "mode is measured (difftopk itself is pure Python, installed from its sdist).",
    "ott-jax: JAX runs on the CPU here; on `--device cuda` it runs only when JAX has a GPU backend.",
)  # the temperatures of the README's quality columns
PEER_DISTS = ("torchsort", "entmax", "ott-jax", "jax", "diffsort", "difftopk", "matplotlib", "tqdm")
PLOTS = {
    "speed": "speed.png",
    "memory": "memory.png",
    "scaling": "scaling.png",
    "quality": "quality.png",
    "masks": "masks.png",
}


def torchsort_origin() -> str:
    try:
        dist = importlib.metadata.distribution("torchsort")
    except importlib.metadata.PackageNotFoundError:
        return "not installed here"
    url = dist.read_text("direct_url.json") or ""
    return "here: built from a local source tree" if '"file://' in url else "here: installed from a package index"


def peer_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for d in PEER_DISTS:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = None
    return out


def fmt_n(n: int) -> str:
    """``1000`` -> ``1e3``, ``20000`` -> ``2e4``; other numbers as they are."""
    if n > 0:
        e = int(math.floor(math.log10(n)))
        m, r = divmod(n, 10**e)
        if r == 0 and e >= 2:
            return f"{m}e{e}"
    return str(n)


def _ratio(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}x" if v >= 100 else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def _num(v: float | None, fmt: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return format(v, fmt)


def _by(doc: dict, grid: str) -> dict[tuple[str, int], dict]:
    return {(r["case"], r["n"]): r for r in doc["speed"] if r["grid"] == grid}


def _cases(doc: dict) -> list[dict]:
    return doc["cases"]


def _grid_names(doc: dict) -> list[dict]:
    """The grids of the tables and speed plots (not the supplementary sizes of the scaling fit)."""
    return [g for g in doc["meta"]["grids"] if not g.get("limit")]


def _supplementary(doc: dict) -> set[str]:
    return {g["name"] for g in doc["meta"]["grids"] if g.get("limit")}


def _first_skip(doc: dict, grid: str, case: str) -> dict | None:
    for s in doc["skipped"]:
        if s["grid"] == grid and s["case"] == case:
            return s
    return None


def speed_table(doc: dict, grid: dict, large: dict | None, mem_n: int | None) -> list[str]:
    """One row per case: the ratio at every n of the grid (+ the batch-1 n), bytes/element, fitted exponent."""
    at = _by(doc, grid["name"])
    at_large = _by(doc, large["name"]) if large else {}
    sizes = grid["sizes"]
    fits = {f["case"]: f for f in doc["scaling"] if f["grid"] == grid["name"]}
    head = ["case", "source"] + [f"n={fmt_n(n)}" for n in sizes]
    if large:
        head.append(f"n={fmt_n(large['sizes'][0])} (batch 1)")
    if mem_n is not None:
        head.append(f"bytes/elem (n={fmt_n(mem_n)})")
    if fits:
        head.append("exponent (sizes fitted)")
    lines = ["| " + " | ".join(head) + " |", "|:---|:---|" + "---:|" * (len(head) - 2)]
    for c in _cases(doc):
        name = c["name"]
        if not any((name, n) in at for n in sizes):
            continue
        cells = [name, c["source"]]
        for n in sizes:
            r = at.get((name, n))
            if r is None:
                cells.append("skip" if _first_skip(doc, grid["name"], name) and n > _first_run(at, name) else "–")
            else:
                cells.append(_ratio(r["ratio"]) + ("*" if r["rounds"] == 1 and r["case"] != "torch.topk" else ""))
        if large:
            r = at_large.get((name, large["sizes"][0]))
            cells.append(_ratio(r["ratio"]) if r else "")
        if mem_n is not None:
            r = at.get((name, mem_n))
            cells.append(_num(r["bytes_per_element"], ".1f") if r and r["bytes_per_element"] is not None else "–")
        if fits:
            f = fits.get(name)
            cells.append(f"{f['exponent']:.2f} ({fmt_n(f['n_min'])}–{fmt_n(f['n_max'])})" if f else "–")
        lines.append("| " + " | ".join(cells) + " |")
    base = " · ".join(
        f"n={fmt_n(n)}: {at[('torch.topk', n)]['median_ms']:.3g} ms"
        for n in sizes
        if ("torch.topk", n) in at and at[("torch.topk", n)]["median_ms"] is not None
    )
    if base:
        lines += ["", f"torch.topk forward+backward ({grid['name']}, batch {grid['batch']}): {base}"]
    return lines


def _first_run(at: dict, name: str) -> int:
    ns = [n for (c, n) in at if c == name]
    return min(ns) if ns else 0


def _closest(temps: list[float], t: float) -> float:
    return min(temps, key=lambda v: abs(math.log(v / t)))


def quality_temperatures(doc: dict) -> tuple[float, ...]:
    """The two temperatures of the README's quality table: those closest to 0.01 and 0.1."""
    temps = sorted({q["temperature"] for q in doc["quality"]})
    return tuple(dict.fromkeys(_closest(temps, t) for t in QUALITY_TS))


def quality_table(doc: dict) -> list[str]:
    """Distance to the hard mask and gradient cosine at two temperatures; |Σy − k| and exactness at the larger."""
    temps = quality_temperatures(doc)
    at = {(q["case"], q["temperature"]): q for q in doc["quality"]}
    hi = temps[-1]
    head = ["case", "source"]
    head += [f"‖y − h‖₁/2k (t={t:g})" for t in temps] + [f"\\|Σy − k\\| (t={hi:g})", f"exact 0/1 (t={hi:g})"]
    head += [f"grad cosine (t={t:g})" for t in temps]
    lines = ["| " + " | ".join(head) + " |", "|:---|:---|" + "---:|" * (len(head) - 2)]
    for c in _cases(doc):
        rows = {t: at.get((c["name"], t)) for t in temps}
        if not any(rows.values()):
            continue

        def cell(t: float, key: str, fmt: str, rows: dict = rows) -> str:
            q = rows[t]
            if q is None:
                return "–"
            if q["error"]:
                return "failed"
            return _num(q[key], fmt)

        cells = [c["name"], c["source"]] + [cell(t, "dist", ".3f") for t in temps]
        cells += [cell(hi, "sum_err", ".2g"), cell(hi, "exact", ".2f")] + [cell(t, "cos", ".3f") for t in temps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def closing_note(doc: dict) -> list[str]:
    """Each peer's ratio at n = 1e4 and 1e5 (k = n/100), the peers skipped, the cases stopped early, the flags."""
    lines = []
    at = _by(doc, "k=n/100")
    grid = next((g for g in _grid_names(doc) if g["name"] == "k=n/100"), None)
    peers = [c for c in _cases(doc) if c["kind"] == "peer"]
    if at and peers and grid is not None:
        sizes = [n for n in (10**4, 10**5) if n in grid["sizes"]] or grid["sizes"][-2:]
        where = " and ".join(f"n = {fmt_n(n)}" for n in sizes)
        lines.append(f"Each peer's forward+backward time / torch.topk at {where} (k = n/100, batch 32):")
        lines.append("")
        for c in peers:
            cells = []
            for n in sizes:
                r = at.get((c["name"], n))
                if r is not None:
                    cells.append(f"n={fmt_n(n)}: {_ratio(r['ratio'])}" + (" (one call)" if r["rounds"] == 1 else ""))
                    continue
                s = next(
                    (s for s in doc["skipped"] if s["grid"] == "k=n/100" and s["case"] == c["name"] and s["n"] <= n),
                    None,
                )
                stopped = s is None and any(r["case"] == c["name"] and r["rounds"] == 1 for r in at.values())
                why = f"not run ({s['reason']}, from n={fmt_n(s['n'])})" if s else "not run"
                cells.append(
                    f"n={fmt_n(n)}: " + ("not run (one call at a smaller n exceeded the cap)" if stopped else why)
                )
            lines.append(f"- {c['name']} ({c['source']}): " + "; ".join(cells))
    lines += ["", "Peers skipped, or measured in part, and why:", ""] + [f"- {n}" for n in doc["notices"]]
    origin = doc["meta"].get("torchsort_origin", "")
    lines += ["- " + n.format(origin=origin) for n in PEER_INSTALL_NOTES]
    extra = _supplementary(doc)
    stops = [s for s in doc["skipped"] if s["grid"] not in extra]
    if stops:
        lines += ["", "Stopped early (the per-call caps, or a failure):", ""]
        seen = set()
        for s in stops:
            key = (s["grid"], s["case"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {s['case']}, {s['grid']}: from n={fmt_n(s['n'])}: {s['reason']}")
    flags = sorted({(r["case"], r["note"]) for r in doc["speed"] if r["note"] and r["grid"] not in extra})
    bad = [q for q in doc["quality"] if q["error"] or (q["cos"] is not None and math.isnan(q["cos"]))]
    if flags or bad:
        lines += ["", "Flags:", ""]
        for case, note in flags:
            lines.append(f"- {case}: {note}")
        for case in dict.fromkeys(q["case"] for q in bad):
            ts = [f"{q['temperature']:g}" for q in bad if q["case"] == case]
            lines.append(f"- {case}: quality run failed or gave a non-finite gradient at t = {', '.join(ts)}")
    return lines


def summary_markdown(doc: dict, out: Path | None, readme: str | None) -> str:
    """The markdown of the README section (plot links relative to ``readme``'s folder when given, else ``out``)."""
    meta = doc["meta"]
    grids = _grid_names(doc)
    main = next((g for g in grids if g["name"] == "k=n/100"), None)
    fixed = next((g for g in grids if g["fixed_k"] is not None), None)
    large = next((g for g in grids if g["only_linear"]), None)
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v and k not in ("matplotlib", "tqdm"))
    lines = [
        f"Generated by `softtopk-bench{' --quick' if meta['quick'] else ''}` on {meta['date']}: softtopk "
        f"{meta['softtopk']}, torch {meta['torch']}, {meta['device']} ({meta['machine']}, {meta['threads']} torch "
        f"threads; 1-min load {meta['load_average_1min']:.2f} at start), {versions}; total {meta['total_s'] / 60:.1f} "
        "min. Every number below comes from that one process, on the same inputs.",
        "",
    ]
    if main is not None and doc["speed"]:
        sizes = main["sizes"]
        mem_n = 10**5 if 10**5 in sizes else sizes[-1]
        lines += [
            "**Speed**: forward+backward time as a ratio to `torch.topk(x, k).values` forward+backward (median of "
            "interleaved rounds; random upstream gradient), float32, batch 32, k = n/100, internal temperature 1 for "
            "softtopk's masks (each family's own t: `temperature` = t / factor in softtopk's width convention; "
            "epsilon for `soft`), 0.1 for `topk_permutation` (Sinkhorn's epsilon, the networks' temperature) and the "
            "peers' defaults otherwise (see the notes); the "
            "batch-1 column is n = 1e7 for the O(n) methods. * = one call over the time cap, timed once. "
            "**Memory**: peak extra bytes per element of x for one forward+backward (torch profiler; the JAX peers' "
            "allocations are invisible to it). **Exponent**: the least-squares slope of log time against log n over "
            "the (up to) three largest sizes whose call takes at least 10 ms (faster ones are dominated by per-call "
            "overhead), with extra sizes 2·10^e and 5·10^e for the cases that stop early: about 1 for O(n), 2 for "
            "O(n²) (with k = n/100, O(n k) is 2 too).",
            "",
            *speed_table(doc, main, large, mem_n),
        ]
        if fixed is not None:
            lines += ["", f"With a fixed k = {fixed['fixed_k']} (batch 32):", "", *speed_table(doc, fixed, None, None)]
    if doc["quality"]:
        qs = doc["quality_setup"]
        temps = quality_temperatures(doc)
        self_cos = ", ".join(
            f"{next(q['ref_self_cos'] for q in doc['quality'] if q['temperature'] == t):.3f} at t={t:g}" for t in temps
        )
        lines += [
            "",
            f"**Quality** ({qs['rows']} rows of randn, n = {qs['n']}, k = {qs['k']}; the temperature is each method's "
            "own parameter: for softtopk's masks the family's internal t (the t of sigmoid((x − τ)/t), the Laplace "
            "scale, the noise σ, …: `temperature` = t / factor in softtopk's width convention), epsilon for `soft`, "
            "ott-jax and the Sinkhorns, the strength for soft_rank, regularization_strength for "
            "torchsort, 1/steepness for the sorting networks, x/t for entmax): distance to the hard mask "
            "‖y − h‖₁ / 2k (0: hard, 1: disjoint), |Σy − k|, the fraction of entries exactly 0 or 1, and the cosine "
            "of the gradient of ⟨g, y⟩ with the perturbed-optimizer gradient at the same temperature (Gaussian "
            f"noise, {qs['ref_samples']} samples; its two halves agree to cosine {self_cos}). Every temperature is "
            "in `quality.csv` and the plot.",
            "",
            *quality_table(doc),
        ]
    notes = [f"- {c['name']}: {c['note']}" for c in _cases(doc) if c["note"]]
    if notes:
        lines += ["", "How each case is called (peers at their own default temperature in the speed runs):", ""]
        lines += notes
    note = closing_note(doc)
    if note:
        lines += ["", *note]
    if out is not None:
        base = Path(os.path.dirname(os.path.abspath(readme))) if readme else out
        have = [(k, f) for k, f in PLOTS.items() if (out / f).is_file()]
        if have:
            lines.append("")
            for key, f in have:
                rel = os.path.relpath(out / f, base)
                lines.append(f"![{key}]({rel})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------
def write_all(doc: dict, out: Path) -> list[Path]:
    """suite.json, speed.csv, quality.csv, the PNG plots (if matplotlib is importable) and summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "suite.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    written.append(path)
    for table in ("speed", "quality"):
        if doc[table]:
            path = out / f"{table}.csv"
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(doc[table][0]))
                w.writeheader()
                w.writerows(doc[table])
            written.append(path)
    written += write_plots(doc, out)
    path = out / "summary.md"
    path.write_text(summary_markdown(doc, out, readme=str(path)) + "\n")
    written.append(path)
    return written


def _split(path: str, start: str, end: str) -> tuple[str, str]:
    """The text of file ``path`` before ``start`` and after ``end`` (each once, in this order)."""
    with open(path) as f:
        text = f.read()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(
            f"--readme {path}: expected the markers {start} and {end} once each, in this order (add them where the "
            "generated benchmark section should go)"
        )
    head, rest = text.split(start, 1)
    return head, rest.split(end, 1)[1]


def check_readme_markers(path: str, start: str = README_START, end: str = README_END) -> None:
    """Exit with a clear message unless ``path`` holds the markers (checked before a long run)."""
    _split(path, start, end)


def replace_section(path: str, body: str, start: str = README_START, end: str = README_END) -> None:
    """Rewrite the text of file ``path`` between the markers ``start`` and ``end``."""
    head, tail = _split(path, start, end)
    with open(path, "w") as f:
        f.write(head + start + "\n" + body + "\n" + end + tail)


def write_readme(path: str, doc: dict, out: Path | None) -> None:
    """Replace the text between the SUITE markers of ``path`` with this run's summary and plot links."""
    check_readme_markers(path)
    replace_section(path, summary_markdown(doc, out, readme=path))


# --------------------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------------------
def _styles(doc: dict) -> dict[str, dict[str, Any]]:
    import matplotlib.pyplot as plt

    # softtopk: solid lines with circles; peers: dashed lines with squares. Each group gets its own distinct colours.
    palettes = {
        "softtopk": list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors),
        "peer": [c for i, c in enumerate(plt.get_cmap("Set1").colors) if i != 5] + list(plt.get_cmap("Dark2").colors),
    }
    used = {"softtopk": 0, "peer": 0}
    styles = {}
    for c in _cases(doc):
        if c["kind"] == "baseline":
            styles[c["name"]] = {
                "color": "black",
                "linestyle": "--" if c["name"] == "torch.topk" else ":",
                "marker": None,
                "linewidth": 1.5,
            }
            continue
        group = "softtopk" if c["kind"] == "softtopk" else "peer"
        palette = palettes[group]
        styles[c["name"]] = {
            "color": palette[used[group] % len(palette)],
            "linestyle": "-" if group == "softtopk" else "--",
            "marker": "o" if group == "softtopk" else "s",
            "markersize": 3.5,
            "linewidth": 1.2,
        }
        used[group] += 1
    return styles


def _figure_legend(fig: Any, axes: list[Any]) -> None:
    """One legend for all the panels (every label once), right of the figure."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="center right", frameon=False)


def _log_n_axis(ax: Any, sizes: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sizes, [fmt_n(n) for n in sizes])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)


def write_plots(doc: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# plots skipped: matplotlib is not installed (pip install 'softtopk[bench]')")
        return []
    styles = _styles(doc)
    title = f"softtopk {doc['meta']['softtopk']}, torch {doc['meta']['torch']}, {doc['meta']['machine']}"
    written = []
    grids = {g["name"]: g for g in _grid_names(doc)}
    if doc["speed"] and "speed" in doc["meta"]["suites"]:
        panels = [g for g in grids.values() if not g["only_linear"]]
        large = next((g for g in grids.values() if g["only_linear"]), None)
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 2.5, 5.2), squeeze=False)
        for ax, grid in zip(axes[0], panels):
            for c in _cases(doc):
                pts = sorted(
                    (r["n"], r["ratio"])
                    for r in doc["speed"]
                    if r["grid"] == grid["name"] and r["case"] == c["name"] and r["ratio"]
                )
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c["name"], **styles[c["name"]])
                if large is not None and grid["fixed_k"] is None:
                    lr = [r for r in doc["speed"] if r["grid"] == large["name"] and r["case"] == c["name"]]
                    if lr and lr[0]["ratio"]:
                        ax.plot(
                            [lr[0]["n"]],
                            [lr[0]["ratio"]],
                            marker="D",
                            mfc="none",
                            color=styles[c["name"]]["color"],
                            linestyle="none",
                        )
            sizes = grid["sizes"] + ([large["sizes"][0]] if large is not None and grid["fixed_k"] is None else [])
            _log_n_axis(ax, sizes)
            ax.set_yscale("log")
            ax.set_xlabel(
                f"n (batch {grid['batch']}, {grid['name']}; ◇ = n=1e7, batch 1)"
                if grid["fixed_k"] is None
                else f"n (batch {grid['batch']}, {grid['name']})"
            )
            ax.set_ylabel("forward+backward time / torch.topk")
        fig.suptitle(f"Speed: {title}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        _figure_legend(fig, list(axes[0]))
        written.append(_save(fig, out / PLOTS["speed"], plt))
    if doc["speed"] and "memory" in doc["meta"]["suites"]:
        grid = grids.get("k=n/100")
        if grid is not None:
            fig, ax = plt.subplots(figsize=(8.5, 5))
            for c in _cases(doc):
                pts = sorted(
                    (r["n"], max(r["bytes_per_element"], 0.1))
                    for r in doc["speed"]
                    if r["grid"] == grid["name"] and r["case"] == c["name"] and r["bytes_per_element"] is not None
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c["name"], **styles[c["name"]])
            _log_n_axis(ax, grid["sizes"])
            ax.set_yscale("log")
            ax.set_xlabel(f"n (batch {grid['batch']}, k = n/100, float32: x is 4 bytes/element)")
            ax.set_ylabel("peak extra bytes per element of x")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            ax.set_title(f"Memory of one forward+backward: {title}", fontsize=9)
            fig.tight_layout()
            written.append(_save(fig, out / PLOTS["memory"], plt))
    if doc["scaling"]:
        written.append(_plot_scaling(doc, out, styles, title, plt))
    if doc["quality"]:
        written.append(_plot_quality(doc, out, styles, title, plt))
    if doc.get("masks"):
        written.append(_plot_masks(doc, out, title, plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_scaling(doc: dict, out: Path, styles: dict, title: str, plt: Any) -> Path:
    grid_names = list(dict.fromkeys(f["grid"] for f in doc["scaling"]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(17, 6.5), gridspec_kw={"width_ratios": [1.25, 1]})
    main = grid_names[0]
    group = {main} | {g for g in _supplementary(doc) if g.startswith(main)}
    fits = {f["case"]: f for f in doc["scaling"] if f["grid"] == main}
    sizes: list[int] = []
    times: list[float] = []
    for c in _cases(doc):
        pts = sorted(
            (r["n"], r["median_ms"])
            for r in doc["speed"]
            if r["grid"] in group and r["case"] == c["name"] and r["median_ms"]
        )
        if not pts:
            continue
        sizes += [p[0] for p in pts]
        times += [p[1] for p in pts]
        f = fits.get(c["name"])
        label = f"{c['name']} ({f['exponent']:.2f})" if f else c["name"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **styles[c["name"]])
    grid_sizes = next((g["sizes"] for g in _grid_names(doc) if g["name"] == main), sorted(set(sizes)))
    if sizes:
        ylim = (min(times) / 2, max(times) * 2)
        base = {r["n"]: r["median_ms"] for r in doc["speed"] if r["grid"] == main and r["case"] == "torch.topk"}
        n1 = max(grid_sizes)
        n0 = n1 / 100
        t1 = base.get(n1)
        for slope, ls in ((1, ":"), (2, "-.")):  # reference slopes ending at the baseline's largest point, ×3 above
            if t1:
                ax.plot(
                    [n0, n1],
                    [3 * t1 / 100**slope, 3 * t1],
                    color="gray",
                    linestyle=ls,
                    linewidth=1.0,
                    label=f"slope {slope}",
                )
        ax.set_ylim(*ylim)
        _log_n_axis(ax, grid_sizes)
    ax.set_yscale("log")
    ax.set_xlabel(f"n (batch 32, {main}; extra sizes 2e·, 5e· for the cases that stop early)")
    ax.set_ylabel("forward+backward median time (ms)")
    ax.legend(fontsize=6.5, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("time against n; fitted exponent in the legend", fontsize=9)
    names = [c["name"] for c in _cases(doc) if any(f["case"] == c["name"] for f in doc["scaling"])]
    height = 0.8 / max(len(grid_names), 1)
    for j, g in enumerate(grid_names):
        fg = {f["case"]: f["exponent"] for f in doc["scaling"] if f["grid"] == g}
        ys = [i + j * height for i in range(len(names))]
        vals = [fg.get(nm, 0.0) for nm in names]
        bx.barh(ys, vals, height=height, label=g, color=["C0", "C1", "C2"][j % 3], alpha=0.85)
    bx.set_yticks([i + height * (len(grid_names) - 1) / 2 for i in range(len(names))], names, fontsize=7)
    bx.invert_yaxis()
    for v in (1, 2):
        bx.axvline(v, color="gray", linestyle=":", linewidth=0.8)
    bx.set_xlabel("fitted exponent of time vs n (largest sizes)")
    bx.legend(fontsize=8)
    fig.suptitle(f"Scaling: {title}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / PLOTS["scaling"], plt)


def _plot_quality(doc: dict, out: Path, styles: dict, title: str, plt: Any) -> Path:
    floors = {"dist": 1e-3, "sum_err": 1e-8}
    metrics = [
        ("dist", "‖y − h‖₁ / 2k, distance to the hard mask (0 drawn at the bottom edge)", "log"),
        ("sum_err", "|Σy − k| (0 drawn at the bottom edge)", "log"),
        ("exact", "fraction of entries exactly 0 or 1", "linear"),
        ("cos", "cosine of the gradient with the perturbed optimizer's", "linear"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 8.5))
    temps = sorted({q["temperature"] for q in doc["quality"]})
    for ax, (key, label, scale) in zip(axes.flat, metrics):
        for c in _cases(doc):
            pts = [(q["temperature"], q[key]) for q in doc["quality"] if q["case"] == c["name"]]
            pts = [(t, v) for t, v in pts if v is not None and not math.isnan(v)]
            if scale == "log":
                pts = [(t, max(v, floors[key])) for t, v in pts]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c["name"], **styles[c["name"]])
        if key == "cos":
            ref = sorted({(q["temperature"], q["ref_self_cos"]) for q in doc["quality"]})
            ax.plot(
                [r[0] for r in ref],
                [r[1] for r in ref],
                color="gray",
                linewidth=3,
                alpha=0.4,
                label="reference self-cosine",
            )
        ax.set_xscale("log")
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
        ax.minorticks_off()
        ax.set_yscale(scale)
        if scale == "log":
            ax.set_ylim(bottom=floors[key] / 1.5)
        ax.set_xlabel("temperature (each method's own parameter; softtopk's masks: internal t)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    qs = doc["quality_setup"]
    fig.suptitle(f"Quality ({qs['rows']} rows, n = {qs['n']}, k = {qs['k']}): {title}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    _figure_legend(fig, list(axes.flat))
    return _save(fig, out / PLOTS["quality"], plt)


def _plot_masks(doc: dict, out: Path, title: str, plt: Any) -> Path:
    m = doc["masks"]
    names = [nm for nm, c in m["masks"].items() if c]
    cols = 5
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), sharex=True, squeeze=False)
    n, k = len(m["x"]), m["k"]
    idx = list(range(1, n + 1))
    hard = [1.0 if i <= k else 0.0 for i in idx]
    for ax, name in zip(axes.flat, names):
        ax.step(idx, hard, where="mid", color="lightgray", linewidth=2.5)
        for j, (t, ys) in enumerate(m["masks"][name].items()):
            ax.plot(idx, ys, color=f"C{j}", marker=".", markersize=3, linewidth=1, label=f"t = {t}")
        ax.set_title(name, fontsize=8)
        ax.set_ylim(-0.1, 1.6)
        ax.axvline(k + 0.5, color="gray", linestyle=":", linewidth=0.8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("rank of the score (sorted input)", fontsize=7)
    fig.suptitle(
        f"Masks on one sorted input (n = {n}, k = {k}; gray: the hard mask; values above 1.6 clipped): {title}",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out / PLOTS["masks"], plt)
