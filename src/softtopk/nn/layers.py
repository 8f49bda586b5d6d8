"""``SoftTopK``: the ``nn.Module`` form of :func:`softtopk.topk_mask`."""

from __future__ import annotations

import math
import numbers
from typing import Union

from torch import Tensor, nn

from .._prepare import (
    SCALES,
    check_bool,
    check_k,
    check_temperature,
    reject_unused,
)
from .._registry import check_support, lookup, parse, uses_temperature
from ..masks import topk_mask

__all__ = ["SoftTopK"]

_FLAGS = ("largest", "straight_through", "hard_in_eval")


class SoftTopK(nn.Module):
    """``nn.Module`` form of :func:`softtopk.topk_mask`: ``SoftTopK(k, method=..., temperature=...)(x)``.

    The arguments are checked when the module is built; ``temperature`` may be an ``nn.Parameter``.
    ``hard_in_eval=True`` makes the module return the exact top-k mask (``method="hard"``) in ``eval()`` mode:
    train with the soft mask, infer with the exact selection. With the default ``False`` the module computes the
    same soft mask in both modes.

    Example:
        >>> import torch
        >>> from softtopk.nn import SoftTopK
        >>> layer = SoftTopK(2, method="sparse", temperature=2.0, hard_in_eval=True)
        >>> x = torch.tensor([3.0, 1.0, 2.0, 0.0])
        >>> layer(x), layer.eval()(x)
        (tensor([1.0000, 0.2500, 0.7500, 0.0000]), tensor([1., 0., 1., 0.]))
    """

    def __init__(
        self,
        k: Union[int, float, Tensor],
        *,
        dim: int = -1,
        method: str = "sigmoid",
        temperature: Union[float, Tensor, None] = None,
        largest: bool = True,
        scale: Union[str, None] = None,
        straight_through: bool = False,
        hard_in_eval: bool = False,
        **options,
    ):
        super().__init__()
        fn = "SoftTopK"
        spec = lookup("mask", method, options, fn=fn)
        parse(spec, options, fn=fn)  # the option values, as topk_mask checks them
        uses_temperature(spec, options, temperature, fn=fn)  # a method's alias and temperature together raise
        if options.get("max_support") is not None:
            check_support(options["max_support"], k, fn=fn)
        check_k(
            k,
            math.inf,  # type: ignore[arg-type]
            integer=not spec.float_k or straight_through,
            fn=fn,
        )
        if temperature is not None:
            check_temperature(temperature, fn=fn)
        for name, flag in zip(_FLAGS, (largest, straight_through, hard_in_eval)):
            check_bool(flag, name, fn=fn)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"{fn}: `dim` must be an int, got {type(dim).__name__}")
        if hard_in_eval and not float(k if not isinstance(k, Tensor) else 0).is_integer():
            raise ValueError(f"{fn}: `hard_in_eval` needs a whole k, got {k}")
        if scale not in SCALES:
            raise ValueError(f"{fn}: `scale` must be None or 'std', got {scale!r}")
        if spec.factor is None:
            why = f"method={method!r}"
            reject_unused(fn, why, temperature=temperature, scale=scale, straight_through=straight_through)
        self.k: Union[int, float, Tensor] = k
        self.method: str = method
        self.temperature: Union[float, Tensor, None] = temperature
        self.dim: int = int(dim)
        self.largest: bool = largest
        self.scale: Union[str, None] = scale
        self.straight_through: bool = straight_through
        self.hard_in_eval: bool = hard_in_eval
        self.options: dict = options

    def forward(self, x: Tensor) -> Tensor:
        if self.hard_in_eval and not self.training:
            return topk_mask(x, self.k, dim=self.dim, method="hard", largest=self.largest)
        return topk_mask(
            x, self.k, dim=self.dim, method=self.method, temperature=self.temperature, largest=self.largest,
            scale=self.scale, straight_through=self.straight_through, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"k={self.k}", f"method={self.method!r}"]
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature}")
        for name, default in (("dim", -1), ("largest", True), ("scale", None), ("straight_through", False)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        parts.append(f"hard_in_eval={self.hard_in_eval}")
        parts += [f"{key}={val!r}" for key, val in self.options.items()]
        return ", ".join(parts)
