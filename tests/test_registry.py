"""The structure the API refactor promises: method names as plain tuples accepted everywhere, an acyclic module
graph without private names crossing modules, short public functions, and a docstring on every public name."""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import tokenize
from pathlib import Path

import pytest
import torch

import softtopk

SRC = Path(__file__).resolve().parents[1] / "src" / "softtopk"


def _module_name(path):
    """``masks.py`` -> "masks", ``nn/knn.py`` -> "nn.knn", ``nn/__init__.py`` -> "nn", ``__init__.py`` -> "__init__"."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}  # "__init__" included, subpackages too
PRIVATE_OK = ("_prepare", "_registry")  # the modules whose private names other modules may import
MAX_PUBLIC_BODY = 40

nn_mod = importlib.import_module("softtopk.nn")
losses_mod = importlib.import_module("softtopk.losses")
PUBLIC = {"softtopk": softtopk, "softtopk.losses": losses_mod, "softtopk.nn": nn_mod}


def _all_names():
    return {(mod_name, name) for mod_name, mod in PUBLIC.items() for name in mod.__all__}


# ----------------------------------------------------------------------------------------------------------
# Method names.
# ----------------------------------------------------------------------------------------------------------
def test_method_names_are_tuples_of_str():
    for names in (softtopk.METHODS, softtopk.PERMUTATION_METHODS):
        assert type(names) is tuple, type(names)
        assert names and all(type(m) is str for m in names), names
        assert len(set(names)) == len(names)
    assert set(softtopk.METHODS) == {"hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum", "perturbed"}
    assert set(softtopk.PERMUTATION_METHODS) == {"sinkhorn", "odd_even", "bitonic"}


@pytest.mark.parametrize("method", softtopk.METHODS)
def test_every_mask_method_is_accepted(method):
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = softtopk.topk_mask(x, 2, method=method)
    assert y.shape == x.shape and torch.isfinite(y).all()
    r = softtopk.topk(x, 2, method=method)
    assert r.indices.shape == (3, 2)
    torch.testing.assert_close(r.indices, torch.topk(x, 2).indices, rtol=0, atol=0)
    module = nn_mod.SoftTopK(2, method=method)
    assert isinstance(module, torch.nn.Module)
    z = module(x)
    assert z.shape == x.shape and torch.isfinite(z).all()


@pytest.mark.parametrize("method", softtopk.PERMUTATION_METHODS)
def test_every_permutation_method_is_accepted(method):
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = softtopk.topk_permutation(x, 2, method=method)
    assert isinstance(p, torch.Tensor) and torch.isfinite(p).all()


def test_old_names_are_gone():
    assert not hasattr(softtopk, "SoftTopK")  # now softtopk.nn.SoftTopK
    assert "straight_through" not in softtopk.METHODS
    gone = {"_utils", "api", "routing", "baselines", "ot", "networks"} & set(MODULES)
    assert not gone, f"old modules still in src/softtopk: {sorted(gone)}"


# ----------------------------------------------------------------------------------------------------------
# The module graph.
# ----------------------------------------------------------------------------------------------------------
def _type_checking_nodes(tree):
    """Nodes under ``if TYPE_CHECKING:`` (never executed, so they make no runtime cycle)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _package(mod):
    """The package a module's relative imports start from, as a list of parts ([] for softtopk itself)."""
    if mod == "__init__":
        return []
    parts = mod.split(".")
    return parts if MODULES.get(mod, Path()).name == "__init__.py" else parts[:-1]


def _intra_imports(tree, mod):
    """(target module, imported name or None, lineno, local alias) of every intra-package import in module ``mod``,
    at any depth.

    ``from . import m`` with ``m`` a module targets ``m`` (name None); ``from . import f`` with ``f`` not a module
    targets the package (``__init__`` for softtopk itself); ``from .m import f`` / ``from ..m import f`` /
    ``from softtopk.m import f`` target ``m``; ``import softtopk.m`` targets ``m``; ``import softtopk`` targets
    ``__init__``. Subpackage modules are dotted: ``nn.knn``.
    """
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "softtopk":
                base = node.module.split(".")[1:]
            elif node.level >= 1:
                package = _package(mod)
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            else:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                submodule = ".".join(base + [alias.name])
                if submodule in MODULES:
                    yield submodule, None, node.lineno, local
                else:
                    yield ".".join(base) or "__init__", alias.name, node.lineno, local
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "softtopk":
                    yield ".".join(parts[1:]) or "__init__", None, node.lineno, alias.asname
    return


def _parse(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


TREES = {name: _parse(path) for name, path in MODULES.items()}


def _graph():
    graph = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for target, _, _, _ in _intra_imports(tree, name):
            if target != name:
                graph[name].add(target)
    return graph


def _find_cycle(graph):
    """A cycle as a list of modules, or None (recursive DFS with colours; the graph is small)."""
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_module_files_found():
    assert {"__init__", "_prepare", "_registry", "masks", "nn", "nn.knn", "permutations", "hard", "bench.run"} <= set(
        MODULES
    )


def test_import_targets_exist():
    missing = sorted(
        {
            f"{name}:{line} -> {target}"
            for name, tree in TREES.items()
            for target, _, line, _ in _intra_imports(tree, name)
            if target not in MODULES
        }
    )
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_import_cycles():
    graph = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle among softtopk modules: {' -> '.join(cycle)}"


def test_cycle_finder_finds_cycles():  # the checker itself
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("from . import threshold\ndef f():\n    from .masks import topk_mask\nimport softtopk.nn as n")
    assert sorted(t[:2] for t in _intra_imports(tree, "losses")) == [
        ("masks", "topk_mask"),
        ("nn", None),
        ("threshold", None),
    ]
    tree = ast.parse(
        "from .._prepare import check_k\nfrom ._checks import check_real\nfrom . import knn\nfrom .. import hard"
    )
    assert sorted(t[:2] for t in _intra_imports(tree, "nn.routing")) == [
        ("_prepare", "check_k"),
        ("hard", None),
        ("nn._checks", "check_real"),
        ("nn.knn", None),
    ]


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_imported_across_modules():
    offending = sorted(
        f"{name}:{line} imports {target}.{imported}"
        for name, tree in TREES.items()
        for target, imported, line, _ in _intra_imports(tree, name)
        if imported is not None and _is_private(imported) and target != name and target not in PRIVATE_OK
    )
    assert not offending, f"private names imported from other softtopk modules: {offending}"


def test_no_private_attributes_of_other_modules():
    """``from . import threshold`` then ``threshold._helper(...)`` is the same private import by another route."""
    offending = []
    for name, tree in TREES.items():
        aliases = {
            local: target
            for target, imported, _, local in _intra_imports(tree, name)
            if imported is None and local and target != name and target not in PRIVATE_OK
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
            ):
                offending.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offending, f"private names of other softtopk modules used: {sorted(offending)}"


# ----------------------------------------------------------------------------------------------------------
# Public function length.
# ----------------------------------------------------------------------------------------------------------
def _code_lines(source):
    """Line numbers holding code (not blank, not comment-only); a multi-line token covers all its lines."""
    lines = set()
    ignore = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    ignore |= {tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in ignore:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _body_length(fn, code_lines):
    body = fn.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    return len([n for n in range(body[0].lineno, body[-1].end_lineno + 1) if n in code_lines])


def test_body_length_counts_code_only():
    src = 'def f(x):\n    """Doc.\n\n    more\n    """\n    # comment\n\n'
    src += "    y = (x +\n         1)  # tail\n    return y\n"
    (fn,) = ast.parse(src).body
    assert _body_length(fn, _code_lines(src)) == 3


def test_public_functions_are_short():
    public = {name for _, name in _all_names() if not name.startswith("_")}
    lengths = []
    for mod, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        code = _code_lines(source)
        for node in ast.walk(TREES[mod]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in public:
                lengths.append((_body_length(node, code), f"{mod}.{node.name} (line {node.lineno})"))
    functions = {n for m, n in _all_names() if inspect.isfunction(getattr(PUBLIC[m], n, None))}
    unseen = functions - {w.split(" ")[0].rsplit(".", 1)[1] for _, w in lengths}
    assert not unseen, f"public functions whose definition was not found in src/softtopk: {sorted(unseen)}"
    lengths.sort(reverse=True)
    longest, where = lengths[0]
    too_long = [f"{w}: {n}" for n, w in lengths if n > MAX_PUBLIC_BODY]
    assert longest <= MAX_PUBLIC_BODY, (
        f"longest public function {where}: {longest} body lines > {MAX_PUBLIC_BODY}; all over: {too_long}"
    )


# ----------------------------------------------------------------------------------------------------------
# __all__ and docstrings.
# ----------------------------------------------------------------------------------------------------------
def _needs_doc(obj):
    return inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or inspect.isbuiltin(obj)


def test_public_names_exist_and_are_documented():
    missing, undocumented = [], []
    for mod_name, name in sorted(_all_names()):
        mod = PUBLIC[mod_name]
        if not hasattr(mod, name):
            missing.append(f"{mod_name}.{name}")
            continue
        obj = getattr(mod, name)
        if callable(obj) or _needs_doc(obj):
            doc = obj.__doc__  # a class's own docstring (not inherited)
            if not (isinstance(doc, str) and doc.strip()):
                undocumented.append(f"{mod_name}.{name}")
    assert not missing, f"names in __all__ that do not exist: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"
    for mod_name, mod in PUBLIC.items():
        assert len(set(mod.__all__)) == len(mod.__all__), f"duplicates in {mod_name}.__all__"
        assert mod.__doc__ and mod.__doc__.strip(), f"{mod_name} has no module docstring"
