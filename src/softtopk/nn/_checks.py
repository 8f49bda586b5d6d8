"""Argument checks shared by the modules of :mod:`softtopk.nn`: each raises an error naming the public argument and
the function (``fn``) it belongs to."""

from __future__ import annotations

import numbers
from typing import Any

from .._prepare import SCALES, check_bool, check_temperature, reject_unused
from .._registry import check_support, lookup, parse, uses_temperature


def check_mask_args(method: Any, temperature: Any, scale: Any, options: dict, k: int, fn: str) -> None:
    """The mask arguments of a module or function, checked as ``topk_mask`` checks them, with errors naming ``fn``."""
    opts = {key: val for key, val in options.items() if key != "straight_through"}
    spec = lookup("mask", method, opts, fn=fn)
    parse(spec, opts, fn=fn)  # the option values
    uses_t = uses_temperature(spec, opts, temperature, fn=fn)  # a method's alias and temperature together raise
    straight_through = check_bool(options.get("straight_through", False), "straight_through", fn=fn)
    if temperature is not None:
        check_temperature(temperature, fn=fn)
    if scale not in SCALES:
        raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")
    if spec.factor is None:
        reject_unused(fn, f"method={method!r}", temperature=temperature, scale=scale, straight_through=straight_through)
    elif not uses_t:
        reject_unused(fn, f"method={method!r} with `{spec.alias}`", scale=scale)
    if opts.get("max_support") is not None:
        check_support(opts["max_support"], k, fn=fn)


def check_positive_int(value: Any, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value}")
    return int(value)


def check_real(value: Any, name: str, fn: str, low: float, high: float, *, closed_low: bool) -> float:
    """A real number in [low, high) (``closed_low``) or (low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}")
    v = float(value)
    ok = (low <= v if closed_low else low < v) and v < high
    if not ok:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise ValueError(f"{fn}: `{name}` must lie in {interval}, got {value}")
    return v
