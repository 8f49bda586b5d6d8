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
    cases = [(m, {}) for m in softtopk.METHODS] + [("sparse", {"p": 4 / 3})]
    for method, opts in cases:
        y = softtopk.topk_mask(x, k, method=method, temperature=t, **opts)
        label = method + "".join(f" p={v:.3g}" for v in opts.values())
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


if __name__ == "__main__":
    main()
