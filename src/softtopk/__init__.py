"""softtopk: differentiable top-k operators for PyTorch behind one API.

>>> import torch, softtopk
>>> y = softtopk.topk_mask(torch.randn(8, 100), k=5, method="sigmoid", temperature=0.1)
>>> y.shape, bool(torch.allclose(y.sum(-1), torch.tensor(5.0)))
(torch.Size([8, 100]), True)
"""

from . import losses
from .api import METHODS, SoftTopK, topk_mask
from .networks import topk_distribution
from .ot import topk_permutation
from .permutahedron import (
    isotonic,
    pav_backend,
    permutahedron_projection,
    permutahedron_topk,
    soft_rank,
    soft_sort,
    topk_magnitude,
)
from .routing import threshold_mask
from .stochastic import gumbel_topk

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "SoftTopK",
    "__version__",
    "gumbel_topk",
    "losses",
    "isotonic",
    "pav_backend",
    "permutahedron_projection",
    "permutahedron_topk",
    "soft_rank",
    "soft_sort",
    "threshold_mask",
    "topk_magnitude",
    "topk_distribution",
    "topk_mask",
    "topk_permutation",
]
