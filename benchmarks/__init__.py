"""Benchmarks of softtopk: run ``python -m benchmarks.core`` (see its docstring)."""
