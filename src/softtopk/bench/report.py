"""Tables, plots and the marked sections of the README and the site, all from one run's JSON document.

A file takes a generated section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; NAME is one of
:data:`SECTIONS`. A section whose data the document lacks (its tag was not run) is left as it is, with a notice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from .cases import APP_SHAPES, BASELINE, CORE_METHODS, SOFTMAX, fmt_n
from .run import fit_exponent

__all__ = ["SECTIONS", "provenance", "render", "write_sections"]

Doc = dict[str, Any]
#: the methods of the app-shape table, in its column order
APP_COLUMNS = (SOFTMAX, *CORE_METHODS)


def _x(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×" if v < 100 else f"{v:.0f}×"


def _speed(doc: Doc) -> dict[tuple[str, int, int], dict]:
    return {(r["case"], r["rows"], r["n"]): r for r in doc["speed"]}


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["skipped"] is not None:
        return "skip"
    return _x(r["ratio"]) + ("*" if r["note"] else "")


def provenance(doc: Doc) -> str:
    """One line: when, on what, with which versions."""
    m, v = doc["machine"], doc["versions"]
    hw = m["gpu"] or f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads"
    others = ", ".join(f"{k} {v[k]}" for k in v if k not in ("softtopk", "torch", "python"))
    quick = " --quick" if doc["config"]["quick"] else ""
    return (f"`softtopk-bench{quick}` on {doc['date'][:10]}: {hw}; softtopk {v['softtopk']}, torch {v['torch']}, "
            f"Python {v['python']}" + (f", {others}" if others else "") + ".")  # fmt: skip


def target(case: str, softmax_ratio: float | None) -> float | None:
    """The app-shape target of a case, as a ratio to torch.topk: dftopk 1.0, the others max(1, 2.5 × softmax)."""
    if case == "dftopk":
        return 1.0
    if case in (SOFTMAX, BASELINE) or softmax_ratio is None:
        return None
    return max(1.0, 2.5 * softmax_ratio)


def _judged(r: dict | None, case: str, softmax: dict | None) -> tuple[str, bool | None]:
    """A speed cell, bold where it misses its target, and whether it met it (None: no target)."""
    lim = target(case, softmax["ratio"] if softmax else None)
    if r is None or lim is None:
        return _cell(r), None
    ok = r["skipped"] is None and r["ratio"] <= lim
    return (_cell(r) if ok else f"**{_cell(r)}**"), ok


TARGET_RULE = "dftopk ≤ 1.0×, the others ≤ max(1.0×, 2.5 × softmax) torch.topk"


def apps_table(doc: Doc) -> list[str]:
    """Rows: the application shapes; columns: softmax and the threshold methods (bold: over target)."""
    at, cols = _speed(doc), [c for c in APP_COLUMNS if any(r["case"] == c for r in doc["speed"])]
    lines = ["| shape | from | topk ms | " + " | ".join(cols) + " |", "|:---|:---|---:|" + "---:|" * len(cols)]
    met = total = 0
    for s in APP_SHAPES:
        if (BASELINE, s.rows, s.n) not in at:
            continue
        cells = []
        for c in cols:
            cell, ok = _judged(at.get((c, s.rows, s.n)), c, at.get((SOFTMAX, s.rows, s.n)))
            met, total = met + bool(ok), total + (ok is not None)
            cells.append(cell)
        ms = at[BASELINE, s.rows, s.n]["median_ms"]
        lines.append(f"| {s.label} | {s.use} | {ms:.3g} | " + " | ".join(cells) + " |")
    return lines + ["", f"Targets met: {met} of {total} (bold: missed; {TARGET_RULE})."]


#: The grid sizes where the threshold family has the app shapes' targets (issue 13: batch 32, n = 1e3 to 1e6).
GRID_TARGET_N = (1_000, 10_000, 100_000, 1_000_000)


def grid_table(doc: Doc, tag: str, exponent: bool = True) -> list[str]:
    """Rows: the cases of ``tag``; columns: n on the batch-32 grid, bytes/element, fitted exponent. In the core
    table, the cells of :data:`GRID_TARGET_N` are judged against the app shapes' targets (bold: missed)."""
    at = _speed(doc)
    judged = tag == "core"
    met = total = 0
    names = [c["name"] for c in doc["cases"] if tag in c["tags"]]
    sizes = sorted({r["n"] for r in doc["speed"] if r["rows"] == 32 and r["case"] in names})
    head = "| case | source | " + " | ".join(f"n={fmt_n(n)}" for n in sizes) + " | bytes/elem |"
    lines = [head + (" exponent |" if exponent else ""), "|:---|:---|" + "---:|" * (len(sizes) + 1 + exponent)]
    for c in (c for c in doc["cases"] if c["name"] in names):
        rs = [at.get((c["name"], 32, n)) for n in sizes]
        ok = [r for r in rs if r is not None and r["skipped"] is None]
        if not rs or all(r is None for r in rs):
            continue
        mem = ok[-1]["bytes_per_element"] if ok else None
        cells = []
        for n, r in zip(sizes, rs):
            judge = judged and n in GRID_TARGET_N
            cell, hit = _judged(r, c["name"], at.get((SOFTMAX, 32, n))) if judge else (_cell(r), None)
            met, total = met + bool(hit), total + (hit is not None)
            cells.append(cell)
        cells.append(f"{mem:.1f} (n={fmt_n(ok[-1]['n'])})" if mem is not None else "–")
        if exponent:
            fit = fit_exponent([(r["n"], r["median_ms"]) for r in ok])
            cells.append(f"{fit[0]:.2f} ({fmt_n(fit[1])}–{fmt_n(fit[2])})" if fit else "–")
        name = c["name"] + (f" (k={c['fixed_k']})" if c["fixed_k"] and f"k={c['fixed_k']}" not in c["name"] else "")
        lines.append(f"| {name} | {c['source']} | " + " | ".join(cells) + " |")
    base = " · ".join(f"n={fmt_n(n)}: {at[BASELINE, 32, n]['median_ms']:.3g} ms"
                      for n in sizes if (BASELINE, 32, n) in at)  # fmt: skip
    lines += ["", f"torch.topk forward+backward, batch 32, k = n/100: {base}"]
    if total:
        lines += ["", f"Targets met at n = 1e3 to 1e6: {met} of {total} (bold: missed; {TARGET_RULE})."]
    return lines


def _notes(doc: Doc, tag: str) -> list[str]:
    names = {c["name"] for c in doc["cases"] if tag in c["tags"]}
    lines = [f"- {c['name']}: {c['note']}" for c in doc["cases"] if c["name"] in names and c["note"]]
    flags = {(r["case"], r["skipped"] or r["note"]) for r in doc["speed"] if r["case"] in names}
    stops = sorted({(c, w) for c, w in flags if w}, key=lambda cw: cw[0])
    seen: set[str] = set()
    for c, why in stops:
        if c not in seen:
            seen.add(c)
            lines.append(f"- {c} (skip or *): {why}")
    return lines


def _legend(doc: Doc, what: str, memory: bool = True) -> str:
    mem = "; bytes/elem: peak extra memory of one call per element of x" if memory else ""
    return (f"{what[0].upper() + what[1:]}: forward+backward time as a ratio to `torch.topk(x, k).values` "
            "forward+backward on the same input (median of interleaved rounds after a warm-up call, each with "
            "torch.topk: the threshold masks and softmax in rounds of their own, softtopk's other operators in "
            "theirs, the peers in theirs; a fixed random upstream gradient), float32, softtopk's masks at temperature "
            f"{doc['config']['speed_temperature']}"
            f"{mem}. {provenance(doc)}")  # fmt: skip


def _first_calls(doc: Doc) -> str:
    firsts = [(r["first_call_ms"], r["median_ms"], r["case"]) for r in doc["speed"]
              if r.get("first_call_ms") and r["source"] == "softtopk" and r["rows"] * r["n"] <= 32 * 1000]  # fmt: skip
    if not firsts:
        return ""
    worst = max(firsts, key=lambda f: f[0] - f[1])
    return (f"First calls (not timed): the slowest softtopk first call of this run took {worst[0]:.0f} ms "
            f"({worst[2]}); a fresh install compiles its numba kernels on its first call (seconds, once: numba "
            "caches them on disk).")


def section_summary(doc: Doc) -> list[str] | None:
    if not any(r["use"] for r in doc["speed"]):
        return None
    return [_legend(doc, "each method at the shapes applications use", False), "", *apps_table(doc), "",
            _first_calls(doc),
            "", "![forward+backward time relative to torch.topk against n](docs/benchmarks/speed.png)"]  # fmt: skip


def section_apps(doc: Doc) -> list[str] | None:
    if not any(r["use"] for r in doc["speed"]):
        return None
    return [_legend(doc, "each method at the shapes applications use", False), "", *apps_table(doc), "",
            _first_calls(doc), "", "![app shapes](benchmarks/apps.png)"]  # fmt: skip


def _grid_section(tag: str, what: str, plot: str | None = None) -> Callable[[Doc], list[str] | None]:
    def section(doc: Doc) -> list[str] | None:
        own = {c["name"] for c in doc["cases"] if tag in c["tags"] and c["kind"] != "baseline"}
        if not any(r["case"] in own for r in doc["speed"]):
            return None
        body = [_legend(doc, what), "", *grid_table(doc, tag), ""]
        notes = _notes(doc, tag)
        body += (["How each case is called, and why one was skipped or flagged (*):", "", *notes, ""] if notes else [])
        return body + ([f"![{tag}](benchmarks/{plot})"] if plot else [])

    return section


def section_quality(doc: Doc) -> list[str] | None:
    q = doc.get("quality")
    if not q:
        return None
    s, temps = q["setup"], q["setup"]["temperatures"]
    head = "| case | source | " + " | ".join(f"‖y−h‖₁/2k t={t:g}" for t in temps)
    lines = [head + " | |Σy−k| | exact 0/1 | " + " | ".join(f"cos t={t:g}" for t in temps) + " |"]
    lines.append("|:---|:---|" + "---:|" * (2 * len(temps) + 2))
    mid = temps[len(temps) // 2]
    for name in dict.fromkeys(r["case"] for r in q["rows"]):
        rs = {r["temperature"]: r for r in q["rows"] if r["case"] == name}

        def f(t: float, key: str, fmt: str, rs: dict = rs) -> str:
            v = rs[t].get(key)
            return "failed" if "error" in rs[t] else "–" if v is None else format(v, fmt)

        cells = [f(t, "dist", ".3f") for t in temps] + [f(mid, "sum_err", ".2g"), f(mid, "exact", ".2f")]
        cells += [f(t, "cos", ".3f") for t in temps]
        lines.append(f"| {name} | {rs[mid]['source']} | " + " | ".join(cells) + " |")
    return [f"{s['rows']} rows of randn, n = {s['n']}, k = {s['k']}; t is each operator's own temperature (softtopk: "
            "the width convention). ‖y−h‖₁/2k: distance to the hard mask; |Σy−k| and exact 0/1 at the middle "
            f"temperature t = {mid:g}; cos: gradient cosine with the perturbed optimizer at σ = t "
            f"({s['ref_samples']} samples). {provenance(doc)}", "", *lines, "",
            "![quality](benchmarks/quality.png)"]  # fmt: skip


def section_distributed(doc: Doc) -> list[str] | None:
    part = doc.get("distributed")
    if not part:
        return None
    from .distributed import table

    s = part["setup"]
    return [f"Forward+backward time per call and bytes each rank sent: `softtopk.distributed.topk_mask` on each "
            f"rank's shard against all-gather-then-`softtopk.topk_mask` (every rank computes the full mask), "
            f"{s['world']} gloo processes of {s['threads_per_process']} torch thread, rows = {s['rows']}, "
            f"k = {s['k']}, temperature {s['temperature']:g}, float32 (median of {s['rounds']} interleaved rounds "
            "after a warm-up call, barrier to barrier; bytes: the payloads this rank contributed to collectives). "
            f"{provenance(doc)}", "", *table(part)]  # fmt: skip


SECTIONS: dict[str, Callable[[Doc], list[str] | None]] = {
    "summary": section_summary,
    "apps": section_apps,
    "core": _grid_section("core", "the threshold family, batch 32, k = n/100", "speed.png"),
    "peers": _grid_section("peers", "softtopk and its peers, batch 32, k = n/100"),
    "quality": section_quality,
    "operators": _grid_section("operators", "the other operators and the losses, batch 32, k = n/100"),
    "permutahedron": _grid_section("permutahedron", "the permutahedron operators and their peers, batch 32"),
    "distributed": section_distributed,
}


def render(doc: Doc) -> dict[str, str]:
    """Every section the document has data for, as markdown."""
    out = {}
    for name, fn in SECTIONS.items():
        lines = fn(doc)
        if lines is not None:
            out[name] = "\n".join(lines).replace("\n\n\n", "\n\n")
    return out


_MARK = re.compile(r"<!-- bench:([a-z]+) -->\n(.*?)<!-- /bench:\1 -->", re.S)


def write_sections(path: str | Path, doc: Doc, plots: Path | None) -> list[str]:
    """Rewrite every marked section of ``path`` that ``doc`` has data for; returns the notices."""
    path = Path(path)
    text, sections, notices = path.read_text(), render(doc), []
    names = _MARK.findall(text)
    if not names:
        raise SystemExit(f"{path}: no <!-- bench:NAME --> ... <!-- /bench:NAME --> section to write")

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name not in SECTIONS:
            raise SystemExit(f"{path}: unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        if name not in sections:
            notices.append(f"{path}: section {name} left as it was (not measured in this run)")
            return m.group(0)
        body = sections[name]
        if plots is not None:  # image links relative to the file written
            rel = os.path.relpath(plots, path.resolve().parent).replace(os.sep, "/")
            body = re.sub(r"\]\((?:docs/)?benchmarks/", f"]({rel}/", body)
        return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"

    path.write_text(_MARK.sub(fill, text))
    return notices
