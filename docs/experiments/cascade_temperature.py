"""Recall@10@20 of a linear pre-ranker trained with cascade_topk_loss at several temperatures (absolute and
scale="std"): the measurement behind the temperature advice of cascade_topk_loss. About 3 min on 2 cores.
Output: docs/experiments/cascade_temperature.txt."""

import time

import torch

from softtopk.losses import cascade_topk_loss


def run(method, temperature, scale, seed=0, steps=300, d=32, n=200, K=10, k=20, batch=64):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, generator=g)

    def data(b):
        feats = torch.randn(b, n, d, generator=g)
        ts = feats @ teacher + 0.5 * torch.randn(b, n, generator=g)
        rel = torch.zeros(b, n)
        rel.scatter_(1, ts.topk(K, dim=1).indices, 1.0)
        return feats, rel

    w = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        f, rel = data(batch)
        loss = cascade_topk_loss(f @ w * 3.0, rel.bool(), k, method=method, temperature=temperature, scale=scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f, rel = data(512)
    with torch.no_grad():
        sel = (f @ w * 3.0).topk(k, dim=1).indices
        recall = rel.gather(1, sel).sum(1).mean() / K
    return float(recall), float((f @ w * 3.0).detach().std(1).mean())


t0 = time.time()
for method in ("dftopk", "sigmoid"):
    for scale in (None, "std"):
        temps = (0.1, 1.0, 10.0, 100.0, 500.0) if scale is None else (0.03, 0.1, 0.3, 1.0, 3.0)
        for T in temps:
            rs = [run(method, T, scale, seed=s) for s in range(2)]
            recall = sum(r[0] for r in rs) / 2
            std = rs[0][1]
            print(f"{method:8s} scale={str(scale):4s} T={T:7g}  recall@10@20 = {recall:.3f}  (score std {std:.1f})")
print("time", time.time() - t0)
