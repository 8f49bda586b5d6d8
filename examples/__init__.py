"""The applications of the papers, each run as ``python -m examples.NAME`` from the repository root (results in
docs/examples.md). ``examples/demo.py`` is the quick tour run by ``make demo``."""
