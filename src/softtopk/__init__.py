"""softtopk: differentiable top-k operators for PyTorch behind one API.

>>> import torch, softtopk
>>> y = softtopk.topk_mask(torch.randn(8, 100), k=5, method="sigmoid", temperature=0.1)
>>> y.shape, bool(torch.allclose(y.sum(-1), torch.tensor(5.0)))
(torch.Size([8, 100]), True)
"""

from . import distributed, losses, nn
from ._registry import PERMUTATION_METHODS
from .masks import METHODS, TopK, gumbel_topk, threshold_mask, topk, topk_mask
from .permutahedron import (
    isotonic,
    pav_backend,
    permutahedron_projection,
    permutahedron_topk,
    soft_rank,
    soft_sort,
    topk_magnitude,
)
from .permutations import topk_distribution, topk_permutation

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "PERMUTATION_METHODS",
    "TopK",
    "__version__",
    "distributed",
    "gumbel_topk",
    "isotonic",
    "losses",
    "nn",
    "pav_backend",
    "permutahedron_projection",
    "permutahedron_topk",
    "soft_rank",
    "soft_sort",
    "threshold_mask",
    "topk",
    "topk_distribution",
    "topk_magnitude",
    "topk_mask",
    "topk_permutation",
]
