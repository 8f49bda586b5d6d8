"""softtopk: differentiable top-k operators for PyTorch behind one API.

>>> import torch, softtopk
>>> y = softtopk.topk_mask(torch.randn(8, 100), k=5, method="sigmoid", temperature=0.1)
>>> y.shape, bool(torch.allclose(y.sum(-1), torch.tensor(5.0)))
(torch.Size([8, 100]), True)
"""

from .api import METHODS, SoftTopK, topk_mask

__version__ = "0.1.0"
__all__ = ["METHODS", "SoftTopK", "__version__", "topk_mask"]
