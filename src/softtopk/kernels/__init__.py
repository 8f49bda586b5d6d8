"""Fused GPU kernels (Triton) behind softtopk's per-device dispatch; the pure-torch code is the reference.

:mod:`softtopk.kernels.triton_threshold` holds the kernels of the threshold family (the normalised masks and
DFTopK) as ``torch.library`` custom ops in the namespace ``softtopk``. Importing this package imports neither
triton nor the kernels: they are loaded on the first kernel call, and a call without triton raises an
``ImportError`` that says ``pip install 'softtopk[gpu]'``. See ``docs/guides/gpu.md``.
"""

from __future__ import annotations

from .triton_threshold import available, dftopk, threshold_mask

__all__ = ["available", "dftopk", "threshold_mask"]
