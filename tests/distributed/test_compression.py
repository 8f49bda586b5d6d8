"""softtopk.distributed.topk_compression_hook on DistributedDataParallel, 2 and 4 gloo processes: ratio 1 is plain
DDP bit for bit; with error feedback nothing is lost (applied + residuals = the true averaged gradients); a
checkpoint resumes the uninterrupted trajectory exactly; half-precision buckets."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import softtopk.distributed as sd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _net(seed=0, dtype=torch.float32, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


WIDE = 30_000  # 0.5 M parameters: more than DDP's first bucket (1 MB), so several buckets


def _batch(rank, step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 12, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def _train(model, rank, steps, start=0, opt=None, dtype=torch.float32):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(start, start + steps):
        x, y = _batch(rank, step, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


def _params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def _worker_ratio_one_is_ddp(rank, world):
    plain = DDP(_net())
    _train(plain, rank, 5)
    hooked = DDP(_net())
    state = sd.TopKCompressionState(ratio=1.0, warmup_steps=1)
    hooked.register_comm_hook(state, sd.topk_compression_hook)
    _train(hooked, rank, 5)
    assert torch.equal(_params(plain), _params(hooked))
    assert state.step == 5 and not state.residuals


def _worker_nothing_lost(rank, world, hidden=WIDE):
    """Σ_t applied_t + mean_r e_r = Σ_t mean_r g_{r,t}, with the gradients taken at the same parameters."""
    model = DDP(_net(hidden=hidden), bucket_cap_mb=0.01)  # several buckets when wide
    state = sd.TopKCompressionState(ratio=0.05, warmup_steps=1)
    model.register_comm_hook(state, sd.topk_compression_hook)
    reference = _net(hidden=hidden)  # the same parameters, plain local gradients
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    applied = torch.zeros_like(_params(reference))
    true = torch.zeros_like(applied)
    for step in range(6):
        reference.load_state_dict(model.module.state_dict())
        x, y = _batch(rank, step)
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        local = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        dist.all_reduce(local)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if step >= 1:  # compressed steps (the warm-up step is plain DDP)
            applied += grads
            true += local / world
            assert (grads != 0).sum() < grads.numel()  # sparse
        opt.step()
    assert state.step == 6 and len(state.residuals) == 4  # one per parameter (across 3 buckets when wide)
    residual = torch.cat([state.residuals[p] for p in model.parameters()])
    dist.all_reduce(residual)
    scale = float(true.abs().max())  # float32 sums of 5 steps: rounding relative to the largest entry
    torch.testing.assert_close(applied + residual / world, true, atol=1e-5 * scale, rtol=1e-5)
    assert float(residual.abs().max()) > 1e-3 * scale  # the residuals are not trivially zero


def _worker_checkpoint_resumes(rank, world, tmp):
    def make():
        model = DDP(_net(hidden=WIDE), bucket_cap_mb=0.01)  # buckets rebuilt in another layout after a first step
        state = sd.TopKCompressionState(ratio=0.1, warmup_steps=2, model=model)
        model.register_comm_hook(state, sd.topk_compression_hook)
        return model, state

    full, _ = make()
    _train(full, rank, 8)
    first, state = make()
    opt = _train(first, rank, 5)
    path = f"{tmp}/ckpt{rank}.pt"
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "compression": state.state_dict()}, path)
    resumed, state2 = make()
    ckpt = torch.load(path)
    resumed.load_state_dict(ckpt["model"])
    state2.load_state_dict(ckpt["compression"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, rank, 3, start=5, opt=opt2)
    assert torch.equal(_params(full), _params(resumed))
    # without the residuals the trajectory differs: they matter
    lost, state3 = make()
    lost.load_state_dict(ckpt["model"])
    state3.step = state.step
    opt3 = torch.optim.SGD(lost.parameters(), lr=0.1, momentum=0.9)
    opt3.load_state_dict(ckpt["opt"])
    _train(lost, rank, 3, start=5, opt=opt3)
    assert not torch.equal(_params(full), _params(lost))


def _worker_half_precision(rank, world):
    for dtype in (torch.float16, torch.bfloat16):
        model = DDP(_net(dtype=dtype))
        state = sd.TopKCompressionState(ratio=0.1, warmup_steps=1)
        model.register_comm_hook(state, sd.topk_compression_hook)
        _train(model, rank, 4, dtype=dtype)
        assert torch.isfinite(_params(model)).all()
        assert all(r.dtype == torch.float32 for r in state.residuals.values())
        n = sum(p.numel() for p in model.parameters())
        assert state.sent_bytes <= 8 * (0.1 * n + len(state.residuals)), state.sent_bytes  # k (value, index) pairs


def _worker_two_ranks(rank, world, tmp):
    _worker_ratio_one_is_ddp(rank, world)
    _worker_nothing_lost(rank, world)
    _worker_checkpoint_resumes(rank, world, tmp)
    _worker_half_precision(rank, world)


def _worker_four_ranks(rank, world):
    _worker_ratio_one_is_ddp(rank, world)
    _worker_nothing_lost(rank, world, hidden=32)


def test_hook_two_ranks(tmp_path):
    """Plain DDP at ratio 1, nothing lost, exact resumption from a checkpoint, fp16 and bf16 buckets (one spawn)."""
    spawn(2, _worker_two_ranks, str(tmp_path))


def test_hook_four_ranks():
    spawn(4, _worker_four_ranks)


def test_state_arguments():
    with pytest.raises(ValueError, match="ratio"):
        sd.TopKCompressionState(ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        sd.TopKCompressionState(ratio=1.5)
    with pytest.raises(TypeError, match="error_feedback"):
        sd.TopKCompressionState(error_feedback=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        sd.TopKCompressionState(warmup_steps=-1)
    with pytest.raises(TypeError, match="model="):
        sd.TopKCompressionState().state_dict()
    state = sd.TopKCompressionState(ratio=0.1, model=nn.Linear(2, 2))
    other = sd.TopKCompressionState(ratio=0.2, model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ratio"):
        other.load_state_dict(state.state_dict())
    with pytest.raises(TypeError, match="TopKCompressionState"):
        sd.topk_compression_hook(object(), None)
