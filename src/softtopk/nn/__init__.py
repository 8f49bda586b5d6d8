"""``nn.Module`` forms of the operators, for building models: ``SoftTopK`` (a soft top-k mask layer),
``SoftKNN`` (a differentiable k-nearest-neighbour classifier), with the functions ``soft_knn`` and ``knn_predict``,
and ``TopKRouter`` (a mixture-of-experts router returning a ``Routing``).

Modules validate their arguments when they are built, show them in ``repr``, and say what they do in ``eval()``.
"""

from .knn import SoftKNN, knn_predict, soft_knn
from .layers import SoftTopK
from .routing import Routing, TopKRouter

__all__ = ["Routing", "SoftKNN", "SoftTopK", "TopKRouter", "knn_predict", "soft_knn"]
