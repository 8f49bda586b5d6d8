"""softtopk at a glance: the mask of every method on one small vector, top-k routing with differentiable weights,
and a gradient.

Run: ``python examples/demo.py`` (``make demo`` runs it, then a quick benchmark).
"""

import torch

import softtopk


def _row(values: list[float], digits: int = 3) -> list[float]:
    return [round(v, digits) + 0.0 for v in values]  # + 0.0: no "-0.0"


def main() -> None:
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.4, -2.0, 1.0, 0.0])
    k, t = 3, 1.0
    print(f"x = {x.tolist()}   k = {k}   temperature = {t}")
    print("(temperature: the width of the mask's transition on the score axis, the same for every method)\n")
    print(f"{'method':<26}" + "".join(f"{v:>7.2f}" for v in x.tolist()) + f"{'sum':>8}")
    gen = torch.Generator().manual_seed(0)
    cases = [("hard", "hard", {}), ("straight_through", "sigmoid", {"temperature": t, "straight_through": True})]
    cases += [(m, m, {"temperature": t}) for m in softtopk.METHODS if m not in ("hard", "perturbed")]
    cases.append(("sparse p=4/3", "sparse", {"temperature": t, "p": 4 / 3}))
    cases.append(("perturbed S=1000", "perturbed", {"temperature": t, "n_samples": 1000, "generator": gen}))
    cases.append(("soft epsilon=0.1", "soft", {"epsilon": 0.1}))
    for label, method, opts in cases:
        y = softtopk.topk_mask(x, k, method=method, **opts)
        print(f"{label:<26}" + "".join(f"{v:7.3f}" for v in y.tolist()) + f"{y.sum().item():8.3f}")
    print("(straight_through: method='sigmoid', straight_through=True: the hard mask, the sigmoid's gradient;")
    print(" soft: with temperature= it is the sigmoid mask, with epsilon= SOFT's entropic OT at the paper's epsilon)")

    print("\nGradient of <w, y> for method='sigmoid' (flows to every entry, sums to 0 over the row):")
    xr = x.clone().requires_grad_()
    w = torch.arange(8.0)
    (softtopk.topk_mask(xr, k, temperature=t) * w).sum().backward()
    print("  " + " ".join(f"{v:+.3f}" for v in xr.grad.tolist()))

    print("\nAny dim, any batch shape, a k per row:")
    scores = torch.randn(2, 5, 3)
    y = softtopk.topk_mask(scores, torch.tensor([[1, 2, 3], [4, 0, 5]]), dim=1, method="sparse")
    print("  row sums along dim=1:", [[round(v, 4) for v in row] for row in y.sum(1).tolist()])

    print("\nTop-k routing (MoE-style): 4 tokens x 8 experts, k = 2, softtopk.topk(logits, 2, temperature=0.5)")
    logits = torch.randn(4, 8, generator=gen).requires_grad_()
    route = softtopk.topk(logits, 2, temperature=0.5)  # (values, indices, weights), values/indices as torch.topk
    for i in range(logits.shape[0]):
        print(
            f"  token {i}: experts {route.indices[i].tolist()}  logits {_row(route.values[i].tolist(), 2)}  "
            f"weights {_row(route.weights[i].tolist())}  outside {route.outside[i].item():.3f}"
        )
    (route.weights * torch.tensor([1.0, -1.0])).sum().backward()
    print(
        f"  (weights sum to k = 2 with .outside, the mask mass on the other experts: combine with weights / k; "
        f"their gradient reaches "
        f"{int((logits.grad != 0).sum())} of {logits.numel()} logits)"
    )
    same = []
    for label, method, opts in (
        ("sigmoid", "sigmoid", {}),
        ("dftopk", "dftopk", {}),
        ("lapsum", "lapsum", {}),
        ("sparse", "sparse", {}),
        ("sparse p=4/3", "sparse", {"p": 4 / 3}),
        ("perturbed", "perturbed", {"n_samples": 1000, "generator": torch.Generator().manual_seed(0)}),
    ):
        out = softtopk.topk(logits.detach(), 2, method=method, temperature=0.5, **opts)
        same.append(f"{label} {out.outside.mean().item():.2f}")
    print("  same temperature 0.5, as soft in every method; mean .outside: " + ", ".join(same))

    print("\nPermutahedron operators (Blondel et al. 2020; Sander et al. 2023):")
    print("  soft_rank     ", _row(softtopk.soft_rank(x, temperature=0.5).tolist()))
    print("  soft_sort     ", _row(softtopk.soft_sort(x, temperature=0.5).tolist()))
    print("  topk_magnitude", _row(softtopk.topk_magnitude(x, k, temperature=0.5).tolist()))

    print("\nSoft sorted top-k: row j of the plan is the soft j-th largest entry")
    plan = softtopk.topk_permutation(x, k, method="sinkhorn", epsilon=0.05)
    print("  sinkhorn (SOFT, Xie et al. 2020) (plan @ x):", _row((plan @ x).tolist()))
    for network in ("odd_even", "bitonic"):
        plan = softtopk.topk_permutation(x, k, method=network, temperature=0.05)
        print(f"  {network:>8} network (plan @ x):", _row((plan @ x).tolist()))

    g = torch.Generator().manual_seed(0)
    print("\nStochastic and routing:")
    sample = softtopk.gumbel_topk(x, k, straight_through=True, generator=g)
    print("  gumbel_topk (straight_through: hard sample)  ", sample.tolist())
    y = softtopk.threshold_mask(x, 0.5, temperature=0.4)
    print("  threshold_mask threshold=0.5, temperature=0.4", _row(y.tolist()))

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
