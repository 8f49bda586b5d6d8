"""softtopk on ``torch.distributed``, for what outgrows one device.

- Top-k over a dimension sharded across ranks (:func:`topk_mask`, :func:`topk`), for candidate sets that do not fit
  one device: the threshold masks exchange O(rows) scalars per solver step, never the shards; :func:`traffic`
  counts what they exchange.
- Top-k gradient compression for ``DistributedDataParallel`` (:func:`topk_compression_hook` with
  :class:`TopKCompressionState`): each rank sends the largest entries of each gradient bucket, the rest kept as a
  residual (error feedback).

Every rank of the process group calls the same function. Any backend: gloo on CPU, nccl on GPUs.
"""

from .compression import TopKCompressionState, topk_compression_hook
from .sharded import SHARDED_METHODS, ShardedTopK, Traffic, topk, topk_mask, traffic

__all__ = [
    "SHARDED_METHODS",
    "ShardedTopK",
    "TopKCompressionState",
    "Traffic",
    "topk",
    "topk_compression_hook",
    "topk_mask",
    "traffic",
]
