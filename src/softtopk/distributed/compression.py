r"""Top-k gradient compression for ``DistributedDataParallel``: a communication hook with error feedback.

Each rank sends only the k largest-magnitude entries of each gradient bucket (values and indices) and keeps the rest
as a residual that is added to the bucket's next gradient (error feedback: Stich et al. 2018, "Sparsified SGD with
memory"; Lin et al. 2018, "Deep Gradient Compression"). Nothing is lost, only delayed: after any number of steps,
what was applied plus the ranks' residuals (averaged) equals the sum of the true averaged gradients.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).
import math
import numbers
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

__all__ = ["TopKCompressionState", "topk_compression_hook"]

_FN = "softtopk.distributed.TopKCompressionState"


class TopKCompressionState:
    r"""The state of :func:`topk_compression_hook`: the compression ratio, and the residual of every bucket.

    ``model.register_comm_hook(TopKCompressionState(ratio=0.01), topk_compression_hook)`` on a
    ``DistributedDataParallel`` model: each rank then sends the ``k = ⌈ratio · numel⌉`` largest-magnitude entries
    of each parameter's gradient (a float32 value and an int32 index each: 8 bytes, against 4 (float32) or 2 (half)
    per entry of a dense all-reduce), one all-gather per bucket, so a rank receives ``world · k`` entries. The
    selection is per parameter, not per bucket, so that it does not depend on DDP's bucketing. The averaged
    gradient applied is :math:`\frac1W \sum_r \mathrm{topk}(g_r + e_r)`, and each rank keeps
    :math:`e_r \leftarrow g_r + e_r - \mathrm{topk}(g_r + e_r)` (``error_feedback=True``; with False the unsent
    part is dropped, and the gradient is biased). ``ratio=1.0`` is plain DDP, bit for bit (PyTorch's own
    all-reduce hook).

    The first ``warmup_steps`` steps are dense (plain DDP, as PyTorch's PowerSGD hook starts late). The residuals
    are kept **per parameter** in float32 (whatever the gradients' dtype; fp16 and bf16 buckets are compressed from
    their float32 sum with the residual), not per bucket: DDP rebuilds its buckets after a model's first step, in
    another order, so a run resumed from a checkpoint sees other bucket layouts than the run that saved it. With
    ``model`` given, :meth:`state_dict` names them by parameter name, so that a checkpointed run resumes exactly.

    Args:
        ratio: the fraction of each bucket sent, in (0, 1].
        error_feedback: keep the unsent part as a residual (default True).
        warmup_steps: dense steps before compression starts (default 2), an int ≥ 0.
        process_group: the process group (None: the default group).
        model: the module (or the ``DistributedDataParallel`` model) whose gradients are compressed; needed by
            :meth:`state_dict` and :meth:`load_state_dict` to name the residuals.

    Example (under ``torchrun``; every rank runs the same code):

    .. code-block:: python

        model = torch.nn.parallel.DistributedDataParallel(net)
        state = softtopk.distributed.TopKCompressionState(ratio=0.01, model=model)
        model.register_comm_hook(state, softtopk.distributed.topk_compression_hook)
        ...
        torch.save({"model": model.state_dict(), "compression": state.state_dict()}, path)
    """

    ratio: float
    error_feedback: bool
    warmup_steps: int
    process_group: Any
    model: Union[torch.nn.Module, None]
    step: int
    residuals: "dict[Any, Tensor]"
    sent_bytes: int
    _bytes: int

    def __init__(
        self,
        ratio: float = 0.01,
        *,
        error_feedback: bool = True,
        warmup_steps: int = 2,
        process_group: Any = None,
        model: Union[torch.nn.Module, None] = None,
    ):
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"{_FN}: `ratio` must be a number in (0, 1], got {ratio!r}")
        if not isinstance(error_feedback, bool):
            raise TypeError(f"{_FN}: `error_feedback` must be a bool, got {type(error_feedback).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"{_FN}: `warmup_steps` must be an int ≥ 0, got {warmup_steps!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{_FN}: `model` must be a torch.nn.Module, got {type(model).__name__}")
        self.ratio = float(ratio)
        self.error_feedback = error_feedback
        self.warmup_steps = int(warmup_steps)
        self.process_group = process_group
        self.model = model
        self.step = 0  # completed steps (one per backward: counted at the last bucket)
        self.residuals = {}  # parameter -> float32 residual of its flat gradient
        self.sent_bytes = 0  # bytes this rank contributed to the collectives of the last completed step
        self._bytes = 0

    def compresses(self) -> bool:
        """Whether the current step is compressed (after the warm-up, with ratio < 1)."""
        return self.ratio < 1.0 and self.step >= self.warmup_steps

    def _named(self, fn: str) -> "dict[str, torch.nn.Parameter]":
        if self.model is None:
            raise TypeError(f"{_FN}.{fn}: pass `model=` to TopKCompressionState to save and restore its residuals "
                            "(they are named by parameter)")  # fmt: skip
        return dict(self.model.named_parameters())

    def state_dict(self) -> "dict[str, Any]":
        """The settings, the step and the residuals by parameter name (cloned), for ``torch.save``."""
        names = {p: name for name, p in self._named("state_dict").items()}
        return {
            "ratio": self.ratio,
            "error_feedback": self.error_feedback,
            "warmup_steps": self.warmup_steps,
            "step": self.step,
            "residuals": {names[p]: r.clone() for p, r in self.residuals.items()},
        }

    def load_state_dict(self, state: "dict[str, Any]") -> None:
        """Restores what :meth:`state_dict` saved, onto the parameters of ``model`` with the same names."""
        for key in ("ratio", "error_feedback", "warmup_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{_FN}.load_state_dict: the saved `{key}`={state[key]!r} differs from this "
                                 f"state's {getattr(self, key)!r}")  # fmt: skip
        params = self._named("load_state_dict")
        missing = sorted(set(state["residuals"]) - set(params))
        if missing:
            raise ValueError(f"{_FN}.load_state_dict: residuals of parameters the model does not have: {missing}")
        self.step = int(state["step"])
        self.residuals = {params[name]: r.clone() for name, r in state["residuals"].items()}

    def __repr__(self) -> str:
        return (f"TopKCompressionState(ratio={self.ratio}, error_feedback={self.error_feedback}, "
                f"warmup_steps={self.warmup_steps}, step={self.step}, residuals={len(self.residuals)})")  # fmt: skip


def _finish_step(state: "TopKCompressionState", bucket: dist.GradBucket, nbytes: int) -> None:
    state._bytes += nbytes
    if bucket.is_last():
        state.step += 1
        state.sent_bytes, state._bytes = state._bytes, 0


def topk_compression_hook(state: TopKCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A ``DistributedDataParallel`` communication hook: top-k sparsification with error feedback.

    Per bucket: add the residuals to the flat gradient g, select the ``k = ⌈ratio · numel⌉`` entries of largest
    magnitude of each parameter (``torch.topk``, a selection, not a sort), all-gather the (value, index) pairs,
    scatter-add them into a dense bucket, divide by the world size, and keep the unsent part as the residuals.
    See :class:`TopKCompressionState`.

    Args:
        state: a :class:`TopKCompressionState`.
        bucket: the ``torch.distributed.GradBucket`` DDP passes.

    Returns:
        A future of the averaged bucket, as DDP expects.
    """
    if not isinstance(state, TopKCompressionState):
        raise TypeError(f"topk_compression_hook: `state` must be a TopKCompressionState, got {type(state).__name__}")
    buffer = bucket.buffer()
    if not buffer.dtype.is_floating_point:
        raise TypeError(f"topk_compression_hook: gradients of dtype {buffer.dtype} are not supported")
    if not state.compresses():
        _finish_step(state, bucket, buffer.numel() * buffer.element_size())
        return allreduce_hook(state.process_group, bucket)  # plain DDP, bit for bit
    if buffer.numel() >= 2**31:
        raise ValueError(f"topk_compression_hook: a bucket of {buffer.numel()} entries is too large for int32 "
                         "indices; lower DistributedDataParallel's bucket_cap_mb")  # fmt: skip
    return _compressed(state, bucket, buffer)


def _compressed(
    state: TopKCompressionState, bucket: dist.GradBucket, buffer: Tensor
) -> torch.futures.Future[torch.Tensor]:
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    params = list(bucket.parameters())
    sizes = [p.numel() for p in params]
    if sum(sizes) != buffer.numel():
        raise ValueError("topk_compression_hook: the bucket's parameters do not cover its buffer (a sparse or "
                         "unsupported DistributedDataParallel configuration)")  # fmt: skip
    g = buffer.to(torch.float32, copy=True)  # a copy: g becomes the residual, and the buffer the result
    # the bucket's flat layout follows its parameters' order. The top-k is of each parameter, not of the bucket:
    # the selection then does not depend on how DDP buckets the parameters, which changes after a model's first
    # step (and so between a run and its resumption)
    picks, start = [], 0
    for p, part in zip(params, g.split(sizes)):
        residual = state.residuals.get(p)
        if residual is not None:
            part += residual.to(part.device).reshape(-1)
        k = max(1, math.ceil(state.ratio * part.numel()))
        picks.append(torch.topk(part.abs(), k, sorted=False).indices + start)
        start += part.numel()
    idx = torch.cat(picks)
    values = g[idx]
    if state.error_feedback:
        g[idx] = 0.0  # the unsent part
        state.residuals.update(zip(params, g.split(sizes)))
    # one all-gather of (value bits, index) pairs as int32: 8 bytes per entry sent
    packed = torch.stack([values.view(torch.int32), idx.to(torch.int32)])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    _finish_step(state, bucket, packed.numel() * packed.element_size())
    work = dist.all_gather(gathered, packed, group=group, async_op=True)

    def combine(_: torch.futures.Future) -> Tensor:
        both = torch.cat(gathered, 1)
        dense = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        dense.index_add_(0, both[1].long(), both[0].view(torch.float32))
        buffer.copy_(dense.div_(world))
        return buffer

    return work.get_future().then(combine)
