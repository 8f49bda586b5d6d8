"""A griffe extension for the site: the docstrings' reStructuredText constructs, as Markdown.

softtopk's docstrings are written for ``help()`` and Sphinx-style readers: ``:math:`…``` roles, ``.. math::``
blocks, ``:func:`…``` references and simple tables. mkdocstrings renders docstrings as Markdown, so this
extension rewrites those constructs (in the site only; the source stays as it is): math to MathJax delimiters,
references to code, simple tables to Markdown tables.
"""

from __future__ import annotations

import re

from griffe import Docstring, Extension, Object

_ROLE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE_REF = re.compile(r":(?:func|class|mod|meth|data|attr):`~?([^`]+)`")
_BORDER = re.compile(r"^(\s*)(=+)(\s+=+)+\s*$")


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` and its indented block -> a ``$$ … $$`` display."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = len(line) - len(line.lstrip())
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            pad = " " * indent
            out += [pad + "$$", *(pad + b for b in body if b), pad + "$$", ""]
            continue
        out.append(line)
        i += 1
    return out


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for j, (a, _) in enumerate(spans):
        end = spans[j + 1][0] if j + 1 < len(spans) else len(line)
        cells.append(line[a:end].strip())
    return cells


def _tables(lines: list[str]) -> list[str]:
    """RST simple tables (``===  ===`` borders) -> Markdown tables; a row whose first cell is blank continues the
    row above it."""
    out, i = [], 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        spans = [(s.start(), s.end()) for s in re.finditer(r"=+", border)]
        indent = m.group(1)
        rows, i = [], i + 1
        borders = 1
        while i < len(lines) and borders < 3:
            if _BORDER.match(lines[i]):
                borders += 1
            elif lines[i].strip():
                cells = _cells(lines[i], spans)
                if rows and not cells[0] and borders == 2:
                    rows[-1] = [(a + " " + b).strip() for a, b in zip(rows[-1], cells)]
                else:
                    rows.append(cells)
            i += 1
        if not rows:
            continue
        out.append("")
        out.append(indent + "| " + " | ".join(rows[0]) + " |")
        out.append(indent + "|" + "---|" * len(rows[0]))
        out += [indent + "| " + " | ".join(r) + " |" for r in rows[1:]]
        out.append("")
    return out


def markdown(text: str) -> str:
    lines = _tables(_math_blocks(text.split("\n")))
    text = "\n".join(lines)
    text = _ROLE_MATH.sub(lambda m: "$" + m.group(1) + "$", text)
    return _ROLE_REF.sub(lambda m: "`" + m.group(1) + "`", text)


class RstToMarkdown(Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring = Docstring(
                markdown(obj.docstring.value), lineno=obj.docstring.lineno, endlineno=obj.docstring.endlineno,
                parent=obj, parser=obj.docstring.parser, parser_options=obj.docstring.parser_options,
            )  # fmt: skip
