"""Building blocks for models that select: a soft top-k layer (``SoftTopK``), a differentiable kNN
(``SoftKNN``, ``soft_knn``, ``knn_predict``), mixture-of-experts routing (``TopKRouter``, ``MixtureOfExperts``),
mixture-of-depths routing (``DepthRouter``), beam search with a relaxed top-k (``soft_beam_search``) and magnitude
pruning and sparse training (``TopKMagnitudePruning``, ``TopKAST``, ``SWATLinear``).

Modules validate their arguments when they are built, show them in ``repr``, and say what they do in ``eval()``
(where a selection is soft in ``train()``, ``eval()`` can give the exact one).
"""

from .beam import BEAM_METHODS, Beams, soft_beam_search
from .depth import DepthRouter, DepthRouting
from .knn import SoftKNN, knn_predict, soft_knn
from .layers import SoftTopK
from .moe import MixtureOfExperts
from .pruning import (
    SWATLinear,
    TopKAST,
    TopKMagnitudePruning,
    make_pruning_permanent,
    prune_topk_magnitude,
    topkast_regularizer,
)
from .routing import Routing, TopKRouter

__all__ = [
    "BEAM_METHODS",
    "Beams",
    "DepthRouter",
    "DepthRouting",
    "MixtureOfExperts",
    "Routing",
    "SWATLinear",
    "SoftKNN",
    "SoftTopK",
    "TopKAST",
    "TopKMagnitudePruning",
    "TopKRouter",
    "knn_predict",
    "make_pruning_permanent",
    "prune_topk_magnitude",
    "soft_beam_search",
    "soft_knn",
    "topkast_regularizer",
]
