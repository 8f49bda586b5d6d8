"""softtopk at a glance: the mask of every method on one small vector, and a gradient.

Run: ``python examples/demo.py`` (``make demo`` runs it, then a quick benchmark).
"""

import torch

import softtopk


def main() -> None:
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.4, -2.0, 1.0, 0.0])
    k, t = 3, 1.0
    print(f"x = {x.tolist()}   k = {k}   temperature = {t}\n")
    print(f"{'method':<22}" + "".join(f"{v:>7.2f}" for v in x.tolist()) + f"{'sum':>8}")
    cases = [(m, {}) for m in softtopk.METHODS if m != "perturbed"] + [("sparse", {"p": 4 / 3})]
    cases.append(("perturbed", {"n_samples": 1000, "generator": torch.Generator().manual_seed(0)}))
    for method, opts in cases:
        y = softtopk.topk_mask(x, k, method=method, temperature=t, **opts)
        label = method + (" p=4/3" if "p" in opts else "") + (" S=1000" if "n_samples" in opts else "")
        print(f"{label:<22}" + "".join(f"{v:7.3f}" for v in y.tolist()) + f"{y.sum().item():8.3f}")

    print("\nGradient of <w, y> for method='sigmoid' (flows to every entry, sums to 0 over the row):")
    xr = x.clone().requires_grad_()
    w = torch.arange(8.0)
    (softtopk.topk_mask(xr, k, temperature=t) * w).sum().backward()
    print("  " + " ".join(f"{v:+.3f}" for v in xr.grad.tolist()))

    print("\nAny dim, any batch shape, a k per row:")
    scores = torch.randn(2, 5, 3)
    y = softtopk.topk_mask(scores, torch.tensor([[1, 2, 3], [4, 0, 5]]), dim=1, method="sparse")
    print("  row sums along dim=1:", [[round(v, 4) for v in row] for row in y.sum(1).tolist()])

    print("\nPermutahedron operators (Blondel et al. 2020; Sander et al. 2023):")
    print("  soft_rank     ", [round(v, 3) for v in softtopk.soft_rank(x, strength=0.5).tolist()])
    print("  soft_sort     ", [round(v, 3) for v in softtopk.soft_sort(x, strength=0.5).tolist()])
    mag = softtopk.topk_magnitude(x, k, temperature=0.5)
    print("  topk_magnitude", [round(v, 3) + 0.0 for v in mag.tolist()])  # + 0.0: no "-0.0"

    print("\nSOFT sorted top-k (Xie et al. 2020): row j of the plan is the soft j-th largest entry")
    plan = softtopk.topk_permutation(x, k, temperature=0.05)
    print("  sorted top-k values (plan @ x):", [round(v, 3) for v in (plan @ x).tolist()])
    for network in ("odd_even", "bitonic"):
        plan = softtopk.topk_permutation(x, k, method=network, temperature=0.05)
        print(f"  {network:>8} network (plan @ x):", [round(v, 3) for v in (plan @ x).tolist()])

    g = torch.Generator().manual_seed(0)
    print("\nStochastic and routing:")
    print("  gumbel_topk (hard sample)  ", softtopk.gumbel_topk(x, k, hard=True, generator=g).tolist())
    print("  threshold_mask p=0.5, t=0.1", [round(v, 3) for v in softtopk.threshold_mask(x, 0.5).tolist()])

    print("\nTop-k losses on 4 rows of 8 logits, label 0:")
    logits, target = torch.randn(4, 8, generator=g), torch.zeros(4, dtype=torch.long)
    for loss in (
        softtopk.losses.LMLLoss(k=3),
        softtopk.losses.TopKCrossEntropyLoss(p_k=[0.5, 0.0, 0.5], method="bitonic", temperature=0.5),
        softtopk.losses.SmoothTopKHingeLoss(k=3, generator=g),
        softtopk.losses.CascadeTopKLoss(),
    ):
        target_arg = target if not isinstance(loss, softtopk.losses.CascadeTopKLoss) else target[:, None]
        print(f"  {type(loss).__name__:<22} {loss(logits, target_arg).item():.4f}")


if __name__ == "__main__":
    main()
